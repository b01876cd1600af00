-- reservations: one step of a reservations job, on the timers' ticks (stages/reservations.py).
-- KEY: changes (stream). CALL: schemas.rows.ReservationsCall (prefix, now_ms, op, limit,
-- grace_ms, released_ttl_s). Put after common.lua and bookings.lua; keys under {pool}.
-- op:
--   activate: each booked reservation whose start came (rsv_starts) becomes an allocation
--             held for its user on its device until its end (allocated now, expires at the
--             end; recorded, counted in the user's usage, expired by the expire job and
--             billed once like any allocation); it is then active, to be claimed by
--             now + grace_ms. An allocation still on the device past its expires-at (the
--             expire job not run yet this tick) is closed first, as expired at its
--             expires-at. A device still held (an allocation that ran on: a plain one
--             cannot have been admitted past the start, nor renewed into it) or down, ends
--             the reservation `cancelled` for `device_unavailable`; a user blocked since
--             (suspended, overdue, deleted) for that reason; one first seen after its end
--             `missed`.
--   no_show:  each active reservation not claimed by its deadline (rsv_grace) ends
--             `no_show`: its allocation is closed (released, reason no_show: billed for the
--             time it was held) and the device freed.
--   complete: each active reservation whose allocation ended (expired at its end, released,
--             ended by an event) ends `completed` at that allocation's end.
-- Each step is idempotent: a reservation leaves the schedule that chose it in the step that
-- handles it, and is handled only in the status the op expects. Returns {handled, seen}:
-- seen = limit means call again.
local P, now, changes = CALL.prefix, CALL.now_ms, KEY.changes
local B = bookings()
local read_reservation, save_reservation, reservation_change, end_reservation, uuid_of =
  B.read_reservation, B.save_reservation, B.reservation_change, B.end_reservation, B.uuid_of
local released_ttl, limit = CALL.released_ttl_s, CALL.limit

-- What activation reads of the device: 1 status, 2 allocation, 3 pool, 4 cpu, 5 memory,
-- 6 storage, 7 name, 8 adb host, 9 adb port, 10 host.
local ACTIVATE_FIELDS = {'status', 'alloc', 'pool', 'cpu_cores', 'memory_mb', 'storage_mb',
  'name', 'adb_host', 'adb_port', 'host'}

