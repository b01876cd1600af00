-- bookings: reservations of devices over an interval [start_ms, end_ms), shared by
-- select.lua (the reserve, cancel_reservation and claim_reservation rows) and
-- reservations.lua (the timers' jobs). Put after common.lua (booking_in, close_allocation,
-- offer_device, the reply and change builders).
-- Keys, all under {pool} (schemas/keys.py): rsv:<id> (the reservation's hash),
-- bookings:<device> (the device's reservations booked or active, scored by start),
-- booked (device -> how many), rsv_starts (booked ones by start), rsv_grace (active ones
-- not yet claimed, by their claim deadline), rsv_active (active ones by end).
-- What holds after every call: the bookings of a device never overlap each other, nor the
-- allocation that holds the device (reserve checks both in the step that books, and
-- plain allocations, waiters served and renewals avoid the bookings: select.lua,
-- common.lua); a booked or active reservation is in its device's bookings exactly once
-- and counted in `booked`; a booked one is in rsv_starts, an active one in rsv_active
-- (and in rsv_grace until claimed); an ended one (completed, cancelled, no_show) in none
-- of them, its hash expiring after released_ttl (PostgreSQL keeps it).
-- Each change of a reservation is emitted as a ReservationChange with its version one
-- higher; each request is answered once per request id (its answer kept, as select's).

-- Built on first use in a call (bookings()): a script runs its whole top level on every
-- call, closures included, so the reservation code costs the allocate/release path nothing
-- until a reservation row (or a renewal, a reservations job) needs it.
local bookings_lib = nil
local function bookings()
  if bookings_lib then return bookings_lib end
  -- The reservation's hash fields; the numbers among them are read as numbers.
  local RSV_FIELDS = {'reservation_id', 'request_id', 'user_id', 'tenant_id', 'device_id',
    'pool', 'start_ms', 'end_ms', 'status', 'allocation_id', 'reason', 'created_at_ms',
    'claimed_at_ms', 'claim_by_ms', 'ended_at_ms', 'version'}
  local RSV_NUMBERS = {start_ms = true, end_ms = true, created_at_ms = true,
    claimed_at_ms = true, claim_by_ms = true, ended_at_ms = true, version = true}

  -- The reservation `rid` as a table (absent fields nil), or nil when there is none.
  local function read_reservation(P, rid)
    local v = redis.call('HMGET', k_pool(P, 'rsv:' .. rid), unpack(RSV_FIELDS))
    if not v[1] then return nil end
    local r = {}
    for i, f in ipairs(RSV_FIELDS) do
      local x = v[i]
      if x and x ~= '' then r[f] = RSV_NUMBERS[f] and tonumber(x) or x end
    end
    return r
  end

  local function save_reservation(P, r)
    local flat = {}
    for _, f in ipairs(RSV_FIELDS) do
      flat[#flat + 1] = f
      flat[#flat + 1] = r[f] or ''
    end
    redis.call('HSET', k_pool(P, 'rsv:' .. r.reservation_id), unpack(flat))
  end

  -- ReservationChange (schemas/messages.py).
  local function reservation_change(r, now)
    return {kind = 'reservation', reservation_id = r.reservation_id, request_id = r.request_id,
      user_id = r.user_id, tenant_id = opt(r.tenant_id), device_id = r.device_id, pool = r.pool,
      start_ms = r.start_ms, end_ms = r.end_ms, status = r.status,
      allocation_id = opt(r.allocation_id), reason = opt(r.reason),
      created_at_ms = r.created_at_ms, claimed_at_ms = opt(r.claimed_at_ms),
      claim_by_ms = opt(r.claim_by_ms), ended_at_ms = opt(r.ended_at_ms), version = r.version,
      at_ms = now}
  end

  local function add_booking(P, r)
    redis.call('ZADD', k_pool(P, 'bookings:' .. r.device_id), r.start_ms, r.reservation_id)
    redis.call('HINCRBY', k_pool(P, 'booked'), r.device_id, 1)
    booked_n = nil  -- common.lua's count, read again at the next booking_in
  end

  -- Take the reservation out of its device's bookings and every schedule.
  local function drop_booking(P, r)
    if redis.call('ZREM', k_pool(P, 'bookings:' .. r.device_id), r.reservation_id) == 1 then
      if redis.call('HINCRBY', k_pool(P, 'booked'), r.device_id, -1) <= 0 then
        redis.call('HDEL', k_pool(P, 'booked'), r.device_id)
      end
      booked_n = nil
    end
    redis.call('ZREM', k_pool(P, 'rsv_starts'), r.reservation_id)
    redis.call('ZREM', k_pool(P, 'rsv_grace'), r.reservation_id)
    redis.call('ZREM', k_pool(P, 'rsv_active'), r.reservation_id)
  end

  -- End a booked or active reservation as `status` (completed, cancelled, no_show) for
  -- `reason` at `ended_at`. An active one's allocation, still held, is closed for
  -- `alloc_reason` (an EndReason) at `ended_at`, after its booking is dropped; a device left free is
  -- offered to the wait queue (the booking no longer keeps waiters off it).
  local function end_reservation(P, changes, now, released_ttl, r, status, reason, ended_at,
                                 alloc_reason)
    local was = r.status
    drop_booking(P, r)
    r.status, r.reason, r.ended_at_ms, r.version = status, reason, ended_at, r.version + 1
    save_reservation(P, r)
    redis.call('EXPIRE', k_pool(P, 'rsv:' .. r.reservation_id), released_ttl)
    emit_change(changes, reservation_change(r, now))
    if was == 'active' and alloc_reason and r.allocation_id and
        close_allocation(P, changes, r.allocation_id, ended_at, 'released', now, released_ttl,
          nil, alloc_reason) then
      return
    end
    offer_device(P, changes, now, r.device_id)
  end

  -- A UUID (version 5 layout) from the SHA-1 of `seed`.
  local UUID_VARIANT = {['0'] = '8', ['1'] = '9', ['2'] = 'a', ['3'] = 'b', ['4'] = '8',
    ['5'] = '9', ['6'] = 'a', ['7'] = 'b', ['8'] = '8', ['9'] = '9', a = 'a', b = 'b', c = '8',
    d = '9', e = 'a', f = 'b'}
  local function uuid_of(seed)
    local h = redis.sha1hex(seed)
    return string.sub(h, 1, 8) .. '-' .. string.sub(h, 9, 12) .. '-5' .. string.sub(h, 14, 16)
      .. '-' .. UUID_VARIANT[string.sub(h, 17, 17)] .. string.sub(h, 18, 20) .. '-'
      .. string.sub(h, 21, 32)
  end

  -- What reserve reads of a device: 1 pool, 2 status, 3 cpu, 4 memory, 5 storage, 6 model,
  -- 7 name, 8 the allocation holding it.
  local RSV_DEVICE_FIELDS = {'pool', 'status', 'cpu_cores', 'memory_mb', 'storage_mb', 'model',
    'name', 'alloc'}

  -- Whether device `dev` (`d` its RSV_DEVICE_FIELDS) is free over [s, e): no booking in it,
  -- and no allocation holding the device past s.
  local function free_over(P, dev, d, s, e)
    if booking_in(P, dev, s, e) then return false end
    if d[8] and d[8] ~= '' then
      local exp = tonumber(redis.call('HGET', k_pool(P, 'alloc:' .. d[8]), 'expires_at_ms'))
      if exp and exp > s then return false end
    end
    return true
  end

  -- Reserved: the answer to a booking.
  local function reserved_reply(rid, r, name)
    return cjson.encode({type = 'reserved', request_id = rid, reservation_id = r.reservation_id,
      user_id = r.user_id, device_id = r.device_id, device_name = name, pool = r.pool,
      start_ms = r.start_ms, end_ms = r.end_ms, status = r.status})
  end

  -- A reserve row (schemas.rows.ReserveRow). S: the call's P, now, changes, idem_ttl,
  -- reply_ttl, epoch. Checks the interval (end after start, start not past, at most
  -- max_total_s long), the user (not blocked since quota; the quota not expiring before the
  -- end; the device within the per-device caps), then books the device named, or the best
  -- fit (CPU, memory, id) of the devices matching the specs that is free over the whole
  -- interval, all in this step. Returns true when it refused.
  local function reserve(S, row)
    local P, now = S.P, S.now
    local rid, uid, reply_to = row.request_id, row.user_id, row.reply_to
    local idem_key = k_user(P, uid, 'req:' .. rid)
    local first = redis.call('GET', idem_key)
    if first then send_reply(reply_to, first, S.reply_ttl) return false end
    local function refuse(reason, msg)
      local json = failed_reply(rid, reason, msg, nil)
      send_reply(reply_to, json, S.reply_ttl)
      redis.call('SET', idem_key, json, 'EX', S.idem_ttl)
      emit_change(S.changes, rejected_change(rid, uid, row.tenant_id, reason, msg, now))
      return true
    end
    local s, e = row.start_ms, row.end_ms
    if e <= s then
      return refuse('invalid_interval', 'The end (' .. e .. ') is not after the start (' .. s .. ')')
    end
    if s < now then
      return refuse('invalid_interval', 'The start (' .. s .. ') is in the past (now ' .. now .. ')')
    end
    if e - s > row.max_total_s * 1000 then
      return refuse('invalid_interval', 'A reservation of ' .. math.ceil((e - s) / 1000)
        .. ' s is longer than ' .. row.max_total_s .. ' s')
    end
    local u = redis.call('HMGET', k_state(P, uid), 'status', 'expires_at_ms',
      'max_cpu_per_device', 'max_memory_mb_per_device')
    local blocked = u[1] and BLOCKED[u[1]]
    if blocked then return refuse(blocked, blocked_message(blocked, u[1], uid)) end
    if u[2] and u[2] ~= '' and e > tonumber(u[2]) then
      return refuse('exceeds_quota_expiry', 'The reservation would end at ' .. e
        .. ', after the quota expires at ' .. u[2])
    end
    local cap_cpu, cap_mem = tonumber(u[3]) or CPU_SCALE, tonumber(u[4]) or CPU_SCALE
    local min_cpu, min_mem = row.min_cpu_cores or 0, row.min_memory_mb or 0
    local dev, d = nil, nil
    if row.device_id then
      dev = row.device_id
      d = redis.call('HMGET', k_pool(P, 'dev:' .. dev), unpack(RSV_DEVICE_FIELDS))
      if not d[1] or d[2] == 'deleted' then return refuse('not_found', 'Device ' .. dev .. ' not found') end
      if tonumber(d[3]) > cap_cpu or tonumber(d[4]) > cap_mem then
        return refuse('quota_exceeded', 'Device ' .. dev .. ' is larger than the quota allows per device')
      end
      if not free_over(P, dev, d, s, e) then
        return refuse('overlaps', 'Device ' .. dev .. ' is booked or held during [' .. s .. ', ' .. e .. ')')
      end
    else
      local fits = {}
      for _, id in ipairs(redis.call('SMEMBERS', k_pool(P, 'devices'))) do
        local c = redis.call('HMGET', k_pool(P, 'dev:' .. id), unpack(RSV_DEVICE_FIELDS))
        local cpu, mem = tonumber(c[3]) or 0, tonumber(c[4]) or 0
        if c[1] and c[2] ~= 'deleted' and (not row.pool or c[1] == row.pool)
            and (not row.model or c[6] == row.model) and cpu >= min_cpu and mem >= min_mem
            and cpu <= cap_cpu and mem <= cap_mem then
          fits[#fits + 1] = {id, cpu, mem, c}
        end
      end
      if #fits == 0 then
        return refuse('no_available_devices', 'No device with at least ' .. min_cpu
          .. ' CPU cores and ' .. min_mem .. ' MB matches')
      end
      table.sort(fits, function(a, b)
        if a[2] ~= b[2] then return a[2] < b[2] end
        if a[3] ~= b[3] then return a[3] < b[3] end
        return a[1] < b[1]
      end)
      for _, f in ipairs(fits) do
        if free_over(P, f[1], f[4], s, e) then dev, d = f[1], f[4] break end
      end
      if not dev then
        return refuse('overlaps', 'Each of the ' .. #fits .. ' matching devices is booked or held'
          .. ' during [' .. s .. ', ' .. e .. ')')
      end
    end
    local r = {reservation_id = uuid_of(S.epoch .. '/reserve/' .. uid .. '/' .. rid .. '/' .. now),
      request_id = rid, user_id = uid, tenant_id = row.tenant_id or nil, device_id = dev,
      pool = d[1], start_ms = s, end_ms = e, status = 'booked', created_at_ms = now, version = 1}
    save_reservation(P, r)
    add_booking(P, r)
    redis.call('ZADD', k_pool(P, 'rsv_starts'), s, r.reservation_id)
    local json = reserved_reply(rid, r, d[7])
    send_reply(reply_to, json, S.reply_ttl)
    redis.call('SET', idem_key, json, 'EX', S.idem_ttl)
    emit_change(S.changes, reservation_change(r, now))
    return false
  end

  -- Answer a reservation request (cancel, claim) once per request id; true when it failed.
  local function rsv_answer(S, row, idem_key, json, failed)
    send_reply(row.reply_to, json, S.reply_ttl)
    redis.call('SET', idem_key, json, 'EX', S.idem_ttl)
    return failed
  end

  -- The user's reservation named by the row, or nil and the failure to answer.
  local function owned_reservation(S, row)
    local r = read_reservation(S.P, row.reservation_id)
    if not r then
      return nil, failed_reply(row.request_id, 'not_found',
        'Reservation ' .. row.reservation_id .. ' not found', nil)
    end
    if r.user_id ~= row.user_id then
      return nil, failed_reply(row.request_id, 'not_owner',
        'Reservation ' .. row.reservation_id .. ' belongs to another user', nil)
    end
    return r, nil
  end

  -- A cancel_reservation row: a booked reservation is dropped, an active one's allocation
  -- released (billed to now); it ends `cancelled`. Returns true when it failed.
  local function cancel_reservation(S, row)
    local idem_key = k_pool(S.P, 'req:' .. row.request_id)
    local first = redis.call('GET', idem_key)
    if first then send_reply(row.reply_to, first, S.reply_ttl) return false end
    local r, failure = owned_reservation(S, row)
    if not r then return rsv_answer(S, row, idem_key, failure, true) end
    if r.status ~= 'booked' and r.status ~= 'active' then
      return rsv_answer(S, row, idem_key, failed_reply(row.request_id, 'not_active',
        'Reservation ' .. r.reservation_id .. ' is ' .. r.status, nil), true)
    end
    local was = r.status
    end_reservation(S.P, S.changes, S.now, S.released_ttl, r, 'cancelled', 'cancelled', S.now,
      'released')
    return rsv_answer(S, row, idem_key, cjson.encode({type = 'reservation_cancelled',
      request_id = row.request_id, reservation_id = r.reservation_id, previous_status = was,
      allocation_id = opt(was == 'active' and r.allocation_id)}), false)
  end

  -- Mark an active reservation claimed (its user showed up): it leaves the no-show watch.
  local function claim_now(P, changes, now, r)
    if r.claimed_at_ms then return end
    r.claimed_at_ms, r.version = now, r.version + 1
    save_reservation(P, r)
    redis.call('ZREM', k_pool(P, 'rsv_grace'), r.reservation_id)
    emit_change(changes, reservation_change(r, now))
  end

  -- The first renewal of the allocation an active reservation became claims it too.
  local function claim_by_use(P, changes, now, aid)
    local rid = redis.call('HGET', k_pool(P, 'alloc:' .. aid), 'reservation_id')
    if not rid then return end
    local r = read_reservation(P, rid)
    if r and r.status == 'active' then claim_now(P, changes, now, r) end
  end

  -- A claim_reservation row: the active reservation is claimed (once; a second claim gets
  -- the same answer) and the allocation it became described as an Allocated reply does.
  -- Returns true when it failed.
  local function claim_reservation(S, row)
    local P = S.P
    local idem_key = k_pool(P, 'req:' .. row.request_id)
    local first = redis.call('GET', idem_key)
    if first then send_reply(row.reply_to, first, S.reply_ttl) return false end
    local r, failure = owned_reservation(S, row)
    if not r then return rsv_answer(S, row, idem_key, failure, true) end
    local a = r.allocation_id and redis.call('HMGET', k_pool(P, 'alloc:' .. r.allocation_id),
      'status', 'device_id', 'allocated_at_ms', 'expires_at_ms')
    if r.status ~= 'active' or not a or a[1] ~= 'allocated' then
      local why = r.status == 'booked' and 'is booked: it starts at ' .. r.start_ms
        or 'is ' .. (r.status == 'active' and 'ending' or r.status)
      return rsv_answer(S, row, idem_key, failed_reply(row.request_id, 'not_active',
        'Reservation ' .. r.reservation_id .. ' ' .. why, nil), true)
    end
    claim_now(P, S.changes, S.now, r)
    local d = redis.call('HMGET', k_pool(P, 'dev:' .. a[2]), 'name', 'adb_host', 'adb_port')
    return rsv_answer(S, row, idem_key, cjson.encode({type = 'claimed',
      request_id = row.request_id, reservation_id = r.reservation_id,
      allocation_id = r.allocation_id, device = {id = a[2], name = d[1], status = 'allocated'},
      user_id = r.user_id, allocated_at_ms = tonumber(a[3]), expires_at_ms = tonumber(a[4]),
      adb_host = d[2], adb_port = tonumber(d[3])}), false)
  end

  bookings_lib = {reserve = reserve, cancel_reservation = cancel_reservation,
    claim_reservation = claim_reservation, claim_by_use = claim_by_use,
    read_reservation = read_reservation, save_reservation = save_reservation,
    reservation_change = reservation_change, end_reservation = end_reservation,
    uuid_of = uuid_of}
  return bookings_lib
end
