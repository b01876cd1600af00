-- admin: add or update a device, or set a user's quota, and record the change.
-- KEYS: 1 changes stream
-- ARGV: 1 prefix, 2 now_ms, 3 op ('device' | 'quota'), then the op's fields.
--   device: id, name, pool, model, host, adb_host, adb_port, cpu_cores, memory_mb, storage_mb
--   quota:  user_id, status, expires_at_ms ('' for none), max_devices, max_cpu_per_device,
--           max_memory_mb_per_device, total_cpu_cores, total_memory_gb, total_storage_gb
-- A device that is allocated keeps its allocation; its new size applies from its next
-- allocation. Each call bumps the entity's version, so the write-behind keeps the newest.
local P, now, op = ARGV[1], tonumber(ARGV[2]), ARGV[3]
if op == 'device' then
  local id, pool = ARGV[4], ARGV[6]
  local dkey = k_pool(P, 'dev:' .. id)
  local old = redis.call('HMGET', dkey, 'status', 'pool', 'alloc')
  if old[2] and old[2] ~= pool then redis.call('ZREM', k_pool(P, 'free:' .. old[2]), id) end
  local version = redis.call('HINCRBY', dkey, 'version', 1)
  redis.call('HSET', dkey, 'id', id, 'name', ARGV[5], 'pool', pool, 'model', ARGV[7], 'host', ARGV[8],
    'adb_host', ARGV[9], 'adb_port', ARGV[10], 'cpu_cores', ARGV[11], 'memory_mb', ARGV[12],
    'storage_mb', ARGV[13])
  local status = old[1] or 'available'
  if status == 'allocated' and (old[3] == nil or old[3] == '') then status = 'available' end
  redis.call('HSET', dkey, 'status', status)
  if not old[3] then redis.call('HSET', dkey, 'alloc', '') end
  redis.call('SADD', k_pool(P, 'pools'), pool)
  redis.call('SADD', k_pool(P, 'devices'), id)
  if status == 'available' then
    redis.call('ZADD', k_pool(P, 'free:' .. pool), fit_score(tonumber(ARGV[11]), tonumber(ARGV[12])), id)
  end
  emit_change(KEYS[1], {kind = 'device', device_id = id, name = ARGV[5], pool = pool, model = ARGV[7],
    host = ARGV[8], adb_host = ARGV[9], adb_port = tonumber(ARGV[10]), cpu_cores = tonumber(ARGV[11]),
    memory_mb = tonumber(ARGV[12]), storage_mb = tonumber(ARGV[13]), status = status,
    version = version, at_ms = now})
  return version
elseif op == 'quota' then
  local uid = ARGV[4]
  local qkey = k_state(P, uid)
  local version = redis.call('HINCRBY', qkey, 'version', 1)
  redis.call('HSET', qkey, 'status', ARGV[5], 'expires_at_ms', ARGV[6], 'max_devices', ARGV[7],
    'max_cpu_per_device', ARGV[8], 'max_memory_mb_per_device', ARGV[9], 'total_cpu_cores', ARGV[10],
    'total_memory_gb', ARGV[11], 'total_storage_gb', ARGV[12])
  redis.call('SADD', P .. ':users', uid)
  emit_change(KEYS[1], {kind = 'quota', user_id = uid, status = ARGV[5],
    expires_at_ms = ARGV[6] ~= '' and tonumber(ARGV[6]) or cjson.null, max_devices = tonumber(ARGV[7]),
    max_cpu_per_device = tonumber(ARGV[8]), max_memory_mb_per_device = tonumber(ARGV[9]),
    total_cpu_cores = tonumber(ARGV[10]), total_memory_gb = tonumber(ARGV[11]),
    total_storage_gb = tonumber(ARGV[12]), version = version, at_ms = now})
  return version
end
return redis.error_reply('unknown op ' .. tostring(op))
