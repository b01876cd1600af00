-- Hand a batch on: ack each source entry and add its output to the target stream, in
-- one atomic step. An output is added only when this call's XACK removed its entry
-- from the group's pending list: an entry that another consumer took over and handed
-- on already (or that was acked before) adds nothing, so each output is added once.
-- KEY.target, KEY.source; CALL: pipeline.scripts.HandoffCall (group, maxlen, entries of
-- HandOn: entry_id, output, false when the entry has none).
-- Returns {entries acked, outputs added}.
local group, maxlen = CALL.group, CALL.maxlen
local target, source = KEY.target, KEY.source
local acked, added = 0, 0
for _, e in ipairs(CALL.entries) do
  if redis.call('XACK', source, group, e.entry_id) == 1 then
    acked = acked + 1
    local payload = e.output
    if payload then
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
