-- quota: admit or refuse a batch of requests, and ack them, in one atomic step.
-- KEY: requests, admitted, changes, dead (streams); state (the state marker, {pool}).
-- CALL: schemas.rows.QuotaCall (prefix, group, now_ms, idempotency_ttl_s, reply_ttl_s,
-- fail_open, rate, billing_check, billing_max_age_ms, items); each item one row, by op:
--   admit:   an allocate request to check (request_id, user_id, tenant_id, reply_to,
--            min_cpu_cores, min_memory_mb, count, best_effort, payload); a batch (count >
--            1) holds count devices (all_or_nothing: refused when the device quota has
--            not room for all) or as many as there is room for (best_effort), its hold
--            "0 0 0 n"; it takes one token of a rate limit, as any request
--   forward: a request that goes on unchanged, e.g. a release (payload)
--   refuse:  invalid input, answered at once (request_id, user_id, tenant_id, reply_to,
--            reason, message)
--   renew:   a renew request (request_id, user_id, reply_to, payload): the user must be
--            active with a quota not expired and, with billing_check, in good billing
--            standing as for an allocation (billing_overdue; failing closed,
--            billing_unavailable); it goes on to select holding nothing
--   reserve: a reserve request (request_id, user_id, reply_to, payload): checked as a
--            renewal; select checks the rest atomically with the booking
--   dead:    a dead letter to add (letter)
-- Per user it touches only keys tagged {u:ID} (and, with a tenant rate limit on, the
-- tenant's bucket, tagged {t:TENANT}: see the rate limits below). It refuses what the quota can never
-- allow (status, expiry, device count, per-device caps, totals already used up) and
-- an admitted allocation holds one device of the user's count, so concurrent
-- requests can never take a user past max_devices; select checks the resource
-- totals against the chosen device and settles the hold, or gives it back. A request id already answered gets its
-- first answer again and changes nothing. Returns {admitted, refused, dead}; nil, having
-- changed and acked nothing, when the state marker has no epoch (Redis holds no live
-- state: nothing is answered from nothing; stages/state.py).

-- What one call works with, and its counts: declared above the per-call marker (at the
-- end of this file), so that on Redis 7 the functions below are made once, when the
-- library loads; each is set afresh at every call, below the marker.
local P, group, now, idem_ttl, reply_ttl, fail_open, admitted, changes, dead
local billing_check, billing_max_age, rate
local n_admitted, n_refused, n_dead

local function refuse(rid, uid, tenant, reply_to, reason, message, remaining, idem_key)
  local json = failed_reply(rid, reason, message, remaining)
  send_reply(reply_to, json, reply_ttl)
  if idem_key then redis.call('SET', idem_key, json, 'EX', idem_ttl) end
  emit_change(changes, rejected_change(rid, uid, tenant, reason, message, now))
  n_refused = n_refused + 1
end

local function num(v) return tonumber(v) or 0 end

-- Rate limits (CALL.rate: present only when a limit is on; absent, nothing below runs):
-- token buckets of allocate requests, the user's (P:{u:ID}:rate) and, for a request that
-- names a tenant, the tenant's (P:{t:TENANT}:rate), each a hash {tokens, at_ms} refilled
-- at per_s tokens a second up to its burst (a missing bucket is full). A request takes
-- one token of each bucket, or none: it is refused `rate_limited` with retry_after_ms
-- (when every bucket it needs has a token again). The refusal is not kept as the request
-- id's answer: the same id may come back after that time. A request id answered before,
-- or in flight already, takes no token. A bucket expires once it would be full again.
-- On Redis Cluster the tenant's key is in another slot than the user's: the check there
-- is two steps, the tenant's first (take a tenant token in the tenant's slot, or refuse),
-- then this script in the user's slot, which gives the tenant token back (a second call
-- to the tenant's slot) when it refuses the request; a crash between the two loses at
-- most one tenant token for one refill period.
-- Made at the first request a limit applies to (under EVALSHA every function defined at
-- the top is made again at every call; under Functions this is made once and kept: it
-- reads the call's values, `rate` among them, when it runs).
local rate_lib = nil
local function rate_limits()
  if rate_lib then return rate_lib end
  -- Buckets count thousandths of a token (whole numbers: exact waits), per_s of which
  -- come back per millisecond.
  local function bucket_tokens(key, per_s, burst)
    local b = redis.call('HMGET', key, 'tokens', 'at_ms')
    local milli, at = tonumber(b[1]), tonumber(b[2])
    if not milli then return burst * 1000 end
    if now > at then milli = math.min(burst * 1000, milli + math.floor((now - at) * per_s)) end
    return milli
  end

  local function bucket_keep(key, milli, per_s, burst)
    redis.call('HSET', key, 'tokens', milli, 'at_ms', now)
    redis.call('PEXPIRE', key, math.ceil((burst * 1000 - milli) / per_s) + 60000)
  end

  -- Milliseconds until a bucket holding `milli` has a whole token.
  local function wait_ms(milli, per_s) return math.ceil((1000 - milli) / per_s - 1e-9) end

  -- nil when the request may go on (its tokens taken), else (retry_after_ms, whose limit).
  local function take_tokens(uid, tenant)
    local ukey, u, tkey, t
    local wait, who = 0, nil
    if rate.user_per_s then
      ukey = k_user(P, uid, 'rate')
      u = bucket_tokens(ukey, rate.user_per_s, rate.user_burst)
      if u < 1000 then wait, who = wait_ms(u, rate.user_per_s), 'user ' .. uid end
    end
    if rate.tenant_per_s and tenant then
      tkey = P .. ':{t:' .. tenant .. '}:rate'
      t = bucket_tokens(tkey, rate.tenant_per_s, rate.tenant_burst)
      if t < 1000 and wait_ms(t, rate.tenant_per_s) > wait then
        wait, who = wait_ms(t, rate.tenant_per_s), 'tenant ' .. tenant
      end
    end
    if who then return wait, who end
    if ukey then bucket_keep(ukey, u - 1000, rate.user_per_s, rate.user_burst) end
    if tkey then bucket_keep(tkey, t - 1000, rate.tenant_per_s, rate.tenant_burst) end
    return nil
  end

  -- Failed with reason rate_limited (the one reply only quota sends).
  local function rate_limited_reply(rid, message, retry_after)
    return cjson.encode({type = 'failed', request_id = rid, reason = 'rate_limited',
      message = message, remaining_devices = cjson.null, retry_after_ms = retry_after})
  end

  rate_lib = {take_tokens = take_tokens, reply = rate_limited_reply}
  return rate_lib
end

local function admit(row)
  local rid, uid, tenant, reply_to = row.request_id, row.user_id, row.tenant_id, row.reply_to
  local min_cpu, min_mem = row.min_cpu_cores, row.min_memory_mb
  local idem_key = k_user(P, uid, 'req:' .. rid)
  local first = redis.call('GET', idem_key)
  if first then send_reply(reply_to, first, reply_ttl) return end
  local state = k_state(P, uid)
  -- the hold, the quota (q[2..9]) and the usage (q[10..13]), in one read
  local q = redis.call('HMGET', state, 'hold:' .. rid, 'status', 'expires_at_ms', 'max_devices',
    'max_cpu_per_device', 'max_memory_mb_per_device', 'total_cpu_cores', 'total_memory_gb',
    'total_storage_gb', unpack(USAGE_FIELDS))
  if q[1] then
    -- in flight already: hand it on again, select answers it once
    redis.call('XADD', admitted, '*', 'd', row.payload, 'c', q[1])
    n_admitted = n_admitted + 1
    return
  end
  if rate then
    local limits = rate_limits()
    local wait, who = limits.take_tokens(uid, tenant)
    if wait then
      local msg = 'Rate limit of ' .. who .. ' exceeded; retry after ' .. wait .. ' ms'
      send_reply(reply_to, limits.reply(rid, msg, wait), reply_ttl)
      emit_change(changes, rejected_change(rid, uid, tenant, 'rate_limited', msg, now))
      n_refused = n_refused + 1
      return
    end
  end
  table.remove(q, 1)
  local used = usage_at(q, 9)
  local used_dev, used_cpu, used_mem, used_sto = used[1], used[2], used[3], used[4]
  local cap_cpu, cap_mem, cap_sto
  local held = row.count  -- devices of the count it holds (a batch's may be fewer)
  if not q[1] then
    if not fail_open then
      return refuse(rid, uid, tenant, reply_to, 'quota_exceeded',
        'No quota configured for user ' .. uid, 0, idem_key)
    end
    cap_cpu, cap_mem, cap_sto = 1073741824, 1073741824, 1073741824
  else
    local status = q[1]
    if status == 'suspended' then
      return refuse(rid, uid, tenant, reply_to, 'user_suspended', 'User ' .. uid .. ' is suspended', nil, idem_key)
    elseif status == 'overdue' then
      return refuse(rid, uid, tenant, reply_to, 'billing_overdue', 'Billing overdue for user ' .. uid, nil, idem_key)
    elseif status ~= 'active' then
      return refuse(rid, uid, tenant, reply_to, 'quota_exceeded', 'Quota is ' .. status, 0, idem_key)
    end
    if q[2] and q[2] ~= '' and tonumber(q[2]) <= now then
      return refuse(rid, uid, tenant, reply_to, 'quota_exceeded', 'Quota expired', 0, idem_key)
    end
    if billing_check then
      -- the standing the export stage keeps fresh (stages/export.py); no HTTP call here
      local b = redis.call('HMGET', state, 'billing_status', 'billing_checked_ms')
      if b[1] == 'overdue' then
        return refuse(rid, uid, tenant, reply_to, 'billing_overdue', 'Billing overdue for user ' .. uid, nil, idem_key)
      end
      if billing_max_age and (not b[2] or now - tonumber(b[2]) > billing_max_age) then
        -- failing closed; not kept as the request id's answer: a retry may pass
        return refuse(rid, uid, tenant, reply_to, 'billing_unavailable',
          'Billing standing of user ' .. uid .. ' is unknown; try again shortly', nil, nil)
      end
    end
    local max_dev = num(q[3])
    if used_dev >= max_dev then
      return refuse(rid, uid, tenant, reply_to, 'quota_exceeded',
        'Device quota exceeded. Max: ' .. max_dev .. ', Current: ' .. used_dev, 0, idem_key)
    end
    local remaining = max_dev - used_dev
    if held > remaining then
      if not row.best_effort then  -- all or nothing: the whole batch within the count
        return refuse(rid, uid, tenant, reply_to, 'quota_exceeded',
          'Device quota exceeded. Max: ' .. max_dev .. ', Current: ' .. used_dev ..
          ', Requested: ' .. held, remaining, idem_key)
      end
      held = remaining
    end
    local per_cpu, per_mem = num(q[4]), num(q[5])
    if min_cpu > per_cpu then
      return refuse(rid, uid, tenant, reply_to, 'quota_exceeded',
        'CPU per device exceeds quota. Max: ' .. per_cpu .. ', Requested: ' .. min_cpu, remaining, idem_key)
    end
    if min_mem > per_mem then
      return refuse(rid, uid, tenant, reply_to, 'quota_exceeded',
        'Memory per device exceeds quota. Max: ' .. per_mem .. ' MB, Requested: ' .. min_mem .. ' MB',
        remaining, idem_key)
    end
    local total_cpu, total_mem, total_sto = num(q[6]), num(q[7]) * 1024, num(q[8]) * 1024
    cap_cpu = math.min(per_cpu, total_cpu - used_cpu)
    cap_mem = math.min(per_mem, total_mem - used_mem)
    cap_sto = total_sto - used_sto
    if cap_cpu < math.max(min_cpu, 1) then
      return refuse(rid, uid, tenant, reply_to, 'quota_exceeded',
        'Total CPU quota exceeded. Max: ' .. total_cpu .. ', Current: ' .. used_cpu, remaining, idem_key)
    end
    if cap_mem < math.max(min_mem, 1) then
      return refuse(rid, uid, tenant, reply_to, 'quota_exceeded',
        'Total memory quota exceeded. Max: ' .. num(q[7]) .. ' GB, Current: ' .. used_mem .. ' MB',
        remaining, idem_key)
    end
    if cap_sto < 0 then
      return refuse(rid, uid, tenant, reply_to, 'quota_exceeded',
        'Total storage quota exceeded. Max: ' .. num(q[8]) .. ' GB, Current: ' .. used_sto .. ' MB',
        remaining, idem_key)
    end
  end
  -- hold one device of the count; the resource totals are checked exactly by select,
  -- against the chosen device, in the same atomic step that records its usage
  local hold = '0 0 0'
  if row.count > 1 then hold = '0 0 0 ' .. held end  -- a batch holds `held` devices
  redis.call('HSET', state, 'hold:' .. rid, hold, 'used_devices', used_dev + held)
  redis.call('XADD', admitted, '*', 'd', row.payload, 'c', hold)
  n_admitted = n_admitted + 1
end

-- A request that goes on to select unchanged, holding nothing.
local function forward(row)
  redis.call('XADD', admitted, '*', 'd', row.payload, 'c', '')
  n_admitted = n_admitted + 1
end

-- A renewal needs an active user whose quota has not expired and whose billing standing
-- admits an allocation (when the billing check is on); select checks the rest
-- (owner, active, the new expires-at against the quota's expiry and the longest length)
-- atomically with the extension.
local function renew(row)
  local rid, uid, reply_to = row.request_id, row.user_id, row.reply_to
  local idem_key = k_user(P, uid, 'req:' .. rid)
  local first = redis.call('GET', idem_key)
  if first then send_reply(reply_to, first, reply_ttl) return end
  local q = redis.call('HMGET', k_state(P, uid), 'status', 'expires_at_ms', 'billing_status',
    'billing_checked_ms')
  local status = q[1]
  if not status then
    if not fail_open then
      return refuse(rid, uid, nil, reply_to, 'quota_exceeded',
        'No quota configured for user ' .. uid, 0, idem_key)
    end
  elseif status == 'suspended' then
    return refuse(rid, uid, nil, reply_to, 'user_suspended', 'User ' .. uid .. ' is suspended',
      nil, idem_key)
  elseif status == 'overdue' then
    return refuse(rid, uid, nil, reply_to, 'billing_overdue', 'Billing overdue for user ' .. uid,
      nil, idem_key)
  elseif status ~= 'active' then
    return refuse(rid, uid, nil, reply_to, 'quota_exceeded', 'Quota is ' .. status, 0, idem_key)
  elseif q[2] and q[2] ~= '' and tonumber(q[2]) <= now then
    return refuse(rid, uid, nil, reply_to, 'quota_exceeded', 'Quota expired', 0, idem_key)
  elseif billing_check and q[3] == 'overdue' then
    -- the same standing admission checks (stages/export.py keeps it fresh)
    return refuse(rid, uid, nil, reply_to, 'billing_overdue', 'Billing overdue for user ' .. uid,
      nil, idem_key)
  elseif billing_check and billing_max_age and (not q[4] or now - tonumber(q[4]) > billing_max_age) then
    -- failing closed; not kept as the request id's answer: a retry may pass
    return refuse(rid, uid, nil, reply_to, 'billing_unavailable',
      'Billing standing of user ' .. uid .. ' is unknown; try again shortly', nil, nil)
  end
  forward(row)
end

local handlers = {
  admit = admit,
  renew = renew,
  reserve = renew,  -- a reservation is admitted as a renewal is (user active, quota live)
  forward = forward,
  refuse = function(row)
    refuse(row.request_id, row.user_id, row.tenant_id, row.reply_to, row.reason, row.message,
      nil, nil)
  end,
  dead = function(row)
    redis.call('XADD', dead, '*', 'd', row.letter)
    n_dead = n_dead + 1
  end,
}

-- The per-call marker, as in call.lua (this script's functions are above it).
-- @per-call
begin_call()
if redis.call('HEXISTS', KEY.state, 'epoch') == 0 then return false end
P, group, now = CALL.prefix, CALL.group, CALL.now_ms
idem_ttl, reply_ttl, fail_open = CALL.idempotency_ttl_s, CALL.reply_ttl_s, CALL.fail_open
admitted, changes, dead = KEY.admitted, KEY.changes, KEY.dead
billing_check, billing_max_age, rate = CALL.billing_check, CALL.billing_max_age_ms, CALL.rate
n_admitted, n_refused, n_dead = 0, 0, 0
local acks = each_row(CALL.items, handlers)
ack_all(KEY.requests, group, acks)
return {n_admitted, n_refused, n_dead}
