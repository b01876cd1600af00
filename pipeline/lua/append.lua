-- Add one entry per payload to a stream (field "d"), in order, in one call: a producer
-- sends a whole batch for the price of one command.
-- KEYS: 1 stream
-- ARGV: the payloads
-- Returns the number of entries added.
local stream = KEYS[1]
for i = 1, #ARGV do
  redis.call('XADD', stream, '*', 'd', ARGV[i])
end
return #ARGV
