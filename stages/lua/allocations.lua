-- Helpers of the scripts that give, take back or move devices (stages/scripts.py puts
-- this file after common.lua for every stage script but quota.lua, which needs none of
-- it: under EVALSHA every helper is made again at every call, so quota's calls are
-- cheaper without them). Its per-call state is reset by its begin_call, which wraps
-- common.lua's.

-- Active allocations per host (P:{pool}:host_active, host -> count): how many devices
-- of each host an active allocation holds, read by the least_loaded and bin_pack
-- strategies. Every script that gives a device an allocation or takes it away changes
-- it in the same atomic call: select.lua allocating and close_allocation through
-- host_active_add (added up per host, written once by flush_stats: one write per host
-- and call, not per allocation; host_pending gives a count in the middle of a call),
-- admin.lua and events.lua moving a held device to another host through
-- moves().host_now; rebuild.lua recomputes it.
local host_counts  -- set by begin_call
local function host_active_add(P, host, n)
  if host and host ~= '' then host_counts[host] = (host_counts[host] or 0) + n end
end
local function host_pending(host) return host_counts[host] or 0 end

-- What moves a device in or out of the listings or between hosts (admin.lua, events.lua,
-- rebuild.lua; never select's calls), built at its first use in a call (under EVALSHA
-- every helper defined at the top is made again at every call, so the rare ones are
-- made only when needed):
--   host_now(P, host, n): the host's active allocations count now (a held device moved
--     to another host);
--   list(P, id) / unlist(P, id): the devices listed (P:{pool}:devices, a set) and the
--     same ids sorted (P:{pool}:device_ids, every score 0, so in id order: what
--     `devices list` pages through with a cursor). Every script that lists or unlists a
--     device does it through these.
local moves_lib = nil
local function moves()
  if moves_lib then return moves_lib end
  moves_lib = {
    host_now = function(P, host, n)
      if host and host ~= '' then redis.call('HINCRBY', k_pool(P, 'host_active'), host, n) end
    end,
    list = function(P, id)
      redis.call('SADD', k_pool(P, 'devices'), id)
      redis.call('ZADD', k_pool(P, 'device_ids'), 0, id)
    end,
    unlist = function(P, id)
      redis.call('SREM', k_pool(P, 'devices'), id)
      redis.call('ZREM', k_pool(P, 'device_ids'), id)
    end,
  }
  return moves_lib
end

-- The counters (common.lua) and the active allocations per host, written once at the
-- end of a call.
local flush_counters = flush_stats
local function flush_stats(P)
  flush_counters(P)
  for host, n in pairs(host_counts) do
    if n ~= 0 then redis.call('HINCRBY', k_pool(P, 'host_active'), host, n) end
  end
end

-- Score of a device in a free pool: best fit orders by CPU, then memory.
local CPU_SCALE = 1073741824
local function fit_score(cpu, mem) return cpu * CPU_SCALE + mem end

-- --- giving a device -------------------------------------------------------------------

-- Allocated: `d` is the device's name, adb_host and adb_port, at indexes 3, 4 and 5.
local function allocated_reply(rid, aid, dev, d, uid, now, expires)
  return cjson.encode({type = 'allocated', request_id = rid, allocation_id = aid,
    device = {id = dev, name = d[3], status = 'allocated'}, user_id = uid,
    allocated_at_ms = now, expires_at_ms = expires, adb_host = d[4], adb_port = tonumber(d[5])})
end

-- What a user's state read gives select: the hold, the usage, then the quota's caps,
-- then the status (at 11).
-- (A literal: above the @per-call marker nothing may call a global, since a Redis
-- Function library's top level runs at load, where Redis 7.0 gives it none.)
local STATE_FIELDS = {'hold', 'used_devices', 'used_cpu', 'used_mem', 'used_sto',
  'max_cpu_per_device', 'max_memory_mb_per_device', 'total_cpu_cores', 'total_memory_gb',
  'total_storage_gb', 'status'}

-- A status an event set after quota admitted the request (user.suspended, user.deleted,
-- billing.overdue, payments failed): the request is refused, as quota would refuse it now,
-- so no allocation is made for a user an event just blocked.
local BLOCKED = {suspended = 'user_suspended', overdue = 'billing_overdue',
  deleted = 'quota_exceeded'}

local function blocked_message(blocked, status, uid)
  return blocked == 'quota_exceeded' and 'Quota is ' .. status
    or blocked == 'billing_overdue' and 'Billing overdue for user ' .. uid
    or 'User ' .. uid .. ' is suspended'
end

-- What one more device of this user may be, from the quota's caps (in the state read
-- `q`, from index i) and the current usage (read in the same atomic step that records
-- the allocation: exact under concurrency).
local function quota_caps(q, i, used)
  if not q[i] then return CPU_SCALE, CPU_SCALE, CPU_SCALE end  -- admitted fail-open
  return math.min(tonumber(q[i]), tonumber(q[i + 2]) - used[2]),
    math.min(tonumber(q[i + 1]), tonumber(q[i + 3]) * 1024 - used[3]),
    tonumber(q[i + 4]) * 1024 - used[4]
