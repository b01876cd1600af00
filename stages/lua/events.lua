-- events: apply a batch of events from other systems (device, user, billing), record
-- the changes they cause and ack the batch, in one atomic step.
-- KEY: events, changes, dead (streams).
-- CALL: schemas.rows.EventsCall (prefix, group, now_ms, event_ttl_s, released_ttl_s,
-- payment_failure_ttl_s, payment_failure_threshold, quota_defaults, items); each item
-- one row, by op:
--   device: a device.* event (type, event_id, version, device_id, the type's fields)
--   user:   a user.* or billing.* event (type, event_id, version, user_id, its fields)
--   dead:   a dead letter to add (letter): an event that did not decode
-- Keys, every one named from the row: a device event touches the device's {pool} keys
-- (its hash, its free pool, the devices set, the allocation it holds) and the {u:ID}
-- hash of that allocation's user, named from the allocation (as a release does); a user
-- event touches the user's {u:ID} keys (its hash, event ids, payment-failure count) and
-- the {pool} keys of the allocations listed in that hash (and their devices).
-- Guarantees, per event:
-- * Once: its event id is kept (P:{pool}:evt:<id>, P:{u:ID}:evt:<id>, event_ttl_s); an
--   id seen before changes nothing ('duplicate').
-- * In order: a version not above the last applied one of its sequence (the device's
--   event_version; the user's user_event_version for user.*, billing_event_version for
--   billing.*) changes nothing ('stale'); an event without a version is not ordered.
-- * Newest observation wins for billing's ok/overdue part: billing.overdue,
--   billing.payment_success, billing.recharged (their occurred_at_ms) and billing.standing
--   (its observed_at_ms) keep the newest such time in the user's billing_observed_ms; a
--   billing.standing older than it changes nothing ('stale'). A standing sets the part
--   to ok or overdue, keeps a 'suspended' (failed payments: only payment events lift it)
--   and ends no allocation.
-- * An event for a device or user the scheduler does not know changes nothing
--   ('ignored'); user.quota_updated and device.created create what they name.
-- * Every allocation it ends is closed by close_allocation, exactly as a release closes
--   one (exact seconds, usage given back, the change recorded), with its EndReason.
-- * Replacement instead of loss: an allocation whose request said replace_on_failure
--   (its hash has replace_on_failure) whose device goes down (failed, deleted,
--   maintenance, stopped, error) moves, in this same step, to an equivalent free device:
--   same pool, model, CPU, memory and storage (its fit score in the pool's free set,
--   then model and storage checked), so the user's usage is unchanged. The allocation
--   keeps its id, user, allocated-at and expires-at (billed as one allocation when it
--   ends); its device_id and version change (AllocationReplaced); the new device is
--   held, the old one, down, keeps it as last_alloc (a release by the old device id
--   answers not_found); the request's stored answer names the new device. Only when no
--   equivalent device is free is the allocation ended with the reason. The keys it
--   touches are named from the allocation (pool, request id, user): {pool} keys and the
--   user's {u:ID} stored answer.
-- * A device that comes up free (device.created, running) is offered to the wait queue
--   (common.lua) in this same step, as a device a release frees.
-- * Its effect on the entity is recorded as one change (DeviceEventApplied or
--   UserEventApplied: the entity's whole record, a new version) for persist and notify.
-- Returns {statuses, reasons, replaced}: one status per row (applied, stale, duplicate,
-- ignored, dead), the allocations closed and those moved to another device, each as flat
-- pairs (reason, count).
local P, group, now = CALL.prefix, CALL.group, CALL.now_ms
local event_ttl, released_ttl = CALL.event_ttl_s, CALL.released_ttl_s
local changes = KEY.changes

local closed_by = {}  -- EndReason -> allocations closed in this call
local replaced_by = {}  -- EndReason -> allocations moved to an equivalent device

local function end_allocation(aid, reason)
  local rec = close_allocation(P, changes, aid, now, 'released', now, released_ttl, nil, reason)
  if rec then closed_by[reason] = (closed_by[reason] or 0) + 1 end
  return rec
end

-- --- devices -------------------------------------------------------------------------

-- What a device event does to the device: the status it takes and the EndReason of the
-- allocation it ends (nil: the device comes up, its allocation is kept).
local DOWN = {
  ['device.failed'] = {'failed', 'device_failed'},
  ['device.deleted'] = {'deleted', 'device_deleted'},
  ['device.maintenance'] = {'maintenance', 'device_maintenance'},
}
local STATUS_DOWN = {stopped = {'stopped', 'device_stopped'}, error = {'error', 'device_error'}}

local DEVICE_RECORD = {'name', 'pool', 'model', 'host', 'adb_host', 'adb_port', 'cpu_cores',
  'memory_mb', 'storage_mb', 'status'}

-- DeviceEventApplied: the device's record as it is now, and what notify announces;
-- `rec` is the change of the allocation the event ended or moved (AllocationReplaced).
local function device_event_change(row, id, previous, version, rec)
  local d = redis.call('HMGET', k_pool(P, 'dev:' .. id), unpack(DEVICE_RECORD))
  return {kind = 'device_event', device_id = id, name = d[1], pool = d[2], model = d[3],
    host = d[4], adb_host = d[5], adb_port = tonumber(d[6]), cpu_cores = tonumber(d[7]),
    memory_mb = tonumber(d[8]), storage_mb = tonumber(d[9]), status = d[10],
    version = version, at_ms = now, event = row.type, event_id = row.event_id,
    previous_status = opt(previous), reason = opt(row.reason), info = opt(row.info),
    expected_end_ms = opt(row.expected_end_ms),
    allocation_id = rec and rec.allocation_id or cjson.null,
    user_id = rec and rec.user_id or cjson.null,
    replacement_device_id = rec and rec.kind == 'allocation_replaced' and rec.device_id
      or cjson.null}
end

-- --- replacement instead of loss -----------------------------------------------------

local REPLACE_PAGE = 16
-- What a move reads of the allocation: the flag, its status, then what its change needs.
local MOVE_FIELDS = {'replace_on_failure', 'status', 'user_id', 'tenant_id', 'request_id',
  'allocated_at_ms', 'expires_at_ms', 'duration_minutes', 'cpu_cores', 'memory_mb',
  'storage_mb', 'pool', 'version'}

-- A free device equivalent to the one going down: in the allocation's pool, with its
-- exact fit score (CPU and memory), its model and its storage. Returns the id and its
-- name, adb_host, adb_port; nil when none is free. Reads the devices of that one score.
-- A device booked before `until_ms` (the allocation's expires-at) is passed over
-- (reservations: booking_in, common.lua).
local function equivalent_free(pool, model, cpu, mem, sto, until_ms)
  local key, score = k_pool(P, 'free:' .. pool), fit_score(cpu, mem)
  local offset = 0
  while true do
    local page = redis.call('ZRANGEBYSCORE', key, score, score, 'LIMIT', offset, REPLACE_PAGE)
    for _, cand in ipairs(page) do
      local d = redis.call('HMGET', k_pool(P, 'dev:' .. cand), 'model', 'storage_mb', 'name',
        'adb_host', 'adb_port', 'host')
      if d[1] == model and tonumber(d[2]) == sto and not booking_in(P, cand, now, until_ms) then
        return cand, d
      end
    end
    if #page < REPLACE_PAGE then return nil end
    offset = offset + REPLACE_PAGE
  end
end

-- AllocationReplaced: the allocation as it is after the move, and what notify announces.
local function allocation_replaced_change(aid, a, new_id, version, old_id, d, reason, row)
  local rec = allocation_change(aid, new_id, a[3], a[4], a[5], 'allocated', tonumber(a[6]),
    tonumber(a[7]), tonumber(a[8]), tonumber(a[9]), tonumber(a[10]), tonumber(a[11]), a[12],
    version, now, nil, nil, nil)
  rec.kind, rec.replace_on_failure = 'allocation_replaced', true
  rec.previous_device_id, rec.device_name = old_id, d[3]
  rec.adb_host, rec.adb_port = d[4], tonumber(d[5])
  rec.replace_reason, rec.event, rec.event_id = reason, row.type, row.event_id
  return rec
end

-- Move the allocation `aid` off device `old_id` (already down and out of its pool) to an
-- equivalent free device, if it asked for that and one is free; returns the change, or
-- nil (the caller then ends it).
local function replace_allocation(aid, old_id, reason, row)
  local akey = k_pool(P, 'alloc:' .. aid)
  local a = redis.call('HMGET', akey, unpack(MOVE_FIELDS))
  if not a[1] or a[2] ~= 'allocated' then return nil end
  local sto = tonumber(a[11])
  local old = redis.call('HMGET', k_pool(P, 'dev:' .. old_id), 'model', 'host')
  local new_id, d = equivalent_free(a[12], old[1], tonumber(a[9]), tonumber(a[10]), sto,
    tonumber(a[7]))
  if not new_id then return nil end
  -- the allocation now counts on the new device's host (written by flush_stats)
  host_active_add(P, old[2], -1)
  host_active_add(P, d[6], 1)
  redis.call('ZREM', k_pool(P, 'free:' .. a[12]), new_id)
  redis.call('HSET', k_pool(P, 'dev:' .. new_id), 'status', 'allocated', 'alloc', aid)
  redis.call('HSET', k_pool(P, 'dev:' .. old_id), 'alloc', '', 'last_alloc', aid)
  local version = tonumber(a[13]) + 1
  redis.call('HSET', akey, 'device_id', new_id, 'version', version)
  -- a retried request (same request id) is answered with the allocation as it is now
  local answer_key = k_user(P, a[3], 'req:' .. a[5])
  local stored = redis.call('GET', answer_key)
  if stored then
    local answer = cjson.decode(stored)
    if answer.type == 'allocated' and answer.allocation_id == aid then
      answer.device = {id = new_id, name = d[3], status = 'allocated'}
      answer.adb_host, answer.adb_port = d[4], tonumber(d[5])
      redis.call('SET', answer_key, cjson.encode(answer), 'KEEPTTL')
    end
  end
  replaced_by[reason] = (replaced_by[reason] or 0) + 1
  local rec = allocation_replaced_change(aid, a, new_id, version, old_id, d, reason, row)
  emit_change(changes, rec)
  return rec
end

local function apply_device(row)
  local id, t = row.device_id, row.type
  local dkey = k_pool(P, 'dev:' .. id)
  local d = redis.call('HMGET', dkey, 'status', 'alloc', 'event_version', 'pool', 'host')
  local status, alloc, pool = d[1], d[2] or '', d[4]
  if not status and t ~= 'device.created' then return 'ignored' end
  if row.version and d[3] and row.version <= tonumber(d[3]) then return 'stale' end
  if row.version then redis.call('HSET', dkey, 'event_version', row.version) end
  local down = DOWN[t] or (t == 'device.status_changed' and STATUS_DOWN[row.status])
  local rec = nil
  if down then
    -- out of the pool first, so that closing its allocation does not put it back
    redis.call('HSET', dkey, 'status', down[1])
    redis.call('ZREM', k_pool(P, 'free:' .. pool), id)
    -- listed unless deleted: the newest event alone says whether the device exists
    if t == 'device.deleted' then
      moves().unlist(P, id)
    else
      moves().list(P, id)
    end
    if alloc ~= '' then
      rec = replace_allocation(alloc, id, down[2], row) or end_allocation(alloc, down[2])
    end
  else
    if t == 'device.created' then
      if pool and pool ~= row.pool then redis.call('ZREM', k_pool(P, 'free:' .. pool), id) end
      if alloc ~= '' and d[5] ~= row.host then  -- a held device moves host
        moves().host_now(P, d[5], -1)
        moves().host_now(P, row.host, 1)
      end
      pool = row.pool
      redis.call('HSET', dkey, 'id', id, 'name', row.name or id, 'pool', pool,
        'model', row.model, 'host', row.host, 'adb_host', row.adb_host,
        'adb_port', row.adb_port, 'cpu_cores', row.cpu_cores, 'memory_mb', row.memory_mb,
        'storage_mb', row.storage_mb, 'alloc', alloc)
      redis.call('SADD', k_pool(P, 'pools'), pool)
    end
    -- up (running or created): available, unless it holds an active allocation
    if alloc ~= '' then
      redis.call('HSET', dkey, 'status', 'allocated')
    else
      local size = redis.call('HMGET', dkey, 'cpu_cores', 'memory_mb')
      redis.call('HSET', dkey, 'status', 'available')
      redis.call('ZADD', k_pool(P, 'free:' .. pool), fit_score(tonumber(size[1]), tonumber(size[2])),
        id)
    end
    moves().list(P, id)
    -- free again: the first waiter it fits gets it, in this step
    if alloc == '' then offer_device(P, changes, now, id) end
  end
  local version = redis.call('HINCRBY', dkey, 'version', 1)
  emit_change(changes, device_event_change(row, id, status, version, rec))
  return 'applied'
end

-- --- users -------------------------------------------------------------------------

-- The allocations of a user, oldest first (by allocated-at, then id): the 'alloc:<id>'
-- fields of the user's hash; each allocated-at read from the allocation it names.
local function allocations_oldest_first(uid)
  local names = redis.call('HKEYS', k_state(P, uid))
  local list = {}
  for _, f in ipairs(names) do
    if string.sub(f, 1, 6) == 'alloc:' then
      local aid = string.sub(f, 7)
      local at = tonumber(redis.call('HGET', k_pool(P, 'alloc:' .. aid), 'allocated_at_ms')) or 0
      list[#list + 1] = {aid, at}
    end
  end
  table.sort(list, function(x, y)
    if x[2] ~= y[2] then return x[2] < y[2] end
    return x[1] < y[1]
  end)
  return list
end

local function release_all(uid, reason)
  local n = 0
  for _, a in ipairs(allocations_oldest_first(uid)) do
    if end_allocation(a[1], reason) then n = n + 1 end
  end
  return n
end

-- End the oldest allocations until the user's usage (holds of requests in flight
-- included) is within the device count and the CPU, memory and storage totals.
local function release_excess(uid, reason)
  local q = redis.call('HMGET', k_state(P, uid), 'max_devices', 'total_cpu_cores',
    'total_memory_gb', 'total_storage_gb')
  local max_dev, max_cpu = tonumber(q[1]) or 0, tonumber(q[2]) or 0
  local max_mem, max_sto = (tonumber(q[3]) or 0) * 1024, (tonumber(q[4]) or 0) * 1024
  local n = 0
  for _, a in ipairs(allocations_oldest_first(uid)) do
    local used = read_usage(P, uid)
    if used[1] <= max_dev and used[2] <= max_cpu and used[3] <= max_mem and used[4] <= max_sto then
      break
    end
    if end_allocation(a[1], reason) then n = n + 1 end
  end
  return n
end

-- The user's status from its two parts: the user service's (active, suspended, deleted,
-- or a status set by `quota set` such as expired) wins; then billing's block.
local function effective_status(user_status, billing_status)
  if user_status ~= 'active' then return user_status end
  if billing_status == 'overdue' or billing_status == 'suspended' then return billing_status end
  return 'active'
end

local QUOTA_LIMITS = {'max_devices', 'max_cpu_per_device', 'max_memory_mb_per_device',
  'total_cpu_cores', 'total_memory_gb', 'total_storage_gb'}
local QUOTA_RECORD = {'status', 'expires_at_ms', unpack(QUOTA_LIMITS)}

-- UserEventApplied: the user's quota record as it is now, and what notify announces.
-- It carries the parts events keep (user_status, billing_status, the event versions, the
-- payment-failure count and when it expires) for persist, so a rebuild restores them.
local EVENT_PARTS = {'user_status', 'billing_status', 'user_event_version',
  'billing_event_version'}
local function user_event_change(row, uid, previous, version, released, count)
  local q = redis.call('HMGET', k_state(P, uid), unpack(QUOTA_RECORD))
  local e = redis.call('HMGET', k_state(P, uid), unpack(EVENT_PARTS))
  local fkey = k_user(P, uid, 'payfail')
  local pay_n, pay_ttl = tonumber(redis.call('GET', fkey)) or 0, redis.call('PTTL', fkey)
  local failures = row.type == 'billing.payment_failed'
  return {kind = 'user_event', user_id = uid, status = q[1],
    user_status = opt(e[1]), billing_status = opt(e[2]),
    user_event_version = tonumber(e[3]) or cjson.null,
    billing_event_version = tonumber(e[4]) or cjson.null,
    payment_failures = pay_n,
    payment_failures_until_ms = (pay_n > 0 and pay_ttl > 0) and now + pay_ttl or cjson.null,
    expires_at_ms = (q[2] and q[2] ~= '') and tonumber(q[2]) or cjson.null,
    max_devices = tonumber(q[3]), max_cpu_per_device = tonumber(q[4]),
    max_memory_mb_per_device = tonumber(q[5]), total_cpu_cores = tonumber(q[6]),
    total_memory_gb = tonumber(q[7]), total_storage_gb = tonumber(q[8]),
    version = version, at_ms = now, event = row.type, event_id = row.event_id,
    previous_status = previous, reason = opt(row.reason), released_allocations = released,
    amount = opt(row.amount), days = opt(row.days), balance = opt(row.balance),
    failure_count = failures and count or cjson.null,
    failure_threshold = failures and CALL.payment_failure_threshold or cjson.null}
end

-- The events that speak about the ok/overdue part, with the time they observed it
-- (row.observed_at_ms: a standing's observed_at_ms, the others' occurred_at_ms), kept as
-- billing_observed_ms (the newest).
local OBSERVES = {['billing.overdue'] = true, ['billing.payment_success'] = true,
  ['billing.recharged'] = true, ['billing.standing'] = true}

local function apply_user(row)
  local uid, t = row.user_id, row.type
  local skey = k_state(P, uid)
  local family = string.sub(t, 1, 5) == 'user.' and 'user' or 'billing'
  local u = redis.call('HMGET', skey, 'status', family .. '_event_version', 'user_status',
    'billing_status', 'billing_observed_ms')
  local status = u[1]
  if not status and t ~= 'user.quota_updated' then return 'ignored' end
  if row.version and u[2] and row.version <= tonumber(u[2]) then return 'stale' end
  -- the ok/overdue part: the newest observation wins (a standing observed before the
  -- last billing event or standing applied changes nothing)
  local observed = tonumber(u[5])
  if t == 'billing.standing' and observed and row.observed_at_ms < observed then
    return 'stale'
  end
  -- the two parts of the status, read from the status itself when no event set them yet
  local user_status = u[3] or ((status and status ~= 'overdue') and status or 'active')
  local billing_status = u[4] or (status == 'overdue' and 'overdue' or 'ok')
  local release, excess, count = nil, nil, nil
  if t == 'user.deleted' then
    user_status, release = 'deleted', 'user_deleted'
  elseif t == 'user.suspended' then
    user_status, release = 'suspended', 'user_suspended'
  elseif t == 'user.activated' then
    user_status = 'active'
  elseif t == 'user.quota_updated' then
    local defaults = CALL.quota_defaults
    local pairs_ = {}
    for _, f in ipairs(QUOTA_LIMITS) do
      local v = row[f]
      if not v and not status then v = defaults[f] end
      if v then pairs_[#pairs_ + 1] = f; pairs_[#pairs_ + 1] = v end
    end
    if row.expires_at_ms then
      pairs_[#pairs_ + 1] = 'expires_at_ms'; pairs_[#pairs_ + 1] = row.expires_at_ms
    elseif not status then
      pairs_[#pairs_ + 1] = 'expires_at_ms'; pairs_[#pairs_ + 1] = ''
    end
    if #pairs_ > 0 then redis.call('HSET', skey, unpack(pairs_)) end
    if not status then redis.call('SADD', P .. ':users', uid) end
    excess = 'quota_reduced'
  elseif t == 'user.quota_exceeded' then
    excess = 'quota_exceeded'
  elseif t == 'billing.payment_failed' then
    local fkey = k_user(P, uid, 'payfail')
    count = redis.call('INCR', fkey)
    redis.call('EXPIRE', fkey, CALL.payment_failure_ttl_s)
    if count >= CALL.payment_failure_threshold then
      billing_status, release = 'suspended', 'payment_failed'
    end
  elseif t == 'billing.overdue' then
    billing_status, release = 'overdue', 'billing_overdue'
  elseif t == 'billing.payment_success' or t == 'billing.recharged' then
    redis.call('DEL', k_user(P, uid, 'payfail'))
    billing_status = 'ok'
  elseif t == 'billing.standing' then
    -- the service's answer: ok or overdue; ends nothing; a suspension (failed payments)
    -- is the payment events' to lift
    if billing_status ~= 'suspended' then billing_status = row.status end
  end
  -- billing.balance_low: nothing but the notice
  local fields = {'user_status', user_status, 'billing_status', billing_status,
    'status', effective_status(user_status, billing_status)}
  if OBSERVES[t] and (not observed or row.observed_at_ms > observed) then
    fields[#fields + 1] = 'billing_observed_ms'; fields[#fields + 1] = row.observed_at_ms
  end
  if row.version then
    fields[#fields + 1] = family .. '_event_version'; fields[#fields + 1] = row.version
  end
  redis.call('HSET', skey, unpack(fields))
  local released = 0
  if release then
    released = release_all(uid, release)
  elseif excess then
    released = release_excess(uid, excess)
  end
  local version = redis.call('HINCRBY', skey, 'version', 1)
  emit_change(changes, user_event_change(row, uid, status or 'active', version, released, count))
  return 'applied'
end

-- --- the batch -----------------------------------------------------------------------

-- Apply one event once: its id is kept whatever the outcome, so a redelivery is a
-- 'duplicate'.
local function once(idem_key, apply, row)
  if redis.call('EXISTS', idem_key) == 1 then return 'duplicate' end
  local outcome = apply(row)
  redis.call('SET', idem_key, outcome, 'EX', event_ttl)
  return outcome
end

local statuses = {}
local acks = each_row(CALL.items, {
  device = function(row)
    statuses[#statuses + 1] = once(k_pool(P, 'evt:' .. row.event_id), apply_device, row)
  end,
  user = function(row)
    statuses[#statuses + 1] = once(k_user(P, row.user_id, 'evt:' .. row.event_id), apply_user, row)
  end,
  dead = function(row)
    redis.call('XADD', KEY.dead, '*', 'd', row.letter)
    statuses[#statuses + 1] = 'dead'
  end,
})
ack_all(KEY.events, group, acks)
flush_stats(P)
local function flat(counts)
  local out = {}
  for reason, n in pairs(counts) do
    out[#out + 1] = reason
    out[#out + 1] = n
  end
  return out
end
return {statuses, flat(closed_by), flat(replaced_by)}
