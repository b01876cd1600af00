-- expire: close every allocation whose expires-at has passed, at most `limit` per call.
-- KEYS: 1 changes stream
-- ARGV: 1 prefix, 2 now_ms, 3 limit, 4 released ttl s
-- Each allocation ends as 'expired' at its expires-at (the user is billed to that
-- instant, not to when the tick ran). Closing is idempotent: an allocation already
-- released is skipped. Returns the number expired; a full batch means call again.
local P, now, limit, released_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local due = redis.call('ZRANGEBYSCORE', k_pool(P, 'expiry'), '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
local count = 0
for i = 1, #due, 2 do
  local aid, at = due[i], tonumber(due[i + 1])
  if close_allocation(P, KEYS[1], aid, at, 'expired', now, released_ttl) then
    count = count + 1
  else
    redis.call('ZREM', k_pool(P, 'expiry'), aid)
  end
end
flush_stats(P)
return {count, #due / 2}