end

-- Replace the hold by the real size (nothing when nothing was allocated: the held
-- device slot is given back), with any further field/value pairs in the same write.
-- `used` is the usage read earlier in this same step.
local function settle_hold(P, uid, rid, hold, used, cpu, mem, sto, ...)
  if redis.call('HDEL', k_state(P, uid), 'hold:' .. rid) == 0 then return end
  local h_cpu, h_mem, h_sto = string.match(hold, '^(%-?%d+) (%-?%d+) (%-?%d+)$')
  add_usage(P, uid, used, cpu == nil and -1 or 0, (cpu or 0) - tonumber(h_cpu),
    (mem or 0) - tonumber(h_mem), (sto or 0) - tonumber(h_sto), ...)
end

-- Give the free device `dev` (of `dev_pool`, sized cpu/mem/sto; `d` its storage, model,
-- name, adb host, port, host) to the admitted request `w` (an allocate row of select, or
-- a waiter's record: request_id, user_id, tenant_id, reply_to, hold, allocation_id,
-- duration_seconds, replace_on_failure): records the allocation and its expiry, settles
-- the hold against `used` (the usage read in this step), answers, keeps the answer for
-- the request id and records the change. Callers then call flush_stats.
local function give_device(P, changes, now, w, dev, dev_pool, cpu, mem, sto, d, used, idem_ttl,
                           reply_ttl)
  local rid, uid, aid, tenant = w.request_id, w.user_id, w.allocation_id, w.tenant_id
  local seconds = w.duration_seconds
  local expires = now + seconds * 1000
  local minutes = math.ceil(seconds / 60)
  redis.call('ZREM', k_pool(P, 'free:' .. dev_pool), dev)
  redis.call('HSET', k_pool(P, 'dev:' .. dev), 'status', 'allocated', 'alloc', aid)
  redis.call('HSET', k_pool(P, 'alloc:' .. aid), 'device_id', dev, 'user_id', uid,
    'tenant_id', tenant or '', 'request_id', rid, 'status', 'allocated', 'allocated_at_ms', now,
    'expires_at_ms', expires, 'duration_minutes', minutes, 'cpu_cores', cpu, 'memory_mb', mem,
    'storage_mb', sto, 'pool', dev_pool, 'version', 1)
  if w.replace_on_failure then
    redis.call('HSET', k_pool(P, 'alloc:' .. aid), 'replace_on_failure', 1)
  end
  redis.call('ZADD', k_pool(P, 'expiry'), expires, aid)
  count_stat('allocated')
  host_active_add(P, d[6], 1)
  settle_hold(P, uid, rid, w.hold, used, cpu, mem, sto, 'alloc:' .. aid,
    cpu .. ' ' .. mem .. ' ' .. sto, 'last_device', dev, 'last_host', d[6] or '')
  local json = allocated_reply(rid, aid, dev, d, uid, now, expires)
  send_reply(w.reply_to, json, reply_ttl)
  redis.call('SET', k_user(P, uid, 'req:' .. rid), json, 'EX', idem_ttl)
  local rec = allocation_change(aid, dev, uid, tenant, rid, 'allocated', now, expires, minutes,
    cpu, mem, sto, dev_pool, 1, now, nil, nil)
  if w.replace_on_failure then rec.replace_on_failure = true end
  -- what was asked (the trace recorder and the smart model read it from PostgreSQL)
  rec.min_cpu_cores, rec.min_memory_mb = w.min_cpu_cores, w.min_memory_mb
  if w.model and w.model ~= cjson.null then rec.requested_model = w.model end
  emit_change(changes, rec)
end

