-- expire: close every allocation whose expires-at has passed, at most `limit` per call.
-- KEY: changes (stream). CALL: schemas.rows.ExpireCall (prefix, now_ms, limit,
-- released_ttl_s).
-- Each allocation ends as 'expired' at its expires-at (the user is billed to that
-- instant, not to when the tick ran). Closing is idempotent: an allocation already
-- released is skipped. Returns {expired, seen, closed}: closed lists allocation id, user
-- id and device id of each allocation expired (for the stage's log); a full batch
-- (seen = limit) means call again.
-- First it ends the waits that are over (at most `limit`): each waiter past its
-- wait_until_ms leaves the queue with `failed` reason `timed_out`, its hold given back
-- (common.lua's wait queue); the 4th value returned is how many (limit: call again).
local P, now, released_ttl = CALL.prefix, CALL.now_ms, CALL.released_ttl_s
local late = redis.call('ZRANGEBYSCORE', k_pool(P, 'queue_deadline'), '-inf', now, 'LIMIT', 0,
  CALL.limit)
for _, member in ipairs(late) do
  local raw = redis.call('HGET', k_pool(P, 'waiters'), member)
  if raw then
    queue().time_out(P, KEY.changes, now, cjson.decode(raw))
  else
    redis.call('ZREM', k_pool(P, 'queue_deadline'), member)
  end
end
local due = redis.call('ZRANGEBYSCORE', k_pool(P, 'expiry'), '-inf', now, 'WITHSCORES', 'LIMIT', 0,
  CALL.limit)
local count, closed = 0, {}
for i = 1, #due, 2 do
  local aid, at = due[i], tonumber(due[i + 1])
  local rec = close_allocation(P, KEY.changes, aid, at, 'expired', now, released_ttl, nil,
    'expired')
  if rec then
    count = count + 1
    closed[#closed + 1] = aid
    closed[#closed + 1] = rec.user_id
    closed[#closed + 1] = rec.device_id
  else
    redis.call('ZREM', k_pool(P, 'expiry'), aid)
  end
end
flush_stats(P)
return {count, #due / 2, closed, #late}
