-- admin: add or update a device, or set a user's quota, and record the change.
-- KEY: changes (stream), state (the state marker, {pool}).
-- CALL: schemas.rows.AdminCall (prefix, now_ms, and one of device: a
-- schemas.messages.DeviceSpec with its name set, quota: a QuotaSpec).
-- A device that is allocated keeps its allocation; its new size applies from its next
-- allocation. A device an event took down (failed, maintenance, ...) stays down; a deleted
-- one is added again. Each call bumps the entity's version, so the write-behind keeps the newest.
-- A device added or updated free is offered to the wait queue (common.lua).
-- Returns the new version. Refused (an error starting NOSTATE) when the state marker
-- (KEY.state) has no epoch: a device added to a Redis that lost its state would be free
-- while PostgreSQL may show it held (stages/state.py).

-- The changes only admin records (the other messages are built in common.lua).
-- DeviceUpserted, from the DeviceSpec row `dev`.
local function device_change(dev, status, version, now)
  return {kind = 'device', device_id = dev.id, name = dev.name, pool = dev.pool,
    model = dev.model, host = dev.host, adb_host = dev.adb_host, adb_port = dev.adb_port,
    cpu_cores = dev.cpu_cores, memory_mb = dev.memory_mb, storage_mb = dev.storage_mb,
    status = status, version = version, at_ms = now}
end

-- QuotaSet, from the QuotaSpec row `q`.
local function quota_change(q, version, now)
  return {kind = 'quota', user_id = q.user_id, status = q.status,
    expires_at_ms = q.expires_at_ms or cjson.null,
    max_devices = q.max_devices, max_cpu_per_device = q.max_cpu_per_device,
    max_memory_mb_per_device = q.max_memory_mb_per_device, total_cpu_cores = q.total_cpu_cores,
    total_memory_gb = q.total_memory_gb, total_storage_gb = q.total_storage_gb,
    version = version, at_ms = now}
end

if redis.call('HEXISTS', KEY.state, 'epoch') == 0 then
  return redis.error_reply('NOSTATE no state marker at ' .. KEY.state)
end
local P, now = CALL.prefix, CALL.now_ms
local dev, q = CALL.device, CALL.quota
if dev then
  local id, pool = dev.id, dev.pool
  local dkey = k_pool(P, 'dev:' .. id)
  local old = redis.call('HMGET', dkey, 'status', 'pool', 'alloc', 'host')
  if old[2] and old[2] ~= pool then redis.call('ZREM', k_pool(P, 'free:' .. old[2]), id) end
  if old[3] and old[3] ~= '' and old[4] ~= dev.host then  -- a held device moves host
    moves().host_now(P, old[4], -1)
    moves().host_now(P, dev.host, 1)
  end
  local version = redis.call('HINCRBY', dkey, 'version', 1)
  redis.call('HSET', dkey, 'id', id, 'name', dev.name, 'pool', pool, 'model', dev.model,
    'host', dev.host, 'adb_host', dev.adb_host, 'adb_port', dev.adb_port,
    'cpu_cores', dev.cpu_cores, 'memory_mb', dev.memory_mb, 'storage_mb', dev.storage_mb)
  local status = old[1] or 'available'
  if status == 'allocated' and (old[3] == nil or old[3] == '') then status = 'available' end
  if status == 'deleted' then status = 'available' end  -- added again after device.deleted
  redis.call('HSET', dkey, 'status', status)
  if not old[3] then redis.call('HSET', dkey, 'alloc', '') end
  redis.call('SADD', k_pool(P, 'pools'), pool)
  moves().list(P, id)
  if status == 'available' then
    redis.call('ZADD', k_pool(P, 'free:' .. pool), fit_score(dev.cpu_cores, dev.memory_mb), id)
  end
  emit_change(KEY.changes, device_change(dev, status, version, now))
  -- a free device goes to the first waiter it fits, in this step (after its own change)
  if status == 'available' then offer_device(P, KEY.changes, now, id) end
  flush_stats(P)
  return version
elseif q then
  local uid = q.user_id
  local qkey = k_state(P, uid)
  local version = redis.call('HINCRBY', qkey, 'version', 1)
  redis.call('HSET', qkey, 'status', q.status, 'expires_at_ms', q.expires_at_ms or '',
    'max_devices', q.max_devices, 'max_cpu_per_device', q.max_cpu_per_device,
    'max_memory_mb_per_device', q.max_memory_mb_per_device, 'total_cpu_cores', q.total_cpu_cores,
    'total_memory_gb', q.total_memory_gb, 'total_storage_gb', q.total_storage_gb)
  -- the status set here is the user's own again: the parts events keep (user_status,
  -- billing_status) are read from it anew by the next event
  redis.call('HDEL', qkey, 'user_status', 'billing_status')
  redis.call('SADD', P .. ':users', uid)
  emit_change(KEY.changes, quota_change(q, version, now))
  return version
end
return redis.error_reply('admin: a call names a device or a quota')