-- --- bookings (reservations; the rest is in bookings.lua) ------------------------------
-- P:{pool}:bookings:<device> holds the device's reservations (booked or active) scored
-- by start; they never overlap, so ordered by start they are ordered by end too, and the
-- one starting last before `until_ms` is the only one that can still run at `from_ms`.
-- P:{pool}:booked counts them per device: its length is read once per script call
-- (booked_n) and, while it is 0, no booking is looked up at all.
local booked_n = nil  -- devices with bookings, read once per call (reset by bookings.lua)

-- The reservation booked on `dev` during [from_ms, until_ms) (its id and start), or nil.
local function booking_in(P, dev, from_ms, until_ms)
  if booked_n == nil then booked_n = redis.call('HLEN', k_pool(P, 'booked')) end
  if booked_n == 0 then return nil end
  local last = redis.call('ZREVRANGEBYSCORE', k_pool(P, 'bookings:' .. dev), '(' .. until_ms,
    '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #last == 0 then return nil end
  local ends = tonumber(redis.call('HGET', k_pool(P, 'rsv:' .. last[1]), 'end_ms'))
  if ends and ends > from_ms then return last[1], tonumber(last[2]) end
  return nil
end

-- --- the wait queue --------------------------------------------------------------------
-- An allocate request with wait_seconds that found no fitting device waits (select.lua
-- queues it through join_queue): P:{pool}:queue orders the waiters ('<user id> <request
-- id>') by arrival ms minus priority times the aging step (lowest first, then by
-- member), P:{pool}:waiters keeps each one's record (JSON: the request's fields, its
-- hold, idem_ttl and reply_ttl for its answer), P:{pool}:queue_deadline when its wait
-- ends. The waiters are also indexed by what they need, their class
-- '<pool>|<min cpu>|<min memory>|<model>' ('' for any pool or model): P:{pool}:wq:<class>
-- holds the class's waiters with their queue scores, P:{pool}:wq_classes (a set) the
-- classes that have waiters. A waiting request keeps its quota hold; its user's hash
-- counts it in 'waiting'. Joining and leaving are recorded on the changes stream
-- (WaiterChange: the write-behind keeps the waiting requests in PostgreSQL, so that a
-- rebuild re-queues them). A device that becomes free (close_allocation, a device event
-- bringing one up, an admin add, a rebuild) is offered, in the same atomic step, to the
-- first waiter in queue order that it fits (pool, model, minimums, the user's quota caps
-- read in that step), however deep the queue: only the heads of the classes it fits are
-- read (see offer_device); served, the waiter is allocated exactly as select allocates.
-- A waiter leaves with one final reply: allocated, or failed (timed_out by expire.lua or
-- when offered past its wait, cancelled, or the reason a user blocked since gets).

local queue_n = nil  -- waiters, read once per script call (ZCARD) and kept up to date
                     -- (read it through queue_count BEFORE adding or removing one)

local function queue_count(P)
  if queue_n == nil then queue_n = redis.call('ZCARD', k_pool(P, 'queue')) end
  return queue_n
end

local function queue_member(uid, rid) return uid .. ' ' .. rid end

