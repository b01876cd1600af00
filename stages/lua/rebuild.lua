-- rebuild: write one chunk of the live state loaded from PostgreSQL (devsched rebuild).
-- KEYS: none; like the stage scripts, every key is named from the prefix and the items:
--   {pool}: stats, alloc:<id>, expiry, dev:<id>, free:<pool>, pools, devices
--   {u:ID}: user (the user's hash), req:<request id> (a stored answer); plus <prefix>:users
-- ARGV: 1 prefix, 2 kind, then one JSON object per item (fields by name, values as text):
--   stats:       {allocated, released, expired}: the pool's counters, set (not added to);
--                a zero is left out, as the counting scripts never write one.
--   allocations: {allocation_id, device_id, user_id, tenant_id, request_id, status,
--                 allocated_at_ms, expires_at_ms, duration_minutes, cpu_cores, memory_mb,
--                 storage_mb, pool, version, released_at_ms, duration_seconds, ttl_s}
--       the allocation's hash, as select and close_allocation write it. An active one goes
--       into the expiry schedule at its expires-at (one already past it is expired by the
--       next timer tick, billed to its expires-at); a closed one expires after ttl_s.
--   answers:     {user_id, request_id, answer, answer_ttl_s}
--       an allocation's reply, stored as its request id's answer for answer_ttl_s.
--   users:       {user_id, quota (absent when the user has none), allocations: [ids]}
--       the user's hash: the quota, and the usage recomputed from those of the listed
--       allocations that are active in Redis now, each with its alloc:<id> size.
--   devices:     {device_id, name, pool, model, host, adb_host, adb_port, cpu_cores,
--                 memory_mb, storage_mb, status, version, allocation_id, last_allocation_id}
--       the device's hash: held by allocation_id when that allocation is active in Redis
--       now, else in the given status (an available device goes into its pool's free set).
-- Every item replaces what its keys held, so a second run writes the same state. The
-- caller sends the kinds in the order stats, allocations, answers, users, devices: a worker serving
-- meanwhile never finds a free device that an allocation holds, nor a quota without its
-- usage, since each user and device appears whole, after the allocations it depends on;
-- and an allocation the timers expire between two calls is counted by neither its user
-- nor its device (both read it from Redis in their own call).
local P, kind = ARGV[1], ARGV[2]

local function active(aid)
  return aid ~= nil and aid ~= '' and
    redis.call('HGET', k_pool(P, 'alloc:' .. aid), 'status') == 'allocated'
end

local function write_allocation(a)
  local akey = k_pool(P, 'alloc:' .. a.allocation_id)
  redis.call('DEL', akey)
  redis.call('HSET', akey, 'device_id', a.device_id, 'user_id', a.user_id,
    'tenant_id', a.tenant_id, 'request_id', a.request_id, 'status', a.status,
    'allocated_at_ms', a.allocated_at_ms, 'expires_at_ms', a.expires_at_ms,
    'duration_minutes', a.duration_minutes, 'cpu_cores', a.cpu_cores, 'memory_mb', a.memory_mb,
    'storage_mb', a.storage_mb, 'pool', a.pool, 'version', a.version)
  if a.status == 'allocated' then
    redis.call('ZADD', k_pool(P, 'expiry'), tonumber(a.expires_at_ms), a.allocation_id)
  else
    redis.call('HSET', akey, 'released_at_ms', a.released_at_ms,
      'duration_seconds', a.duration_seconds)
    redis.call('EXPIRE', akey, tonumber(a.ttl_s))
    redis.call('ZREM', k_pool(P, 'expiry'), a.allocation_id)
  end
end

local function write_answer(a)
  redis.call('SET', k_user(P, a.user_id, 'req:' .. a.request_id), a.answer,
    'EX', tonumber(a.answer_ttl_s))
end

local function write_user(u)
  local key = k_state(P, u.user_id)
  redis.call('DEL', key)
  local q = u.quota
  if q then
    redis.call('HSET', key, 'status', q.status, 'expires_at_ms', q.expires_at_ms,
      'max_devices', q.max_devices, 'max_cpu_per_device', q.max_cpu_per_device,
      'max_memory_mb_per_device', q.max_memory_mb_per_device,
      'total_cpu_cores', q.total_cpu_cores, 'total_memory_gb', q.total_memory_gb,
      'total_storage_gb', q.total_storage_gb, 'version', q.version)
    redis.call('SADD', P .. ':users', u.user_id)
  end
  local used = {0, 0, 0, 0}
  for _, aid in ipairs(u.allocations) do
    if active(aid) then
      local s = redis.call('HMGET', k_pool(P, 'alloc:' .. aid), 'user_id', 'cpu_cores',
        'memory_mb', 'storage_mb')
      if s[1] == u.user_id then
        local cpu, mem, sto = tonumber(s[2]), tonumber(s[3]), tonumber(s[4])
        redis.call('HSET', key, 'alloc:' .. aid, cpu .. ' ' .. mem .. ' ' .. sto)
        used = {used[1] + 1, used[2] + cpu, used[3] + mem, used[4] + sto}
      end
    end
  end
  add_usage(P, u.user_id, {0, 0, 0, 0}, used[1], used[2], used[3], used[4])
end

local function write_device(d)
  local dkey = k_pool(P, 'dev:' .. d.device_id)
  local old_pool = redis.call('HGET', dkey, 'pool')
  if old_pool then redis.call('ZREM', k_pool(P, 'free:' .. old_pool), d.device_id) end
  redis.call('DEL', dkey)
  local holder, status = '', d.status
  if active(d.allocation_id) and
      redis.call('HGET', k_pool(P, 'alloc:' .. d.allocation_id), 'device_id') == d.device_id then
    holder, status = d.allocation_id, 'allocated'
  elseif status == 'allocated' then
    status = 'available'  -- as admin.lua: a device no active allocation holds is free
  end
  redis.call('HSET', dkey, 'id', d.device_id, 'name', d.name, 'pool', d.pool, 'model', d.model,
    'host', d.host, 'adb_host', d.adb_host, 'adb_port', d.adb_port, 'cpu_cores', d.cpu_cores,
    'memory_mb', d.memory_mb, 'storage_mb', d.storage_mb, 'status', status, 'alloc', holder,
    'version', d.version)
  if d.last_allocation_id ~= '' then
    redis.call('HSET', dkey, 'last_alloc', d.last_allocation_id)
  end
  local free = k_pool(P, 'free:' .. d.pool)
  if status == 'available' then
    redis.call('ZADD', free, fit_score(tonumber(d.cpu_cores), tonumber(d.memory_mb)), d.device_id)
  else
    redis.call('ZREM', free, d.device_id)
  end
  redis.call('SADD', k_pool(P, 'pools'), d.pool)
  redis.call('SADD', k_pool(P, 'devices'), d.device_id)
end

local writers = {allocations = write_allocation, answers = write_answer, users = write_user,
  devices = write_device}
if kind == 'stats' then
  local s = cjson.decode(ARGV[3])
  redis.call('DEL', k_pool(P, 'stats'))
  for _, name in ipairs({'allocated', 'released', 'expired'}) do
    if tonumber(s[name]) > 0 then redis.call('HSET', k_pool(P, 'stats'), name, s[name]) end
  end
  return 1
end
local write = writers[kind]
if not write then return redis.error_reply('unknown kind ' .. tostring(kind)) end
for i = 3, #ARGV do write(cjson.decode(ARGV[i])) end
return #ARGV - 2
