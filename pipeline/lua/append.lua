-- Add one entry per payload to a stream (field "d"), in order, in one call: a producer
-- sends a whole batch for the price of one command.
-- KEY.stream; CALL: pipeline.scripts.AppendCall (payloads).
-- Returns the number of entries added.
local payloads = CALL.payloads
for i = 1, #payloads do
  redis.call('XADD', KEY.stream, '*', 'd', payloads[i])
end
return #payloads
