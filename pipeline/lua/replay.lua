-- Replay a dead letter: put its payload back on the stream it came from, once.
-- The replay is recorded under the entry it came from (CALL.source, "<stream>/<entry id>")
-- in the same step as the XADD, so a replay repeated (re-run, crashed client, the same
-- entry dead-lettered by several groups of one stream) adds nothing and answers the id
-- the first one added.
-- KEY.target (the source stream), KEY.replays (hash source -> replayed entry id);
-- CALL: pipeline.scripts.ReplayCall (source, payload).
-- Returns {1 when added now / 0 when replayed before, the replayed entry id}.
local done = redis.call('HGET', KEY.replays, CALL.source)
if done then
  return {0, done}
end
local id = redis.call('XADD', KEY.target, '*', 'd', CALL.payload)
redis.call('HSET', KEY.replays, CALL.source, id)
return {1, id}
