-- Hand a batch on: ack each source entry and add its output to the target stream, in
-- one atomic step. An output is added only when this call's XACK removed its entry
-- from the group's pending list: an entry that another consumer took over and handed
-- on already (or that was acked before) adds nothing, so each output is added once.
-- KEYS: 1 target stream, 2 source stream
-- ARGV: 1 group, 2 approximate max length of the target (0 = unbounded),
--       then pairs: source entry id, output payload ('' = the entry has no output).
-- Returns {entries acked, outputs added}.
local group, maxlen = ARGV[1], tonumber(ARGV[2])
local target, source = KEYS[1], KEYS[2]
local acked, added = 0, 0
for i = 3, #ARGV, 2 do
  if redis.call('XACK', source, group, ARGV[i]) == 1 then
    acked = acked + 1
    local payload = ARGV[i + 1]
    if payload ~= '' then
      if maxlen > 0 then
        redis.call('XADD', target, 'MAXLEN', '~', maxlen, '*', 'd', payload)
      else
        redis.call('XADD', target, '*', 'd', payload)
      end
      added = added + 1
    end
  end
end
return {acked, added}
