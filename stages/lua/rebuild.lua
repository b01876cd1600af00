-- rebuild: write one chunk of the live state loaded from PostgreSQL (devsched rebuild).
-- KEY: users (the set of users with a quota), stats (the pool's counters); every other key
-- is named from the prefix and the items:
--   {pool}: alloc:<id>, expiry, dev:<id>, free:<pool>, pools, devices, host_active (each held
--           device counts once for its host)
--   {pool}: queue, waiters, queue_deadline, wq:<class>, wq_classes (the wait queue,
--           common.lua), with a user's waiters
--   {u:ID}: user (the user's hash), req:<request id> (a stored answer), payfail
--   {jobs}: job:<name> (a tracked job's hash), and KEY.jobs_known
-- KEY.changes: a device written free is offered to the restored queue (offer_device),
-- exactly as a release offers one: a waiter served or timed out is answered and recorded.
-- CALL: schemas.rows.RebuildCall: prefix, now_ms, then any of stats, jobs, allocations,
-- answers, users (with their waiting requests and the fields events keep), reservations,
-- devices (each item a Struct of schemas/rows.py, read by name).
-- Reservations (booked or active) add {pool}: rsv:<id>, bookings:<device>, booked,
-- rsv_starts, rsv_active, rsv_grace.
-- Every item replaces what its keys held, so a second run writes the same state. The
-- caller sends the kinds in the order stats, jobs, allocations, answers, users,
-- reservations, devices (a device written free is offered to the waiters only once the
-- bookings it must respect are back): a worker serving
-- meanwhile never finds a free device that an allocation holds, nor a quota without its
-- usage, since each user and device appears whole, after the allocations it depends on;
-- and an allocation the timers expire between two calls is counted by neither its user
-- nor its device (both read it from Redis in their own call).
local P = CALL.prefix

local function active(aid)
  return aid and aid ~= '' and
    redis.call('HGET', k_pool(P, 'alloc:' .. aid), 'status') == 'allocated'
end

-- An active allocation whole; a closed one as close_allocation leaves it (common.lua).
local function write_allocation(a)
  local akey = k_pool(P, 'alloc:' .. a.allocation_id)
  redis.call('DEL', akey)
  if a.status == 'allocated' then
    redis.call('HSET', akey, 'device_id', a.device_id, 'user_id', a.user_id,
      'tenant_id', a.tenant_id or '', 'request_id', a.request_id, 'status', a.status,
      'allocated_at_ms', a.allocated_at_ms, 'expires_at_ms', a.expires_at_ms,
      'duration_minutes', a.duration_minutes, 'cpu_cores', a.cpu_cores,
      'memory_mb', a.memory_mb, 'storage_mb', a.storage_mb, 'pool', a.pool,
      'version', a.version)
    if a.replace_on_failure then redis.call('HSET', akey, 'replace_on_failure', 1) end
    redis.call('ZADD', k_pool(P, 'expiry'), a.expires_at_ms, a.allocation_id)
  else
    redis.call('HSET', akey, 'device_id', a.device_id, 'user_id', a.user_id,
      'status', a.status, 'released_at_ms', a.released_at_ms,
      'duration_seconds', a.duration_seconds, 'version', a.version,
      'end_reason', a.end_reason or a.status)
    redis.call('EXPIRE', akey, a.ttl_s)
    redis.call('ZREM', k_pool(P, 'expiry'), a.allocation_id)
  end
end

local function write_answer(a)
  redis.call('SET', k_user(P, a.user_id, 'req:' .. a.request_id), a.answer,
    'EX', a.ttl_s)
end

local function write_user(u)
  local key = k_state(P, u.user_id)
  redis.call('DEL', key)
  local q = u
  if q.status then
    redis.call('HSET', key, 'status', q.status, 'expires_at_ms', q.expires_at_ms or '',
      'max_devices', q.max_devices, 'max_cpu_per_device', q.max_cpu_per_device,
      'max_memory_mb_per_device', q.max_memory_mb_per_device,
      'total_cpu_cores', q.total_cpu_cores, 'total_memory_gb', q.total_memory_gb,
      'total_storage_gb', q.total_storage_gb, 'version', q.version)
    redis.call('SADD', KEY.users, u.user_id)
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
  -- the waiting requests: each holds its hold again (one device and its "cpu mem sto")
  for _, w in ipairs(u.waiters or {}) do
    local h_cpu, h_mem, h_sto = string.match(w.hold, '^(%-?%d+) (%-?%d+) (%-?%d+)$')
    redis.call('HSET', key, 'hold:' .. w.request_id, w.hold)
    used = {used[1] + 1, used[2] + tonumber(h_cpu), used[3] + tonumber(h_mem),
      used[4] + tonumber(h_sto)}
  end
  add_usage(P, u.user_id, {0, 0, 0, 0}, used[1], used[2], used[3], used[4])
  if u.last_device then
    redis.call('HSET', key, 'last_device', u.last_device, 'last_host', u.last_host or '')
  end
  -- what events keep: the two parts of the status, the event versions, failed payments
  for _, f in ipairs({'user_status', 'billing_status', 'user_event_version',
                      'billing_event_version'}) do
    if u[f] then redis.call('HSET', key, f, u[f]) end
  end
  local fkey = k_user(P, u.user_id, 'payfail')
  redis.call('DEL', fkey)
  if u.payment_failures and u.payment_failures > 0 and u.payment_failures_ttl_ms then
    redis.call('SET', fkey, u.payment_failures, 'PX', u.payment_failures_ttl_ms)
  end
  -- then into the queue, in the place each had (not recorded again: PostgreSQL has it)
  for _, w in ipairs(u.waiters or {}) do
    local record = queue().record(w, w.priority, w.queued_at_ms, w.wait_until_ms, w.idem_ttl,
      w.reply_ttl)
    queue().join(P, nil, CALL.now_ms, queue_member(w.user_id, w.request_id), w.queue_score,
      cjson.decode(record), record)
  end
end

-- A tracked job's hash (jobs.lua) as job_info keeps it, without a claim.
local function write_job(j)
  local key = P .. ':{jobs}:job:' .. j.name
  redis.call('DEL', key)
  redis.call('HSET', key, 'interval_ms', j.interval_ms, 'next_run_ms', j.next_run_ms,
    'paused', j.paused and '1' or '0', 'running', '', 'retries', '0',
    'max_retries', j.max_retries, 'timeout_ms', j.timeout_ms, 'status', j.status)
  if j.last_run_ms then redis.call('HSET', key, 'last_run_ms', j.last_run_ms) end
  redis.call('SADD', KEY.jobs_known, j.name)
end

local function write_device(d)
  local dkey = k_pool(P, 'dev:' .. d.device_id)
  local old = redis.call('HMGET', dkey, 'pool', 'alloc', 'host')
  if old[1] then redis.call('ZREM', k_pool(P, 'free:' .. old[1]), d.device_id) end
  if old[2] and old[2] ~= '' then moves().host_now(P, old[3], -1) end  -- replaced below
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
  if holder ~= '' then moves().host_now(P, d.host, 1) end
  if d.last_allocation_id then
    redis.call('HSET', dkey, 'last_alloc', d.last_allocation_id)
  end
  local free = k_pool(P, 'free:' .. d.pool)
  if status == 'available' then
    redis.call('ZADD', free, fit_score(d.cpu_cores, d.memory_mb), d.device_id)
  else
    redis.call('ZREM', free, d.device_id)
  end
  redis.call('SADD', k_pool(P, 'pools'), d.pool)
  moves().list(P, d.device_id)
  -- free, it goes to the first restored waiter it fits (the users came first)
  if status == 'available' then offer_device(P, KEY.changes, CALL.now_ms, d.device_id) end
end

-- A booked or active reservation (bookings.lua): its hash, its booking of the device (the
-- device's count set from its bookings, so a second run counts the same), and its place in
-- the timers' schedules; an active one's allocation, when active here, is marked as the
-- reservation's (a renewal of it claims the reservation). Sent after the allocations.
local RSV_HASH = {'reservation_id', 'request_id', 'user_id', 'tenant_id', 'device_id', 'pool',
  'start_ms', 'end_ms', 'status', 'allocation_id', 'created_at_ms', 'claimed_at_ms',
  'claim_by_ms', 'version'}
local function write_reservation(r)
  local key = k_pool(P, 'rsv:' .. r.reservation_id)
  redis.call('DEL', key)
  local flat = {}
  for _, f in ipairs(RSV_HASH) do
    flat[#flat + 1], flat[#flat + 2] = f, r[f] or ''
  end
  redis.call('HSET', key, unpack(flat))
  local bookings = k_pool(P, 'bookings:' .. r.device_id)
  redis.call('ZADD', bookings, r.start_ms, r.reservation_id)
  redis.call('HSET', k_pool(P, 'booked'), r.device_id, redis.call('ZCARD', bookings))
  if r.status == 'booked' then
    redis.call('ZADD', k_pool(P, 'rsv_starts'), r.start_ms, r.reservation_id)
  else
    redis.call('ZADD', k_pool(P, 'rsv_active'), r.end_ms, r.reservation_id)
    if not r.claimed_at_ms then
      redis.call('ZADD', k_pool(P, 'rsv_grace'), r.claim_by_ms or 0, r.reservation_id)
    end
    if active(r.allocation_id) then
      redis.call('HSET', k_pool(P, 'alloc:' .. r.allocation_id), 'reservation_id',
        r.reservation_id)
    end
  end
end

local written = 0
if CALL.stats then
  local s = CALL.stats
  redis.call('DEL', KEY.stats)
  for _, name in ipairs({'allocated', 'released', 'expired'}) do
    if s[name] > 0 then redis.call('HSET', KEY.stats, name, s[name]) end
  end
  written = written + 1
end
for _, part in ipairs({{CALL.jobs, write_job}, {CALL.allocations, write_allocation},
                       {CALL.answers, write_answer}, {CALL.users, write_user},
                       {CALL.reservations, write_reservation}, {CALL.devices, write_device}}) do
  for _, item in ipairs(part[1] or {}) do
    part[2](item)
    written = written + 1
  end
end
flush_stats(P)  -- what serving a waiter counted
return written