local function activate(rid)
  redis.call('ZREM', k_pool(P, 'rsv_starts'), rid)
  local r = read_reservation(P, rid)
  if not r or r.status ~= 'booked' then return false end
  local function cancel(reason)
    end_reservation(P, changes, now, released_ttl, r, 'cancelled', reason, now, nil)
    return true
  end
  if r.end_ms <= now then return cancel('missed') end
  local status = redis.call('HGET', k_state(P, r.user_id), 'status')
  local blocked = status and BLOCKED[status]
  if blocked then return cancel(blocked) end
  local dkey = k_pool(P, 'dev:' .. r.device_id)
  local d = redis.call('HMGET', dkey, unpack(ACTIVATE_FIELDS))
  if d[2] and d[2] ~= '' then
    local exp = tonumber(redis.call('HGET', k_pool(P, 'alloc:' .. d[2]), 'expires_at_ms'))
    if exp and exp <= now then
      close_allocation(P, changes, d[2], exp, 'expired', now, released_ttl, nil, 'expired')
      d = redis.call('HMGET', dkey, unpack(ACTIVATE_FIELDS))
    end
  end
  if d[1] ~= 'available' or (d[2] and d[2] ~= '') then return cancel('device_unavailable') end
  local aid = uuid_of('allocation/' .. rid)
  local uid, tenant, pool = r.user_id, r.tenant_id, d[3]
  local cpu, mem, sto = tonumber(d[4]), tonumber(d[5]), tonumber(d[6])
  local minutes = math.max(1, math.ceil((r.end_ms - now) / 60000))
  redis.call('ZREM', k_pool(P, 'free:' .. pool), r.device_id)
  redis.call('HSET', dkey, 'status', 'allocated', 'alloc', aid)
  redis.call('HSET', k_pool(P, 'alloc:' .. aid), 'device_id', r.device_id, 'user_id', uid,
    'tenant_id', tenant or '', 'request_id', r.request_id, 'status', 'allocated',
    'allocated_at_ms', now, 'expires_at_ms', r.end_ms, 'duration_minutes', minutes,
    'cpu_cores', cpu, 'memory_mb', mem, 'storage_mb', sto, 'pool', pool, 'version', 1,
    'reservation_id', rid)
  redis.call('ZADD', k_pool(P, 'expiry'), r.end_ms, aid)
  count_stat('allocated')
  host_active_add(P, d[10], 1)
  add_usage(P, uid, read_usage(P, uid), 1, cpu, mem, sto, 'alloc:' .. aid,
    cpu .. ' ' .. mem .. ' ' .. sto)
  emit_change(changes, allocation_change(aid, r.device_id, uid, tenant, r.request_id,
    'allocated', now, r.end_ms, minutes, cpu, mem, sto, pool, 1, now, nil, nil))
  r.status, r.allocation_id, r.claim_by_ms = 'active', aid, now + CALL.grace_ms
  r.version = r.version + 1
  save_reservation(P, r)
  redis.call('ZADD', k_pool(P, 'rsv_active'), r.end_ms, rid)
  redis.call('ZADD', k_pool(P, 'rsv_grace'), r.claim_by_ms, rid)
  local rec = reservation_change(r, now)
  rec.device_name, rec.adb_host, rec.adb_port = d[7], d[8], tonumber(d[9])
  emit_change(changes, rec)
  return true
end

local function no_show(rid)
  redis.call('ZREM', k_pool(P, 'rsv_grace'), rid)
  local r = read_reservation(P, rid)
  if not r or r.status ~= 'active' or r.claimed_at_ms then return false end
  local a = redis.call('HMGET', k_pool(P, 'alloc:' .. r.allocation_id), 'status',
    'expires_at_ms')
  if a[1] ~= 'allocated' then
    return false  -- its allocation ended already (released: the user was there): complete
  end
  -- held until now, or until its end when the expire job has not closed it yet
  end_reservation(P, changes, now, released_ttl, r, 'no_show', 'no_show',
    math.min(now, tonumber(a[2])), 'no_show')
  return true
end

local function complete(rid)
  local r = read_reservation(P, rid)
  if not r or r.status ~= 'active' then
    redis.call('ZREM', k_pool(P, 'rsv_active'), rid)
    return false
  end
  local a = redis.call('HMGET', k_pool(P, 'alloc:' .. r.allocation_id), 'status',
    'released_at_ms')
  if a[1] == 'allocated' then return false end
  end_reservation(P, changes, now, released_ttl, r, 'completed', nil,
    tonumber(a[2]) or now, nil)
  return true
end

local op = CALL.op
local ids
if op == 'activate' then
  ids = redis.call('ZRANGEBYSCORE', k_pool(P, 'rsv_starts'), '-inf', now, 'LIMIT', 0, limit)
elseif op == 'no_show' then
  ids = redis.call('ZRANGEBYSCORE', k_pool(P, 'rsv_grace'), '-inf', now, 'LIMIT', 0, limit)
elseif op == 'complete' then
  -- every active one (at most one per device): an allocation released early ends its
  -- reservation before the end, so the scan is not limited to the ones past their end
  ids = redis.call('ZRANGE', k_pool(P, 'rsv_active'), 0, -1)
else
  error('unknown reservations op ' .. tostring(op))
end
local step = ({activate = activate, no_show = no_show, complete = complete})[op]
local handled = 0
for _, rid in ipairs(ids) do
  if step(rid) then handled = handled + 1 end
end
flush_stats(P)
return {handled, op == 'complete' and 0 or #ids}
