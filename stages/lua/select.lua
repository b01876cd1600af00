-- select: decide a batch of admitted requests, answer each producer, record the
-- changes and ack the batch, in one atomic step.
-- KEY: admitted, changes, dead (streams); state (the state marker, {pool}: its epoch);
-- replies_held (the held replies' stream, written only with CALL.hold_replies).
-- CALL: schemas.rows.SelectCall (prefix, group, now_ms, idempotency_ttl_s, reply_ttl_s,
-- released_ttl_s, queue_max_per_user, queue_aging_step_ms, hold_replies, items); with
-- hold_replies (DEVSCHED_REPLICAS_TO_ACK > 0) every reply goes to KEY.replies_held instead of its
-- stream (common.lua send_reply), delivered by the stage after WAIT; each item one row,
-- by op:
--   allocate: request_id, user_id, tenant_id, reply_to, min_cpu_cores, min_memory_mb,
--             duration_seconds, pool, model, hold ("cpu mem sto"),
--             replace_on_failure (kept on the allocation's hash, for events.lua),
--             wait_seconds and priority (with no fitting device free it waits in the
--             queue, common.lua: `queued` now, its final reply when a freed device is
--             given to it, or failed timed_out / cancelled; `queue_full` past the
--             user's cap of waiting requests)
--   cancel:   request_id, reply_to, cancel_request_id, user_id (a waiting request)
--   release:  request_id, reply_to, allocation_id, device_id, user_id
--   allocate_batch: as allocate, with count and best_effort (device i gets the id of
--                   request '<request id>#<i>')
--   release_batch:  request_id, reply_to, allocation_ids, user_id
--   renew:    request_id, user_id, reply_to, allocation_id, extend_seconds, max_total_s:
--             extend an active allocation of the user (its expires-at, its expiry score,
--             its length, its version) unless the user is blocked, the new expires-at
--             passes the quota's expiry, the whole length passes max_total_s or the
--             new expires-at runs into a booking of the device (`reserved`); renewing
--             the allocation a reservation became claims the reservation
--   reserve, cancel_reservation, claim_reservation: reservations (bookings.lua)
--   dead:     a dead letter to add (letter)
-- A device fits when it is free, in the request's pool (any pool without one), of its
-- model, meets its minimums, has no booking before the allocation would end
-- (bookings.lua) and fits what the user's quota still allows (per-device
-- caps and the CPU/memory/storage totals minus current usage). Among the fitting ones
-- the strategy in force chooses (P:{pool}:strategy, read once per call: the request's
-- pool's, else the global one '*', else resource_based):
--   resource_based: the smallest (CPU, then memory): best fit, the default;
--   least_loaded:   on the host with the fewest active allocations (host_active);
--   bin_pack:       on the host with the most active allocations (keeps hosts empty);
--   round_robin:    the next fitting device by id after the last one given in this
--                   scope (the pool, or '*'; P:{pool}:round_robin), wrapping around;
--   affinity:       the device this user had last, else a device on that host, else
--                   as resource_based (the user's last_device / last_host).
--   smart:          learnt from history (P:{pool}:smart, stages/smart.py): avoids devices
--                   likely to fail within the user's typical session, leaves the models
--                   others ask for by name to them, puts short sessions in the gaps
--                   before bookings and long ones on unbooked devices, else as
--                   resource_based.
-- Ties go to the best fit, then the smaller id. Device and allocation keys are
-- under {pool}; the hold is settled in the user's {u:ID} keys in the same step, so a
-- device is never given twice and usage always equals holds plus active allocations.
-- Request ids make it idempotent: a request id already answered gets the stored answer.
-- A new allocation's id is a name-based UUID of the state's epoch, the user, the request
-- id and the time of the call: a request id re-sent once its answer is gone (the window
-- passed, or Redis lost its state) makes a new id, never one PostgreSQL already holds.
-- Returns {allocated, released, failed, dead-lettered, held} (a renewal counts in none;
-- held: {id, reply stream, ...} of the replies held, empty without hold_replies); nil, having changed and acked
-- nothing, when the state marker has no epoch (Redis holds no live state).

-- What one call works with, and its counts. They are declared here, above the per-call
-- marker (at the end of this file), so that on Redis 7 the functions below are made once,
-- when the library loads, rather than at every call (a script's closures are most of
-- what an empty call costs); each one is set afresh at every call, below the marker.
local P, group, now, idem_ttl, reply_ttl, released_ttl, changes, dead, epoch
local n_alloc, n_release, n_failed, n_dead

-- The replies only select sends (the other messages are built in common.lua).
-- Released: `already` when the allocation was closed before (ended as `status`).
local function released_reply(rid, aid, device_id, uid, released_at, seconds, already, status)
  return cjson.encode({type = 'released', request_id = rid, allocation_id = aid,
    device_id = device_id, user_id = uid, released_at_ms = released_at,
    duration_seconds = seconds, already_released = already, status = status})
end

-- The id of a new allocation (stages.select.allocation_id computes the same): a UUID
-- (version 5 layout) from the SHA-1 of "epoch/user/request id/now". What does not
-- change within the call is joined once; the variant digit (8, 9, a or b from the
-- digest's 17th hex digit, its two high bits set to 10) is read from a string.
local id_head, id_tail  -- epoch .. '/' and '/' .. now, set per call
local function allocation_uuid(uid, rid)
  local sub = string.sub
  local h = redis.sha1hex(id_head .. uid .. '/' .. rid .. id_tail)
  local v = tonumber(sub(h, 17, 17), 16) % 4 + 1
  return sub(h, 1, 8) .. '-' .. sub(h, 9, 12) .. '-5' .. sub(h, 14, 16) .. '-'
    .. sub('89ab', v, v) .. sub(h, 18, 20) .. '-' .. sub(h, 21, 32)
end

local PAGE = 8
local pool_names = nil  -- the pools, read once per script call

-- Reservations (bookings.lua): the allocation being decided would run until book_until
-- (set per request before its pick); a device booked before then does not fit. While no
-- device has a booking this costs one HLEN per call (booking_in in common.lua).
local book_until = nil
local function unbooked(dev)
  return not booking_in(P, dev, now, book_until)
end

-- Walk the devices of one free pool that fit, lowest score (CPU, then memory) first: CPU
-- in [min_cpu, cap_cpu], memory in [min_mem, cap_mem], storage <= cap_sto and the model.
-- Memory is read from the score itself, so a CPU level whose devices are all too small
-- or too large in memory is skipped with one jump instead of being scanned; only a
-- device that passes CPU and memory is read (storage, model, and what a reply needs:
-- name, adb_host, adb_port, host); one booked before book_until is passed over. Calls visit(id, score, d) for each fitting device
-- until it returns true; reads `first` devices, then pages of `size`.
local function scan_fits(key, model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto, first, size,
                         visit)
  local hi = fit_score(cap_cpu, CPU_SCALE - 1)
  local from, offset, n = fit_score(min_cpu, min_mem), 0, first
  while from <= hi do
    local page = redis.call('ZRANGEBYSCORE', key, from, hi, 'WITHSCORES', 'LIMIT', offset, n)
    if #page == 0 then return end
    local jump = nil
    for i = 1, #page, 2 do
      local score = tonumber(page[i + 1])
      local cpu = math.floor(score / CPU_SCALE)
      local mem = score - cpu * CPU_SCALE
      if mem < min_mem then jump = fit_score(cpu, min_mem) break end
      if mem > cap_mem then jump = fit_score(cpu + 1, min_mem) break end
      local d = redis.call('HMGET', k_pool(P, 'dev:' .. page[i]), 'storage_mb', 'model', 'name',
        'adb_host', 'adb_port', 'host')
      if tonumber(d[1]) <= cap_sto and (not model or d[2] == model) and unbooked(page[i]) then
        if visit(page[i], score, d) then return end
      end
    end
    if jump then
      from, offset = jump, 0
    elseif #page < 2 * n then
      return
    else
      offset = offset + n
    end
    n = size
  end
end

-- The best fit in one free pool (scan_fits' first device): id, score and its fields. The
-- first read asks for one device (usually the answer), later ones for a page.
local function best_in_pool(key, model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
  local best, best_score, best_d = nil, nil, nil
  scan_fits(key, model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto, 1, PAGE,
    function(id, score, d)
      best, best_score, best_d = id, score, d
      return true
    end)
  return best, best_score, best_d
end

local function pick_device(pool, model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
  local pools
  if pool then
    pools = {pool}
  else
    pool_names = pool_names or redis.call('SMEMBERS', k_pool(P, 'pools'))
    pools = pool_names
  end
  local best, best_score, best_pool, best_fields = nil, nil, nil, nil
  for _, pl in ipairs(pools) do
    local id, score, fields = best_in_pool(k_pool(P, 'free:' .. pl), model, min_cpu, min_mem,
      cap_cpu, cap_mem, cap_sto)
    if id and (not best_score or score < best_score) then
      best, best_score, best_pool, best_fields = id, score, pl, fields
    end
  end
  return best, best_pool, best_score, best_fields
end

-- --- the other strategies --------------------------------------------------------------

local strategy_of = nil  -- field -> strategy, read once per call at its first allocation

local function strategy_for(pool)
  if not strategy_of then
    strategy_of = {}
    local flat = redis.call('HGETALL', k_pool(P, 'strategy'))
    for i = 1, #flat, 2 do strategy_of[flat[i]] = flat[i + 1] end
  end
  return (pool and strategy_of[pool]) or strategy_of['*'] or 'resource_based'
end

-- The strategies other than resource_based, built at the first allocation under one of
-- them (a call that needs none does not pay for making their functions: under EVALSHA
-- the whole script runs at every call). {picks = name -> function(candidates, uid,
-- scope): the chosen candidate, pick = pick_by_strategy}.
local strategies_lib = nil
local function strategies()
  if strategies_lib then return strategies_lib end
  local STRATEGY_PICKS = {}
  local SCAN_PAGE = 64
  -- Every fitting device of one free pool (scan_fits), as candidates {id, score, pool, d}.
  -- It reads every device that passes CPU and memory: these strategies cost a read per
  -- candidate.
  local function add_fits(list, pl, model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
    scan_fits(k_pool(P, 'free:' .. pl), model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto,
      SCAN_PAGE, SCAN_PAGE, function(id, score, d)
        list[#list + 1] = {id, score, pl, d}
        return false
      end)
  end

  -- a before b: the better fit (lower score), then the smaller id
  local function fits_better(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[1] < b[1]
  end

  local function best_of(list, keep)
    local best = nil
    for _, c in ipairs(list) do
      if (not keep or keep(c)) and (not best or fits_better(c, best)) then best = c end
    end
    return best
  end

  -- The candidate on the host whose active count `load` prefers (more_is_better: bin_pack).
  local function by_host_load(list, more_is_better)
    local flat = redis.call('HGETALL', k_pool(P, 'host_active'))
    local load = {}
    for i = 1, #flat, 2 do load[flat[i]] = tonumber(flat[i + 1]) end
    local best, best_load = nil, nil
    for _, c in ipairs(list) do
      local host = c[4][6] or ''
      local l = (load[host] or 0) + host_pending(host)
      if not best or (more_is_better and l > best_load) or (not more_is_better and l < best_load)
          or (l == best_load and fits_better(c, best)) then
        best, best_load = c, l
      end
    end
    return best
  end

  STRATEGY_PICKS.least_loaded = function(list) return by_host_load(list, false) end
  STRATEGY_PICKS.bin_pack = function(list) return by_host_load(list, true) end

  STRATEGY_PICKS.round_robin = function(list, _uid, scope)
    local key = k_pool(P, 'round_robin')
    local last = redis.call('HGET', key, scope) or ''
    local first, next_one = nil, nil
    for _, c in ipairs(list) do
      if not first or c[1] < first[1] then first = c end
      if c[1] > last and (not next_one or c[1] < next_one[1]) then next_one = c end
    end
    local chosen = next_one or first
    redis.call('HSET', key, scope, chosen[1])
    return chosen
  end

  STRATEGY_PICKS.affinity = function(list, uid)
    local last = redis.call('HMGET', k_state(P, uid), 'last_device', 'last_host')
    return (last[1] and best_of(list, function(c) return c[1] == last[1] end))
      or (last[2] and best_of(list, function(c) return c[4][6] == last[2] end))
      or best_of(list)
  end

  -- smart: the model of stages/smart.py (P:{pool}:smart, refreshed by the refresh_model
  -- job), one HMGET: u:<user> the user's typical seconds held, d:<device> its failures per
  -- day held, m:<model> how much of the model is wanted by name. A device whose risk (its
  -- rate times the user's typical session) passes SMART_RISK comes last; then the model
  -- least wanted by name (in steps of SMART_DEMAND_STEP, so that noise does not decide);
  -- then, while some device has a booking (booked_n, read by booking_in), the upcoming
  -- reservations: a user whose typical session ends before a device's next booking with
  -- room to spare (SMART_BOOKED_MARGIN times it) takes the device booked soonest, filling the
  -- gap before the booking and keeping the unbooked devices whole for long sessions; a user
  -- whose typical session would run into the booking (it would have to end early, or could
  -- not renew) takes an unbooked device first. Then the best fit. No model: as
  -- resource_based but for the booking term (the typical session taken as SMART_HOLD_S).
  -- Without bookings this costs nothing more.
  local SMART_RISK, SMART_DEMAND_STEP, SMART_HOLD_S, SMART_BOOKED_MARGIN = 0.01, 0.05, 3600, 2
  STRATEGY_PICKS.smart = function(list, uid)
    local fields = {'u:' .. uid}
    for i, c in ipairs(list) do
      fields[2 * i], fields[2 * i + 1] = 'd:' .. c[1], 'm:' .. (c[4][2] or '')
    end
    local m = redis.call('HMGET', k_pool(P, 'smart'), unpack(fields))
    local hold_s = tonumber(m[1]) or SMART_HOLD_S
    local hold = hold_s / 86400
    -- the next booking's start of each candidate with bookings (all start after book_until)
    local next_at = nil
    if booked_n and booked_n > 0 then
      local ids = {}
      for i, c in ipairs(list) do ids[i] = c[1] end
      local n = redis.call('HMGET', k_pool(P, 'booked'), unpack(ids))
      next_at = {}
      for i, c in ipairs(list) do
        if n[i] then
          local b = redis.call('ZRANGEBYSCORE', k_pool(P, 'bookings:' .. c[1]), book_until,
            '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
          next_at[i] = tonumber(b[2])
        end
      end
    end
    local short_until = now + SMART_BOOKED_MARGIN * hold_s * 1000
    local best, bk = nil, nil
    for i, c in ipairs(list) do
      local b = next_at and next_at[i]
      local k = {math.floor(c[2] / CPU_SCALE),
        ((tonumber(m[2 * i]) or 0) * hold > SMART_RISK) and 1 or 0,
        math.floor((tonumber(m[2 * i + 1]) or 0) / SMART_DEMAND_STEP),
        -- booked, a short session: the soonest booking first; then unbooked (2^52); last,
        -- booked where the session would run into its booking (2^53)
        not b and 2 ^ 52 or (b >= short_until and b or 2 ^ 53)}
      local better = not best
      if not better then
        for j = 1, 4 do
          if k[j] ~= bk[j] then better = k[j] < bk[j] break end
          if j == 4 then better = fits_better(c, best) end
        end
      end
      if better then best, bk = c, k end
    end
    return best
  end

  -- pick_device's answer under a strategy other than resource_based.
  local function pick_by_strategy(choose, uid, pool, model, min_cpu, min_mem, cap_cpu, cap_mem,
                                  cap_sto)
    local list, pools = {}, nil
    if pool then
      pools = {pool}
    else
      pool_names = pool_names or redis.call('SMEMBERS', k_pool(P, 'pools'))
      pools = pool_names
    end
    for _, pl in ipairs(pools) do
      add_fits(list, pl, model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
    end
    if #list == 0 then return nil end
    local c = choose(list, uid, pool or '*')
    return c[1], c[3], c[2], c[4]
  end

  strategies_lib = {picks = STRATEGY_PICKS, pick = pick_by_strategy}
  return strategies_lib
end

-- A device by the strategy in force (a single request and each device of a batch).
local function pick(uid, pool, model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
  local name = strategy_for(pool)
  if name ~= 'resource_based' then
    local lib = strategies()
    local choose = lib.picks[name]
    if choose then
      return lib.pick(choose, uid, pool, model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
    end
  end  -- resource_based (or a name this script does not know)
  return pick_device(pool, model, min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
end

-- Why no device was found: the quota's room, else the pool.
local function no_device(min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
  if cap_cpu < math.max(min_cpu, 1) or cap_mem < math.max(min_mem, 1) or cap_sto < 0 then
    return 'quota_exceeded', 'Resource quota exceeded: room for ' .. cap_cpu .. ' CPU cores, '
      .. cap_mem .. ' MB memory, ' .. cap_sto .. ' MB storage'
  end
  return 'no_available_devices',
    'No available device with at least ' .. min_cpu .. ' CPU cores and ' .. min_mem .. ' MB'
end

-- Answer `queued`, the notice a waiting request gets (its final reply comes later), with
-- its place in the queue (1 first).
local function send_queued(reply_to, rid, member, wait_until, priority)
  local position = (redis.call('ZRANK', k_pool(P, 'queue'), member) or 0) + 1
  send_reply(reply_to, cjson.encode({type = 'queued', request_id = rid, position = position,
    wait_until_ms = wait_until, priority = priority}), reply_ttl)
end

-- Queue an admitted request that found no fitting device (the wait queue is described in
-- allocations.lua): its hold stays, it is answered `queued` with its position.
local function enqueue(row, member)
  local priority = row.priority or 0
  local wait_until = now + row.wait_seconds * 1000
  local score = now - priority * CALL.queue_aging_step_ms
  local q = queue()
  local record = q.record(row, priority, now, wait_until, idem_ttl, reply_ttl)
  q.join(P, changes, now, member, score, cjson.decode(record), record)
  send_queued(row.reply_to, row.request_id, member, wait_until, priority)
end

-- The user's state read for an admitted request (STATE_FIELDS, its hold first), or nil
-- when quota never admitted it (answered invalid_request, not kept under its id).
local function admitted_state(rid, uid, reply_to)
  STATE_FIELDS[1] = 'hold:' .. rid
  local s = redis.call('HMGET', k_state(P, uid), unpack(STATE_FIELDS))
  if s[1] then return s end
  send_reply(reply_to, failed_reply(rid, 'invalid_request',
    'Request ' .. rid .. ' was not admitted by quota', nil), reply_ttl)
  n_failed = n_failed + 1
  return nil
end

-- Refuse an admitted request: Failed answered and kept under its id, the rejection
-- recorded.
local function refuse_kept(rid, uid, tenant, reply_to, idem_key, reason, msg)
  local json = failed_reply(rid, reason, msg, nil)
  send_reply(reply_to, json, reply_ttl)
  redis.call('SET', idem_key, json, 'EX', idem_ttl)
  emit_change(changes, rejected_change(rid, uid, tenant, reason, msg, now))
  n_failed = n_failed + 1
end

local function allocate(row)
  local rid, uid, tenant, reply_to = row.request_id, row.user_id, row.tenant_id, row.reply_to
  local min_cpu, min_mem = row.min_cpu_cores, row.min_memory_mb
  local hold = row.hold
  local idem_key = k_user(P, uid, 'req:' .. rid)
  local first = redis.call('GET', idem_key)
  if first then send_reply(reply_to, first, reply_ttl) return end
  -- the id of the allocation it gets, now or (waiting) when a freed device is given to it
  -- by any script: made here, from this state's epoch and this call's time
  row.allocation_id = allocation_uuid(uid, rid)
  local member = row.wait_seconds and queue_member(uid, rid)
  if member then
    -- waiting already (a redelivery, or the request sent again): tell it where it stands
    local raw = redis.call('HGET', k_pool(P, 'waiters'), member)
    if raw then
      local w = cjson.decode(raw)
      send_queued(reply_to, rid, member, w.wait_until_ms, w.priority)
      return
    end
  end
  local s = admitted_state(rid, uid, reply_to)
  if not s then return end
  local used = usage_at(s, 2)
  local blocked = s[11] and BLOCKED[s[11]]
  if blocked then
    settle_hold(P, uid, rid, hold, used, nil, nil, nil)
    return refuse_kept(rid, uid, tenant, reply_to, idem_key, blocked,
      blocked_message(blocked, s[11], uid))
  end
  local cap_cpu, cap_mem, cap_sto = quota_caps(s, 6, used)
  book_until = now + row.duration_seconds * 1000
  local dev, dev_pool, score, d = pick(uid, row.pool, row.model, min_cpu, min_mem, cap_cpu,
    cap_mem, cap_sto)
  if not dev then
    local reason, msg = no_device(min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
    if reason == 'no_available_devices' and member then
      local waiting = tonumber(redis.call('HGET', k_state(P, uid), 'waiting')) or 0
      if waiting < CALL.queue_max_per_user then return enqueue(row, member) end
      reason = 'queue_full'
      msg = 'User ' .. uid .. ' has ' .. waiting .. ' requests waiting already (at most '
        .. CALL.queue_max_per_user .. ')'
    end
    settle_hold(P, uid, rid, hold, used, nil, nil, nil)
    return refuse_kept(rid, uid, tenant, reply_to, idem_key, reason, msg)
  end
  -- the free pool's score is fit_score(cpu, memory); d is storage, model, name, adb host,
  -- port, host
  local cpu = math.floor(score / CPU_SCALE)
  give_device(P, changes, now, row, dev, dev_pool, cpu, score - cpu * CPU_SCALE, tonumber(d[1]),
    d, used, idem_ttl, reply_ttl)
  n_alloc = n_alloc + 1
end

-- What close_allocation needs (ALLOC_FIELDS, 1-13), then the end of an already closed one
-- and the release request that closed it, if one did (14-16).
-- (a loop: a library's top level, run at load, reaches no globals such as unpack)
local RELEASE_FIELDS = {}
for i = 1, #ALLOC_FIELDS do RELEASE_FIELDS[i] = ALLOC_FIELDS[i] end
RELEASE_FIELDS[14], RELEASE_FIELDS[15] = 'released_at_ms', 'duration_seconds'
RELEASE_FIELDS[16] = 'released_by'

-- An allocation as a release reads it (RELEASE_FIELDS), and the answer its closed record
-- gives (`already`: closed before this request).
local function release_record(aid)
  return redis.call('HMGET', k_pool(P, 'alloc:' .. aid), unpack(RELEASE_FIELDS))
end
local function closed_reply(rid, aid, a, already)
  return released_reply(rid, aid, a[1], a[2], tonumber(a[14]), tonumber(a[15]), already, a[5])
end

-- A release's answer is the same at every delivery of its request. Released by allocation
-- id (what producers send), the allocation itself is the record: the request that closed
-- it is answered again from the closed allocation (kept for the longer of the released and
-- the idempotency windows), and any other answer follows from what never changes for an
-- allocation id (its device, its user, whether and how it ended) or is kept under the
-- request's id. So the usual release, of an active allocation, reads no stored answer and
-- writes none. Released by device id, the device's next allocation would be a different
-- answer: that one is kept under the request's id, read first.
local function release(row)
  local rid, reply_to, uid = row.request_id, row.reply_to, row.user_id
  local aid, device_id = row.allocation_id, row.device_id or ''
  local idem_key = k_pool(P, 'req:' .. rid)
  local a
  if aid then
    a = release_record(aid)
    if a[16] == rid then  -- this request closed it
      return send_reply(reply_to, closed_reply(rid, aid, a, false), reply_ttl)
    end
  end
  if not (a and a[5] == 'allocated') then
    local first = redis.call('GET', idem_key)
    if first then send_reply(reply_to, first, reply_ttl) return end
  end
  local function answer(json)
    send_reply(reply_to, json, reply_ttl)
    redis.call('SET', idem_key, json, 'EX', idem_ttl)
  end
  local function fail(reason, msg)
    answer(failed_reply(rid, reason, msg, nil))
    n_failed = n_failed + 1
  end
  if not aid then
    -- only the allocation on the device now: a device nobody holds is not_found, not
    -- already_released (its last allocation is released by its id)
    local d = redis.call('HMGET', k_pool(P, 'dev:' .. device_id), 'alloc', 'pool')
    if not d[2] then return fail('not_found', 'Device ' .. device_id .. ' not found') end
    aid = d[1] or ''
    if aid == '' then return fail('not_found', 'Device ' .. device_id .. ' has no allocation') end
    a = release_record(aid)
  end
  if not a[1] then return fail('not_found', 'Allocation ' .. aid .. ' not found') end
  if device_id ~= '' and a[1] ~= device_id then
    return fail('not_found', 'Allocation ' .. aid .. ' is not on device ' .. device_id)
  end
  if uid and a[2] ~= uid then
    return fail('not_owner', 'Allocation ' .. aid .. ' belongs to another user')
  end
  if a[5] ~= 'allocated' then
    -- closed before (it may expire before the idempotency window ends): kept
    return answer(closed_reply(rid, aid, a, true))
  end
  local rec = close_allocation(P, changes, aid, now, 'released', now,
    math.max(released_ttl, idem_ttl), a, 'released', rid)
  local json = released_reply(rid, aid, rec.device_id, rec.user_id, now, rec.duration_seconds,
    false, 'released')
  n_release = n_release + 1
  if not row.allocation_id then return answer(json) end  -- by device: kept
  send_reply(reply_to, json, reply_ttl)
end

-- --- the other rows ----------------------------------------------------------------------

-- The handlers of the rows other than allocate and release (cancel, batches, renew, the
-- reservation rows, refuse, dead), built at the first such row of a call, as the
-- strategies are.
local rare_lib = nil
local function rare_rows()
  if rare_lib then return rare_lib end

  -- A cancel request: the user's waiting request leaves the queue with `failed` reason
  -- `cancelled` (its hold given back); this request is answered `cancelled`, or
  -- `not_found` when that request is not waiting. Kept by request id, as a release.
  local function cancel(row)
    local rid, reply_to = row.request_id, row.reply_to
    local idem_key = k_pool(P, 'req:' .. rid)
    local first = redis.call('GET', idem_key)
    if first then send_reply(reply_to, first, reply_ttl) return end
    local raw = redis.call('HGET', k_pool(P, 'waiters'),
      queue_member(row.user_id, row.cancel_request_id))
    local json
    if raw then
      queue().fail(P, changes, now, cjson.decode(raw), 'cancelled',
        'Cancelled by request ' .. rid)
      json = cjson.encode({type = 'cancelled', request_id = rid,
        cancel_request_id = row.cancel_request_id})
    else
      json = failed_reply(rid, 'not_found', 'Request ' .. row.cancel_request_id
        .. ' of user ' .. row.user_id .. ' is not waiting', nil)
      n_failed = n_failed + 1
    end
    send_reply(reply_to, json, reply_ttl)
    redis.call('SET', idem_key, json, 'EX', idem_ttl)
  end

  local function json_list(items) return '[' .. table.concat(items, ',') .. ']' end

  -- AllocatedBatch / ReleasedBatch: item replies (JSON each) joined as they are.
  local function allocated_batch_reply(rid, mode, allocations, failures)
    return '{"type":"allocated_batch","request_id":' .. cjson.encode(rid) .. ',"mode":"' .. mode
      .. '","success_count":' .. #allocations .. ',"failed_count":' .. #failures
      .. ',"allocations":' .. json_list(allocations) .. ',"failures":' .. json_list(failures) .. '}'
  end

  local function released_batch_reply(rid, releases, failures)
    return '{"type":"released_batch","request_id":' .. cjson.encode(rid) .. ',"success_count":'
      .. #releases .. ',"failed_count":' .. #failures .. ',"releases":' .. json_list(releases)
      .. ',"failures":' .. json_list(failures) .. '}'
  end

  -- An allocate request for count > 1 devices, decided whole in this step. Each device is
  -- picked as a single request's would be (the strategy, the fit rules), against what the
  -- quota allows after the devices picked before it, and taken out of its free pool at
  -- once; all_or_nothing puts them all back when not every one was found. Then each is
  -- recorded as allocate records one, the hold ("0 0 0 n") settled in one write, and one
  -- AllocatedBatch answers. A user blocked since admission, or a request quota never
  -- admitted, gets one Failed, as a single request does.
  local function allocate_batch(row)
    local rid, uid, tenant, reply_to = row.request_id, row.user_id, row.tenant_id, row.reply_to
    local min_cpu, min_mem = row.min_cpu_cores, row.min_memory_mb
    local idem_key = k_user(P, uid, 'req:' .. rid)
    local first = redis.call('GET', idem_key)
    if first then send_reply(reply_to, first, reply_ttl) return end
    local s = admitted_state(rid, uid, reply_to)
    if not s then return end
    local used = usage_at(s, 2)
    local held = tonumber(string.match(s[1], ' (%d+)$')) or 1
    local function settle(n, cpu, mem, sto, ...)
      redis.call('HDEL', k_state(P, uid), 'hold:' .. rid)
      add_usage(P, uid, used, n - held, cpu, mem, sto, ...)
    end
    local blocked = s[11] and BLOCKED[s[11]]
    if blocked then
      settle(0, 0, 0, 0)
      return refuse_kept(rid, uid, tenant, reply_to, idem_key, blocked,
        blocked_message(blocked, s[11], uid))
    end
    local want = row.best_effort and math.min(held, row.count) or row.count
    book_until = now + row.duration_seconds * 1000
    local picks, taken = {}, {used[1], used[2], used[3], used[4]}
    local short, short_msg = nil, nil
    for _ = 1, want do
      local cap_cpu, cap_mem, cap_sto = quota_caps(s, 6, taken)
      local dev, dev_pool, score, d = pick(uid, row.pool, row.model, min_cpu, min_mem, cap_cpu,
        cap_mem, cap_sto)
      if not dev then
        short, short_msg = no_device(min_cpu, min_mem, cap_cpu, cap_mem, cap_sto)
        break
      end
      redis.call('ZREM', k_pool(P, 'free:' .. dev_pool), dev)
      local cpu = math.floor(score / CPU_SCALE)
      local mem, sto = score - cpu * CPU_SCALE, tonumber(d[1])
      picks[#picks + 1] = {dev, dev_pool, score, d, cpu, mem, sto}
      taken = {taken[1] + 1, taken[2] + cpu, taken[3] + mem, taken[4] + sto}
    end
    if not row.best_effort and #picks < row.count then
      short_msg = 'All or nothing: ' .. #picks .. ' of ' .. row.count .. ' devices fit; ' .. short_msg
      for _, p in ipairs(picks) do redis.call('ZADD', k_pool(P, 'free:' .. p[2]), p[3], p[1]) end
      picks = {}
    end
    local seconds = row.duration_seconds
    local expires, minutes = now + seconds * 1000, math.ceil(seconds / 60)
    local allocations, fields, tot = {}, {}, {0, 0, 0}
    for i, p in ipairs(picks) do
      local dev, dev_pool, d, cpu, mem, sto = p[1], p[2], p[4], p[5], p[6], p[7]
      local aid = allocation_uuid(uid, rid .. '#' .. i)
      redis.call('HSET', k_pool(P, 'dev:' .. dev), 'status', 'allocated', 'alloc', aid)
      redis.call('HSET', k_pool(P, 'alloc:' .. aid), 'device_id', dev, 'user_id', uid,
        'tenant_id', tenant or '', 'request_id', rid, 'status', 'allocated', 'allocated_at_ms', now,
        'expires_at_ms', expires, 'duration_minutes', minutes, 'cpu_cores', cpu, 'memory_mb', mem,
        'storage_mb', sto, 'pool', dev_pool, 'version', 1)
      redis.call('ZADD', k_pool(P, 'expiry'), expires, aid)
      count_stat('allocated')
      host_active_add(P, d[6], 1)
      fields[#fields + 1], fields[#fields + 2] = 'alloc:' .. aid, cpu .. ' ' .. mem .. ' ' .. sto
      tot = {tot[1] + cpu, tot[2] + mem, tot[3] + sto}
      allocations[i] = allocated_reply(rid, aid, dev, d, uid, now, expires)
      emit_change(changes, allocation_change(aid, dev, uid, tenant, rid, 'allocated', now, expires,
        minutes, cpu, mem, sto, dev_pool, 1, now, nil, nil))
      n_alloc = n_alloc + 1
    end
    if #picks > 0 then
      local last = picks[#picks]
      fields[#fields + 1], fields[#fields + 2] = 'last_device', last[1]
      fields[#fields + 1], fields[#fields + 2] = 'last_host', last[4][6] or ''
    end
    settle(#picks, tot[1], tot[2], tot[3], unpack(fields))
    local failures = {}
    for i = #picks + 1, row.count do
      if i > want then  -- best effort, beyond what the device quota had room for
        failures[#failures + 1] = failed_reply(rid, 'quota_exceeded',
          'Device quota exceeded: room for ' .. want .. ' of ' .. row.count .. ' devices', nil)
      else
        failures[#failures + 1] = failed_reply(rid, short, short_msg, nil)
      end
    end
    local mode = row.best_effort and 'best_effort' or 'all_or_nothing'
    local json = allocated_batch_reply(rid, mode, allocations, failures)
    send_reply(reply_to, json, reply_ttl)
    redis.call('SET', idem_key, json, 'EX', idem_ttl)
    if #picks == 0 then  -- refused as a whole
      local reason = short or 'quota_exceeded'
      emit_change(changes, rejected_change(rid, uid, tenant, reason,
        short_msg or 'Device quota exceeded', now))
      n_failed = n_failed + 1
    end
  end

  -- A release request naming several allocations: each released as a release by its id
  -- would be (already closed ones answer already_released), one ReleasedBatch answers.
  local function release_batch(row)
    local rid, reply_to, uid = row.request_id, row.reply_to, row.user_id
    local idem_key = k_pool(P, 'req:' .. rid)
    local first = redis.call('GET', idem_key)
    if first then send_reply(reply_to, first, reply_ttl) return end
    local releases, failures = {}, {}
    for _, aid in ipairs(row.allocation_ids) do
      local a = release_record(aid)
      if not a[1] then
        failures[#failures + 1] = failed_reply(rid, 'not_found', 'Allocation ' .. aid .. ' not found', nil)
      elseif uid and a[2] ~= uid then
        failures[#failures + 1] = failed_reply(rid, 'not_owner',
          'Allocation ' .. aid .. ' belongs to another user', nil)
      elseif a[5] ~= 'allocated' then
        releases[#releases + 1] = closed_reply(rid, aid, a, true)
      else
        local rec = close_allocation(P, changes, aid, now, 'released', now, released_ttl, a,
          'released')
        releases[#releases + 1] = released_reply(rid, aid, rec.device_id, rec.user_id, now,
          rec.duration_seconds, false, 'released')
        n_release = n_release + 1
      end
    end
    local json = released_batch_reply(rid, releases, failures)
    send_reply(reply_to, json, reply_ttl)
    redis.call('SET', idem_key, json, 'EX', idem_ttl)
  end

  -- Renewed: the allocation's new end.
  local function renewed_reply(rid, aid, uid, device_id, expires, previous, total_minutes)
    return cjson.encode({type = 'renewed', request_id = rid, allocation_id = aid, user_id = uid,
      device_id = device_id, expires_at_ms = expires, previous_expires_at_ms = previous,
      duration_minutes = total_minutes})
  end

  -- Extend an active allocation, atomically with its checks; refusals are typed and kept
  -- under the request id like every answer (a repeated request gets the first one).
  local function renew(row)
    local rid, uid, reply_to, aid = row.request_id, row.user_id, row.reply_to, row.allocation_id
    local idem_key = k_user(P, uid, 'req:' .. rid)
    local first = redis.call('GET', idem_key)
    if first then send_reply(reply_to, first, reply_ttl) return end
    local function refuse(reason, msg)
      return refuse_kept(rid, uid, nil, reply_to, idem_key, reason, msg)
    end
    local akey = k_pool(P, 'alloc:' .. aid)
    local a = redis.call('HMGET', akey, unpack(ALLOC_FIELDS))
    if not a[1] then return refuse('not_found', 'Allocation ' .. aid .. ' not found') end
    if a[2] ~= uid then
      return refuse('not_owner', 'Allocation ' .. aid .. ' belongs to another user')
    end
    local old_exp = tonumber(a[7])
    if a[5] ~= 'allocated' or old_exp <= now then
      return refuse('not_active', 'Allocation ' .. aid .. ' is not active (' ..
        (a[5] == 'allocated' and 'expired' or a[5]) .. ')')
    end
    local u = redis.call('HMGET', k_state(P, uid), 'status', 'expires_at_ms')
    local blocked = u[1] and BLOCKED[u[1]]
    if blocked then
      return refuse(blocked, blocked_message(blocked, u[1], uid))
    end
    local new_exp = old_exp + row.extend_seconds * 1000
    if u[2] and u[2] ~= '' and new_exp > tonumber(u[2]) then
      return refuse('exceeds_quota_expiry', 'Renewal would end at ' .. new_exp ..
        ', after the quota expires at ' .. u[2])
    end
    local allocated_at = tonumber(a[6])
    if new_exp - allocated_at > row.max_total_s * 1000 then
      return refuse('exceeds_max_duration', 'Renewal would make the allocation last ' ..
        math.ceil((new_exp - allocated_at) / 1000) .. ' s, more than ' .. row.max_total_s .. ' s')
    end
    local booked_id, booked_at = booking_in(P, a[1], old_exp, new_exp)
    if booked_id then
      return refuse('reserved', 'Device ' .. a[1] .. ' is reserved from ' .. booked_at ..
        ' (reservation ' .. booked_id .. '): a renewal may run until then')
    end
    local minutes = math.ceil((new_exp - allocated_at) / 60000)
    local version = tonumber(a[13]) + 1
    redis.call('HSET', akey, 'expires_at_ms', new_exp, 'duration_minutes', minutes,
      'version', version)
    redis.call('ZADD', k_pool(P, 'expiry'), new_exp, aid)
    local json = renewed_reply(rid, aid, uid, a[1], new_exp, old_exp, minutes)
    send_reply(reply_to, json, reply_ttl)
    redis.call('SET', idem_key, json, 'EX', idem_ttl)
    local rec = allocation_change(aid, a[1], uid, a[3], a[4], 'allocated', allocated_at, new_exp,
      minutes, tonumber(a[9]), tonumber(a[10]), tonumber(a[11]), a[12], version, now, nil, nil)
    rec.kind = 'allocation_renewed'
    rec.previous_expires_at_ms = old_exp
    rec.extended_seconds = row.extend_seconds
    rec.renew_request_id = rid
    emit_change(changes, rec)
    bookings().claim_by_use(P, changes, now, aid)  -- renewing a reservation's allocation claims it
  end

  -- The reservation rows (bookings.lua), with what they need of this call.
  local RSV = {P = P, now = now, changes = changes, idem_ttl = idem_ttl, reply_ttl = reply_ttl,
    released_ttl = released_ttl, epoch = epoch}
  local function counted(name)
    return function(row)
      if bookings()[name](RSV, row) then n_failed = n_failed + 1 end
    end
  end

  rare_lib = {
    allocate_batch = allocate_batch,
    release_batch = release_batch,
    renew = renew,
    cancel = cancel,
    reserve = counted('reserve'),
    cancel_reservation = counted('cancel_reservation'),
    claim_reservation = counted('claim_reservation'),
    refuse = function(row)
      -- a release sent straight here that did not validate (select.py direct_item): the
      -- answer quota gives such a request (not kept as the request id's answer)
      local json = failed_reply(row.request_id, row.reason, row.message, nil)
      send_reply(row.reply_to, json, reply_ttl)
      emit_change(changes, rejected_change(row.request_id, row.user_id, row.tenant_id,
        row.reason, row.message, now))
      n_failed = n_failed + 1
    end,
    dead = function(row)
      redis.call('XADD', dead, '*', 'd', row.letter)
      n_dead = n_dead + 1
    end,
  }
  return rare_lib
end

local handlers = nil  -- made at the first call (setmetatable is a global: none at load)

-- The per-call marker, as in call.lua (this script's functions are above it).
-- @per-call
begin_call()
P, group, now = CALL.prefix, CALL.group, CALL.now_ms
idem_ttl, reply_ttl, released_ttl = CALL.idempotency_ttl_s, CALL.reply_ttl_s,
  CALL.released_ttl_s
changes, dead = KEY.changes, KEY.dead
epoch = redis.call('HGET', KEY.state, 'epoch')
if not epoch then return false end  -- no live state: change and ack nothing (stages/state.py)
n_alloc, n_release, n_failed, n_dead = 0, 0, 0, 0
id_head, id_tail = epoch .. '/', '/' .. now
pool_names, book_until, strategy_of, strategies_lib, rare_lib = nil, nil, nil, nil, nil
if CALL.hold_replies then held_replies = KEY.replies_held end
handlers = handlers or setmetatable({allocate = allocate, release = release}, {
  __index = function(_, op) return rare_rows()[op] end,
})
local acks = each_row(CALL.items, handlers)
ack_all(KEY.admitted, group, acks)
flush_stats(P)
return {n_alloc, n_release, n_failed, n_dead, held_list}
