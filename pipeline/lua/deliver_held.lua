-- Deliver held replies: move each named entry of the held stream to the reply stream it
-- names, once. Called only after WAIT/WAITAOF said the effects behind them reached the
-- replicas (pipeline/replication.py).
-- KEY.held: the held stream (fields s = reply stream, d = payload, t = reply TTL s);
-- CALL: pipeline.replication.DeliverCall (entries: entry_id, stream).
-- An entry is delivered only while it is still in the held stream and names the same
-- reply stream, and is deleted in the same step: a second call (another worker's sweep,
-- a retry) finds it gone and adds nothing. The reply streams touched are named by the
-- call. Returns the number of replies delivered.
local delivered = 0
local ttl_set = {}
for _, e in ipairs(CALL.entries) do
  local found = redis.call('XRANGE', KEY.held, e.entry_id, e.entry_id)
  if #found == 1 then
    local fields = found[1][2]
    local f = {}
    for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
    if f.s == e.stream then
      redis.call('XADD', e.stream, 'MAXLEN', '~', 10000, '*', 'd', f.d)
      if not ttl_set[e.stream] then
        redis.call('EXPIRE', e.stream, tonumber(f.t) or 3600)
        ttl_set[e.stream] = true
      end
      delivered = delivered + 1
    end
    redis.call('XDEL', KEY.held, e.entry_id)
  end
end
return delivered