-- The wait queue's helpers, built at their first use in a call (queue()): a call that
-- meets no waiter makes none of them (under EVALSHA every helper defined at the top is
-- made again at every call):
--   record(row, priority, queued_at, wait_until, idem_ttl, reply_ttl): a waiter's record;
--   join(P, changes, now, member, score, w, record), leave(P, changes, now, member, w,
--     reason), fail(P, changes, now, w, reason, message), time_out(P, changes, now, w);
--   offer(P, changes, now, dev): see offer_device.
local queue_lib = nil
local function queue()
  if queue_lib then return queue_lib end
  -- The class of a waiter (its record, or an allocate row): what a device must be for it.
  local function waiter_class(w)
    return (w.pool or '') .. '|' .. w.min_cpu_cores .. '|' .. w.min_memory_mb .. '|'
      .. (w.model or '')
  end

  -- The record a waiter keeps (P:{pool}:waiters), from an allocate row (or a rebuilt
  -- waiter, which has the same fields) waiting from queued_at until wait_until.
  local function waiter_record(row, priority, queued_at, wait_until, idem_ttl, reply_ttl)
    return cjson.encode({request_id = row.request_id, user_id = row.user_id,
      tenant_id = row.tenant_id, reply_to = row.reply_to, min_cpu_cores = row.min_cpu_cores,
      min_memory_mb = row.min_memory_mb, duration_seconds = row.duration_seconds,
      pool = row.pool, model = row.model, hold = row.hold, allocation_id = row.allocation_id,
      replace_on_failure = row.replace_on_failure, priority = priority,
      wait_seconds = row.wait_seconds, queued_at_ms = queued_at, wait_until_ms = wait_until,
      idem_ttl = idem_ttl, reply_ttl = reply_ttl})
  end

  -- WaiterChange: a request joined the queue (status 'waiting', with all it needs to wait
  -- again after a rebuild) or left it (status 'left', with why). The version orders the two
  -- per request (the joining's time, doubled; leaving adds one).
  local function waiter_change(w, score, status, reason, now)
    local left = status == 'left'
    return {kind = 'waiter', user_id = w.user_id, request_id = w.request_id, status = status,
      version = w.queued_at_ms * 2 + (left and 1 or 0), at_ms = now, reason = opt(reason),
      queue_score = score, queued_at_ms = w.queued_at_ms, wait_until_ms = w.wait_until_ms,
      priority = w.priority, wait_seconds = w.wait_seconds,
      tenant_id = opt(w.tenant_id), reply_to = w.reply_to, min_cpu_cores = w.min_cpu_cores,
      min_memory_mb = w.min_memory_mb, duration_seconds = w.duration_seconds,
      pool = opt(w.pool), model = opt(w.model), hold = w.hold, allocation_id = w.allocation_id,
      replace_on_failure = w.replace_on_failure and true or false,
      idem_ttl_s = w.idem_ttl, reply_ttl_s = w.reply_ttl}
  end

  -- Put a waiter in the queue with `score`, `w` its record (a table) and `record` the same
  -- as JSON; its user's 'waiting' count goes up. Records the joining on `changes` (nil: not
  -- recorded, a rebuild putting back what PostgreSQL has).
  local function join_queue(P, changes, now, member, score, w, record)
    local n = queue_count(P)  -- read before the ZADD it counts
    local cls = waiter_class(w)
    redis.call('ZADD', k_pool(P, 'queue'), score, member)
    redis.call('HSET', k_pool(P, 'waiters'), member, record)
    redis.call('ZADD', k_pool(P, 'queue_deadline'), w.wait_until_ms, member)
    redis.call('ZADD', k_pool(P, 'wq:' .. cls), score, member)
    redis.call('SADD', k_pool(P, 'wq_classes'), cls)
    redis.call('HINCRBY', k_state(P, w.user_id), 'waiting', 1)
    queue_n = n + 1
    if changes then emit_change(changes, waiter_change(w, score, 'waiting', nil, now)) end
  end

  -- Out of one class's index (the class leaves the set of classes when it has no waiter).
  local function unindex(P, cls, member)
    local key = k_pool(P, 'wq:' .. cls)
    if redis.call('ZREM', key, member) == 1 and redis.call('EXISTS', key) == 0 then
      redis.call('SREM', k_pool(P, 'wq_classes'), cls)
    end
  end

  -- Take the waiter `w` (its record) out of the queue for `reason` (allocated, timed_out,
  -- cancelled, ...), recorded on `changes`; its hold stays with the caller to settle.
  local function leave_queue(P, changes, now, member, w, reason)
    local n = queue_count(P)  -- read before the ZREM it counts
    local score = redis.call('ZSCORE', k_pool(P, 'queue'), member)
    if score then
      redis.call('ZREM', k_pool(P, 'queue'), member)
      queue_n = n - 1
      redis.call('HINCRBY', k_state(P, w.user_id), 'waiting', -1)
    end
    redis.call('HDEL', k_pool(P, 'waiters'), member)
    redis.call('ZREM', k_pool(P, 'queue_deadline'), member)
    unindex(P, waiter_class(w), member)
    emit_change(changes, waiter_change(w, tonumber(score) or 0, 'left', reason, now))
  end

  -- End a wait with a failure: out of the queue, its hold given back, the failure its
  -- final reply (kept for its request id) and recorded as a rejection.
  local function fail_waiter(P, changes, now, w, reason, message)
    local rid, uid = w.request_id, w.user_id
    leave_queue(P, changes, now, queue_member(uid, rid), w, reason)
    settle_hold(P, uid, rid, w.hold, read_usage(P, uid), nil, nil, nil)
    local json = failed_reply(rid, reason, message, nil)
    send_reply(w.reply_to, json, w.reply_ttl)
    redis.call('SET', k_user(P, uid, 'req:' .. rid), json, 'EX', w.idem_ttl)
    emit_change(changes, rejected_change(rid, uid, w.tenant_id, reason, message, now))
  end

  local function time_out_waiter(P, changes, now, w)
    fail_waiter(P, changes, now, w, 'timed_out',
      'No fitting device within ' .. w.wait_seconds .. ' s')
  end

  -- Offer the device `dev`, just made free, to the queue: the first waiter in queue order
  -- that it fits (and whose allocation would end before the device's next booking) gets
  -- it (waiters past their wait, or whose user is blocked now, are
  -- answered on the way). Returns true when a waiter got it. Costs nothing more than one
  -- ZCARD per script call while nobody waits. With waiters, it reads the set of classes,
  -- then the head of each class the device fits, and walks those heads in queue order (a
  -- merge): a class the device does not fit is never read, so a deep queue of waiters it
  -- cannot serve costs one SMEMBERS entry per class, not a read per waiter; a waiter passed
  -- over for its user's quota moves its class's head one further.
  local function offer(P, changes, now, dev)
    local d = redis.call('HMGET', k_pool(P, 'dev:' .. dev), 'storage_mb', 'model', 'name',
      'adb_host', 'adb_port', 'host', 'cpu_cores', 'memory_mb', 'pool', 'status')
    if d[10] ~= 'available' then return false end
    local cpu, mem, sto, pool = tonumber(d[7]), tonumber(d[8]), tonumber(d[1]), d[9]
    local heads = {}
    for _, cls in ipairs(redis.call('SMEMBERS', k_pool(P, 'wq_classes'))) do
      local c_pool, c_cpu, c_mem, c_model = string.match(cls, '^([^|]*)|(%d+)|(%d+)|(.*)$')
      if c_pool and (c_pool == '' or c_pool == pool) and (c_model == '' or c_model == d[2])
          and cpu >= tonumber(c_cpu) and mem >= tonumber(c_mem) then
        heads[#heads + 1] = {cls = cls, key = k_pool(P, 'wq:' .. cls), at = 0}
      end
    end
    local function read_head(h)
      local r = redis.call('ZRANGE', h.key, h.at, h.at, 'WITHSCORES')
      h.member, h.score = r[1], tonumber(r[2])
    end
    for _, h in ipairs(heads) do read_head(h) end
    while true do
      local h = nil
      for _, c in ipairs(heads) do
        if c.member and (not h or c.score < h.score
            or (c.score == h.score and c.member < h.member)) then
          h = c
        end
      end
      if not h then return false end
      local member = h.member
      local raw = redis.call('HGET', k_pool(P, 'waiters'), member)
      local w = raw and cjson.decode(raw)
      if not w then
        -- no record: nothing to answer (queue_n was read at the top of this call)
        queue_n = queue_n - redis.call('ZREM', k_pool(P, 'queue'), member)
        unindex(P, h.cls, member)
      elseif w.wait_until_ms <= now then
        time_out_waiter(P, changes, now, w)
      elseif booking_in(P, dev, now, now + w.duration_seconds * 1000) then
        h.at = h.at + 1  -- it would run into the device's next booking: the next of its class
        member = nil
      else
        STATE_FIELDS[1] = 'hold:' .. w.request_id
        local s = redis.call('HMGET', k_state(P, w.user_id), unpack(STATE_FIELDS))
        local blocked = s[11] and BLOCKED[s[11]]
        if not s[1] then
          fail_waiter(P, changes, now, w, 'cancelled', 'The quota hold of the waiting request is gone')
        elseif blocked then
          fail_waiter(P, changes, now, w, blocked, blocked_message(blocked, s[11], w.user_id))
        else
          local used = usage_at(s, 2)
          local cap_cpu, cap_mem, cap_sto = quota_caps(s, 6, used)
          if cpu <= cap_cpu and mem <= cap_mem and sto <= cap_sto then
            leave_queue(P, changes, now, member, w, 'allocated')
            give_device(P, changes, now, w, dev, pool, cpu, mem, sto, d, used, w.idem_ttl,
              w.reply_ttl)
            return true
          end
          h.at = h.at + 1  -- passed over (its user's quota): the next of its class
          member = nil
        end
      end
      if h.member == member and redis.call('ZSCORE', h.key, member) then
        h.at = h.at + 1  -- still indexed (never expected): step over it rather than loop
      end
      read_head(h)
    end
  end

  queue_lib = {record = waiter_record, join = join_queue, leave = leave_queue, fail = fail_waiter,
    time_out = time_out_waiter, offer = offer}
  return queue_lib
end

-- Offer the device `dev`, just made free, to the first waiter it fits (queue().offer);
-- one ZCARD per call while nobody waits, and then no queue helper is made at all.
local function offer_device(P, changes, now, dev)
  if queue_count(P) == 0 then return false end
  return queue().offer(P, changes, now, dev)
end

-- The allocation fields close_allocation reads, in this order.
local ALLOC_FIELDS = {'device_id', 'user_id', 'tenant_id', 'request_id', 'status',
  'allocated_at_ms', 'expires_at_ms', 'duration_minutes', 'cpu_cores', 'memory_mb', 'storage_mb',
  'pool', 'version'}

-- Close an active allocation as `status` ('released' or 'expired') at end_ms, for
-- `reason` (an EndReason of schemas/messages.py: 'released', 'expired', 'device_failed',
-- ...). Frees the device (back to its free pool only if it is still 'allocated': a device
-- an event took down stays out), gives the usage back, records the change. Returns the
-- change, or nil when the allocation is not active (so a second close is a no-op).
-- The closed allocation keeps only what a second release answers from (device, user,
-- status, end, duration, version, end_reason, released_by) for released_ttl: the change
-- carries the whole allocation to PostgreSQL. A device it puts back in its free pool is
-- offered to the wait queue (offer_device) in the same step.
-- `a` is the allocation as HMGET of ALLOC_FIELDS, when the caller has read it already.
-- `by`: the id of the release request closing it (select.lua's release answers that
-- request again from the record it keeps: released_by), else nil.
local function close_allocation(P, changes, aid, end_ms, status, now, released_ttl, a, reason,
                                by)
  local akey = k_pool(P, 'alloc:' .. aid)
  a = a or redis.call('HMGET', akey, unpack(ALLOC_FIELDS))
  if not a[1] or a[5] ~= 'allocated' then return nil end
  local allocated_at = tonumber(a[6])
  if end_ms < allocated_at then end_ms = allocated_at end
  local dur = math.floor((end_ms - allocated_at) / 1000)
  local version = tonumber(a[13]) + 1
  redis.call('DEL', akey)
  redis.call('HSET', akey, 'device_id', a[1], 'user_id', a[2], 'status', status,
    'released_at_ms', end_ms, 'duration_seconds', dur, 'version', version, 'end_reason', reason,
    'released_by', by or '')
  redis.call('EXPIRE', akey, released_ttl)
  redis.call('ZREM', k_pool(P, 'expiry'), aid)
  count_stat(status)
  local dkey = k_pool(P, 'dev:' .. a[1])
  local d = redis.call('HMGET', dkey, 'alloc', 'status', 'cpu_cores', 'memory_mb', 'pool', 'host')
  local freed = false
  if d[1] == aid then
    host_active_add(P, d[6], -1)
    if d[2] == 'allocated' then
      redis.call('HSET', dkey, 'alloc', '', 'last_alloc', aid, 'status', 'available')
      redis.call('ZADD', k_pool(P, 'free:' .. d[5]), fit_score(tonumber(d[3]), tonumber(d[4])), a[1])
      freed = true
    else
      redis.call('HSET', dkey, 'alloc', '', 'last_alloc', aid)
    end
  end
  local cpu, mem, sto = tonumber(a[9]), tonumber(a[10]), tonumber(a[11])
  if redis.call('HDEL', k_state(P, a[2]), 'alloc:' .. aid) == 1 then
    -- the user's usage gives this allocation back (read and written in this atomic step)
    add_usage(P, a[2], read_usage(P, a[2]), -1, 0 - cpu, 0 - mem, 0 - sto)
  end
  local rec = allocation_change(aid, a[1], a[2], a[3], a[4], status, allocated_at, tonumber(a[7]),
    tonumber(a[8]), cpu, mem, sto, a[12], version, now, end_ms, dur, reason)
  emit_change(changes, rec)
  -- the device, free again, goes to the first waiter it fits (after the usage is given
  -- back: that user may be the waiter), in this same step
  if freed then offer_device(P, changes, now, a[1]) end
  return rec
end

local begin_common_call = begin_call
local function begin_call()
  begin_common_call()
  host_counts, booked_n, queue_n = {}, nil, nil
end
