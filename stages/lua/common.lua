-- Shared helpers, prepended to every stage script by pipeline.scripts.
-- Key names follow schemas/keys.py: device side under {pool}, user side under {u:ID}.

local function k_pool(P, suffix) return P .. ':{pool}:' .. suffix end
local function k_user(P, uid, suffix) return P .. ':{u:' .. uid .. '}:' .. suffix end
local function opt(v) if v == nil or v == false or v == '' then return cjson.null end return v end

-- Add a reply to a producer's reply stream; the stream expires if nobody reads it.
local function send_reply(stream, json, ttl_s)
  if stream == nil or stream == '' then return end
  redis.call('XADD', stream, 'MAXLEN', '~', 10000, '*', 'd', json)
  redis.call('EXPIRE', stream, ttl_s)
end

local function failed_json(rid, reason, message, remaining)
  return cjson.encode({type = 'failed', request_id = rid, reason = reason, message = message,
                       remaining_devices = remaining == nil and cjson.null or remaining})
end

local function emit_change(stream, tbl)
  redis.call('XADD', stream, '*', 'd', cjson.encode(tbl))
end

-- Score of a device in a free pool: best fit orders by CPU, then memory.
local CPU_SCALE = 1073741824
local function fit_score(cpu, mem) return cpu * CPU_SCALE + mem end

-- Close an active allocation as `status` ('released' or 'expired') at end_ms.
-- Frees the device, gives the usage back, records the change. Returns the
-- allocation's fields, or nil when it is not active (so a second close is a no-op).
local function close_allocation(P, changes, aid, end_ms, status, now, released_ttl)
  local akey = k_pool(P, 'alloc:' .. aid)
  local a = redis.call('HMGET', akey, 'device_id', 'user_id', 'tenant_id', 'request_id', 'status',
    'allocated_at_ms', 'expires_at_ms', 'duration_minutes', 'cpu_cores', 'memory_mb', 'storage_mb',
    'pool', 'version')
  if not a[1] or a[5] ~= 'allocated' then return nil end
  local allocated_at = tonumber(a[6])
  if end_ms < allocated_at then end_ms = allocated_at end
  local dur = math.floor((end_ms - allocated_at) / 1000)
  local version = tonumber(a[13]) + 1
  redis.call('HSET', akey, 'status', status, 'released_at_ms', end_ms, 'duration_seconds', dur,
    'version', version)
  redis.call('EXPIRE', akey, released_ttl)
  redis.call('ZREM', k_pool(P, 'expiry'), aid)
  redis.call('SREM', k_pool(P, 'active'), aid)
  redis.call('HINCRBY', k_pool(P, 'stats'), status, 1)
  local dkey = k_pool(P, 'dev:' .. a[1])
  local d = redis.call('HMGET', dkey, 'alloc', 'status', 'cpu_cores', 'memory_mb', 'pool')
  if d[1] == aid then
    redis.call('HSET', dkey, 'alloc', '', 'last_alloc', aid)
    if d[2] == 'allocated' then
      redis.call('HSET', dkey, 'status', 'available')
      redis.call('ZADD', k_pool(P, 'free:' .. d[5]), fit_score(tonumber(d[3]), tonumber(d[4])), a[1])
    end
  end
  local cpu, mem, sto = tonumber(a[9]), tonumber(a[10]), tonumber(a[11])
  if redis.call('HDEL', k_user(P, a[2], 'allocs'), aid) == 1 then
    local ukey = k_user(P, a[2], 'usage')
    redis.call('HINCRBY', ukey, 'devices', -1)
    -- 0 - x, not -x: for x = 0, -x is Lua's -0, which reaches Redis as "-0" and
    -- HINCRBY rejects it (the script would stop half done)
    redis.call('HINCRBY', ukey, 'cpu', 0 - cpu)
    redis.call('HINCRBY', ukey, 'mem', 0 - mem)
    redis.call('HINCRBY', ukey, 'sto', 0 - sto)
  end
  local rec = {kind = 'allocation', allocation_id = aid, device_id = a[1], user_id = a[2],
    tenant_id = opt(a[3]), request_id = a[4], status = status, allocated_at_ms = allocated_at,
    expires_at_ms = tonumber(a[7]), released_at_ms = end_ms, duration_minutes = tonumber(a[8]),
    duration_seconds = dur, cpu_cores = cpu, memory_mb = mem, storage_mb = sto, pool = a[12],
    version = version, at_ms = now}
  emit_change(changes, rec)
  return rec
end
