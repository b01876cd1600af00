-- schedules: the live state of the global interval schedules (stages/schedules.py).
-- KEYS: tenants (the registry hash), events (the events stream; only XACK), changes (the
-- changes stream: TenantChange and ScheduleChange are added there). Every other
-- key is named from CALL.prefix under the hash tag {sched} (schemas.keys.Keys.sched_tenants
-- lists them). CALL: schemas.rows.SchedulesCall.
-- What it guarantees, atomically per call:
--  * every call first makes sure the schedule of each (kind x tier) exists and moves the
--    tenants whose override expired back to their tier;
--  * a tenant is in exactly one batch per kind while it is registered, in none after its
--    deletion: a plan change or an override moves it (out of the old batch, into the new
--    schedule's) inside one call, so no reader ever sees it in two batches or in none;
--  * a batch holds at most CALL.capacity tenants: a tenant goes to the lowest-numbered
--    batch with room, else a new batch (start offset n x stagger, modulo the interval);
--    a batch left empty is removed (a new batch takes the lowest free number);
--  * claim: a batch is claimed at most once per period (its next run moves to the next
--    boundary with its offset in the same step), whichever worker asks; a claim past its
--    deadline belongs to a dead worker (the set `running` holds each claim by deadline):
--    the next scheduled claim reports it stale and claims the batch again for the SAME
--    period (its period_end_ms), once; a re-run found dead too puts the batch's tenants in
--    the retry queue for that period instead; a claim's deadline is a lease (lease_ms)
--    its run renews (renew: {ok|lost}) while it works;
--  * write-behind: every change of a tenant (created, plan changed, override set, cleared
--    or run out, event version, deleted) adds a TenantChange to the changes stream, and
--    every pause or resume a ScheduleChange, in the step that makes it, each with the next
--    value of one counter (`change_version`) as its version; `restore` (devsched rebuild)
--    writes tenants back and emits nothing;
--  * finish: the failed tenants of a run enter the retry queue; retry_finish backs off
--    (backoff x factor^tries) and, past max_retries, moves the item to permanently failed;
--  * tenant events: each event id applied once, versions per tenant only forward, and the
--    entries acked in the same call.
local P, now = CALL.prefix, CALL.now_ms
local cap, stagger = CALL.capacity, CALL.stagger_ms

local function K(name) return P .. ':{sched}:' .. name end
local function int(x) return string.format('%d', x) end
local function num(x) return tonumber(x or '0') or 0 end

local function label(ms)
  if ms % 3600000 == 0 then return int(ms / 3600000) .. 'h' end
  if ms % 60000 == 0 then return int(ms / 60000) .. 'm' end
  if ms % 1000 == 0 then return int(ms / 1000) .. 's' end
  return int(ms) .. 'ms'
end

local tier_of = {}
for _, t in ipairs(CALL.tiers) do tier_of[t.plan] = t.interval_ms end

local function next_run(iv, off)
  return math.floor((now - off) / iv) * iv + iv + off
end

local function ensure_schedule(kind, iv, fixed)
  local sid = kind .. ':' .. label(iv)
  local skey = K('schedule:' .. sid)
  if redis.call('EXISTS', skey) == 0 then
    redis.call('HSET', skey, 'kind', kind, 'tier', label(iv), 'interval_ms', int(iv),
      'paused', '0', 'tenants', '0', 'fixed', fixed and '1' or '0')
    redis.call('SADD', K('schedules'), sid)
  elseif fixed then
    redis.call('HSET', skey, 'fixed', '1')
  end
  return sid
end

local function batch_numbers(sid)
  local nums = {}
  for _, n in ipairs(redis.call('SMEMBERS', K('batches:' .. sid))) do nums[#nums + 1] = tonumber(n) end
  table.sort(nums)
  return nums
end

local function new_batch(sid)
  local skey = K('schedule:' .. sid)
  local iv = num(redis.call('HGET', skey, 'interval_ms'))
  local n = 0  -- the lowest free number (its offset follows from it)
  while redis.call('SISMEMBER', K('batches:' .. sid), int(n)) == 1 do n = n + 1 end
  local ref = sid .. '#' .. int(n)
  local off = (n * stagger) % iv
  local nr = next_run(iv, off)
  redis.call('HSET', K('batch:' .. ref), 'size', '0', 'offset_ms', int(off),
    'next_run_ms', int(nr), 'running', '', 'last_status', '')
  redis.call('SADD', K('batches:' .. sid), int(n))
  redis.call('ZADD', K('due'), nr, ref)
  return ref
end

local function drop_batch(sid, ref)
  local n = string.sub(ref, #sid + 2)
  redis.call('DEL', K('batch:' .. ref), K('members:' .. ref))
  redis.call('SREM', K('batches:' .. sid), n)
  redis.call('ZREM', K('due'), ref)
  redis.call('ZREM', K('running'), ref)
  local skey = K('schedule:' .. sid)
  if redis.call('SCARD', K('batches:' .. sid)) == 0 and redis.call('HGET', skey, 'fixed') ~= '1' then
    redis.call('DEL', skey, K('batches:' .. sid))
    redis.call('SREM', K('schedules'), sid)
  end
end

local function sid_of(ref) return string.match(ref, '^(.*)#%d+$') end

-- The tenant's state as a TenantChange (schemas/messages.py) on the changes stream.
-- A deleted tenant's change names the plan it had (`gone_plan`).
local function tenant_change(tenant, action, gone_plan)
  local c = {kind = 'tenant', tenant_id = tenant, action = action,
    version = redis.call('INCR', K('change_version')), at_ms = now}
  if action == 'deleted' then
    c.status, c.plan = 'deleted', gone_plan or nil
  else
    local h = redis.call('HMGET', K('tenant:' .. tenant), 'plan', 'override_ms',
      'override_until_ms', 'created_ms')
    c.status = 'active'
    c.plan = h[1] or nil
    if h[2] and h[2] ~= '' and num(h[3]) > now then
      c.override_ms, c.override_until_ms = tonumber(h[2]), tonumber(h[3])
    end
    if h[4] then c.created_at_ms = tonumber(h[4]) end
  end
  local ev = redis.call('HGET', K('versions'), tenant)
  if ev then c.event_version = tonumber(ev) end
  redis.call('XADD', KEY.changes, '*', 'd', cjson.encode(c))
end

local function add_to(ref, sid, tenant, kind)
  redis.call('SADD', K('members:' .. ref), tenant)
  redis.call('HINCRBY', K('batch:' .. ref), 'size', 1)
  redis.call('HINCRBY', K('schedule:' .. sid), 'tenants', 1)
  redis.call('HSET', K('tenant:' .. tenant), 'b:' .. kind, ref)
end

local function place(tenant, kind, iv)
  local sid = ensure_schedule(kind, iv, false)
  for _, n in ipairs(batch_numbers(sid)) do
    local ref = sid .. '#' .. int(n)
    if num(redis.call('HGET', K('batch:' .. ref), 'size')) < cap then
      add_to(ref, sid, tenant, kind)
      return ref
    end
  end
  local ref = new_batch(sid)
  add_to(ref, sid, tenant, kind)
  return ref
end

local function unplace(tenant, kind)
  local tkey = K('tenant:' .. tenant)
  local ref = redis.call('HGET', tkey, 'b:' .. kind)
  if not ref then return end
  local sid = sid_of(ref)
  redis.call('HDEL', tkey, 'b:' .. kind)
  if redis.call('SREM', K('members:' .. ref), tenant) == 1 then
    redis.call('HINCRBY', K('schedule:' .. sid), 'tenants', -1)
    if redis.call('HINCRBY', K('batch:' .. ref), 'size', -1) <= 0 then drop_batch(sid, ref) end
  end
end

-- The interval a tenant runs at now: its override while it lasts, else its plan's tier.
local function interval_of(tenant)
  local h = redis.call('HMGET', K('tenant:' .. tenant), 'plan', 'override_ms', 'override_until_ms')
  if h[2] and h[2] ~= '' and num(h[3]) > now then return tonumber(h[2]) end
  return tier_of[h[1]]
end

-- Put the tenant in the right schedule of every kind (moving it when it is elsewhere).
local function settle(tenant)
  local iv = interval_of(tenant)
  for _, kind in ipairs(CALL.kinds) do
    local ref = redis.call('HGET', K('tenant:' .. tenant), 'b:' .. kind)
    if not ref or sid_of(ref) ~= kind .. ':' .. label(iv) then
      unplace(tenant, kind)
      place(tenant, kind, iv)
    end
  end
end

local function remove_tenant(tenant)
  for _, kind in ipairs(CALL.kinds) do
    unplace(tenant, kind)
    local item = kind .. '|' .. tenant
    redis.call('ZREM', K('retry'), item)
    redis.call('DEL', K('retry:' .. item))
  end
  redis.call('ZREM', K('overrides'), tenant)
  redis.call('DEL', K('tenant:' .. tenant))
  redis.call('HDEL', KEY.tenants, tenant)
end

-- every call: the tier schedules exist, and expired overrides are settled
for _, t in ipairs(CALL.tiers) do
  for _, kind in ipairs(CALL.kinds) do ensure_schedule(kind, t.interval_ms, true) end
end
for _, tenant in ipairs(redis.call('ZRANGEBYSCORE', K('overrides'), '-inf', now)) do
  redis.call('ZREM', K('overrides'), tenant)
  redis.call('HDEL', K('tenant:' .. tenant), 'override_ms', 'override_until_ms')
  if redis.call('HEXISTS', KEY.tenants, tenant) == 1 then
    settle(tenant)
    tenant_change(tenant, 'override_expired')
  end
end

if CALL.tenants then
  local out = {}
  for _, op in ipairs(CALL.tenants) do
    local status, gone_plan
    local tenant = op.tenant_id
    local last = tonumber(redis.call('HGET', K('versions'), tenant) or '-1')
    if op.event_id and redis.call('EXISTS', K('event:' .. op.event_id)) == 1 then
      status = 'duplicate'
    elseif op.version and op.version <= last then
      status = 'stale'
    elseif op.action == 'delete' then
      gone_plan = redis.call('HGET', KEY.tenants, tenant)
      if gone_plan then
        remove_tenant(tenant); status = 'deleted'
      else
        status = 'not_found'
      end
    elseif not tier_of[op.plan] then
      status = 'unknown_plan'
    else
      local old = redis.call('HGET', KEY.tenants, tenant)
      if old == op.plan then
        status = 'unchanged'
      else
        status = old and 'plan_changed' or 'created'
        redis.call('HSET', KEY.tenants, tenant, op.plan)
        redis.call('HSET', K('tenant:' .. tenant), 'plan', op.plan, 'updated_ms', int(now))
        if not old then redis.call('HSET', K('tenant:' .. tenant), 'created_ms', int(now)) end
        settle(tenant)
      end
    end
    if op.event_id and status ~= 'duplicate' then
      redis.call('SET', K('event:' .. op.event_id), '1', 'EX', CALL.event_ttl_s)
      if op.version and status ~= 'stale' then
        redis.call('HSET', K('versions'), tenant, int(op.version))
      end
    end
    if status == 'created' or status == 'plan_changed' or status == 'deleted' then
      tenant_change(tenant, status, gone_plan)
    elseif status == 'unchanged' and op.event_id and op.version then
      tenant_change(tenant, 'event_version')
    end
    if op.entry_id then redis.call('XACK', KEY.events, CALL.group, op.entry_id) end
    out[#out + 1] = {tenant, status}
  end
  return out
end

if CALL.override then
  local o = CALL.override
  local tkey = K('tenant:' .. o.tenant_id)
  if redis.call('HEXISTS', KEY.tenants, o.tenant_id) == 0 then return {'not_found'} end
  if o.every_ms then
    redis.call('HSET', tkey, 'override_ms', int(o.every_ms), 'override_until_ms', int(o.until_ms))
    redis.call('ZADD', K('overrides'), o.until_ms, o.tenant_id)
  else
    redis.call('HDEL', tkey, 'override_ms', 'override_until_ms')
    redis.call('ZREM', K('overrides'), o.tenant_id)
  end
  settle(o.tenant_id)
  tenant_change(o.tenant_id, o.every_ms and 'override_set' or 'override_cleared')
  return {'ok'}
end

if CALL.restore then
  local r = CALL.restore
  local tenants, paused = 0, 0
  for _, t in ipairs(r.tenants or {}) do
    if tier_of[t.plan] then  -- a plan no longer configured is left out (reported)
      local tkey = K('tenant:' .. t.tenant_id)
      redis.call('HSET', KEY.tenants, t.tenant_id, t.plan)
      redis.call('HSET', tkey, 'plan', t.plan, 'updated_ms', int(now),
        'created_ms', int(t.created_at_ms or now))
      if t.override_ms and t.override_until_ms and t.override_until_ms > now then
        redis.call('HSET', tkey, 'override_ms', int(t.override_ms),
          'override_until_ms', int(t.override_until_ms))
        redis.call('ZADD', K('overrides'), t.override_until_ms, t.tenant_id)
      end
      if t.event_version then
        redis.call('HSET', K('versions'), t.tenant_id, int(t.event_version))
      end
      settle(t.tenant_id)
      tenants = tenants + 1
    end
  end
  for _, sid in ipairs(r.paused or {}) do
    if redis.call('EXISTS', K('schedule:' .. sid)) == 1 then
      redis.call('HSET', K('schedule:' .. sid), 'paused', '1')
      paused = paused + 1
    end
  end
  if num(redis.call('GET', K('change_version'))) < r.version then
    redis.call('SET', K('change_version'), int(r.version))
  end
  return {tenants, paused}
end

local function retry_due(tries)
  return now + CALL.backoff_ms * (CALL.backoff_factor ^ tries)
end

local function to_retry(kind, tenant, err, period_end)
  local item = kind .. '|' .. tenant
  local rkey = K('retry:' .. item)
  if redis.call('EXISTS', rkey) == 1 or redis.call('HEXISTS', K('failed'), item) == 1 then
    return  -- already waiting (or failed for good): one entry per tenant and kind
  end
  redis.call('HSET', rkey, 'kind', kind, 'tenant_id', tenant, 'tries', '0', 'error', err,
    'first_ms', int(now), 'period_end_ms', int(period_end), 'token', '')
  redis.call('ZADD', K('retry'), retry_due(0), item)
end

-- Claim the batch for the run `eid` covering the period that ends at `period_end`.
local function take(ref, eid, timeout, manual, period_end, rerun)
  redis.call('HSET', K('batch:' .. ref), 'running', eid, 'started_ms', int(now),
    'deadline_ms', int(now + timeout), 'manual', manual and '1' or '0',
    'period_end_ms', int(period_end), 'rerun', rerun and '1' or '0')
  redis.call('ZADD', K('running'), now + timeout, ref)
end

local KILLED = 'worker died: the batch run and its re-run outlived their timeout'

local function claimed(ref, eid, period_end, stale, stale_started)
  local sid = sid_of(ref)
  local s = redis.call('HMGET', K('schedule:' .. sid), 'kind', 'interval_ms')
  return {ref, sid, s[1], s[2], int(period_end), eid, stale, stale_started,
    redis.call('SMEMBERS', K('members:' .. ref))}
end

if CALL.claim then
  local c = CALL.claim
  local out, seq = {}, 0
  local refs
  if not c.schedule then
    -- claims past their deadline: re-run once for the same period, then the retry queue
    for _, ref in ipairs(redis.call('ZRANGEBYSCORE', K('running'), '-inf', '(' .. int(now),
        'LIMIT', 0, c.limit)) do
      local bkey = K('batch:' .. ref)
      local b = redis.call('HMGET', bkey, 'running', 'deadline_ms', 'started_ms',
        'period_end_ms', 'rerun', 'manual')
      local sid = sid_of(ref)
      if not b[1] or b[1] == '' or now <= num(b[2]) then
        redis.call('ZREM', K('running'), ref)  -- ended meanwhile (or claimed anew)
      elseif b[5] ~= '1' then
        seq = seq + 1
        local eid = c.execution_prefix .. int(seq)
        take(ref, eid, c.lease_ms or c.timeout_ms, b[6] == '1', num(b[4]), true)
        out[#out + 1] = claimed(ref, eid, num(b[4]), b[1], b[3] or '0')
      else
        redis.call('HSET', bkey, 'running', '', 'last_status', 'failed')
        redis.call('ZREM', K('running'), ref)
        local kind = redis.call('HGET', K('schedule:' .. sid), 'kind')
        for _, t in ipairs(redis.call('SMEMBERS', K('members:' .. ref))) do
          to_retry(kind, t, KILLED, num(b[4]))
        end
        out[#out + 1] = {ref, sid, '', '', '0', '', b[1], b[3] or '0', {}}
      end
    end
  end
  if c.schedule then
    refs = {}
    for _, n in ipairs(batch_numbers(c.schedule)) do refs[#refs + 1] = c.schedule .. '#' .. int(n) end
  else
    refs = redis.call('ZRANGEBYSCORE', K('due'), '-inf', now, 'LIMIT', 0, c.limit)
  end
  for _, ref in ipairs(refs) do
    local bkey = K('batch:' .. ref)
    local b = redis.call('HMGET', bkey, 'running', 'deadline_ms', 'started_ms', 'next_run_ms',
      'offset_ms')
    local sid = sid_of(ref)
    local skey = K('schedule:' .. sid)
    local running, stale, stale_started = b[1] or '', '', '0'
    if running ~= '' and now > num(b[2]) then
      stale, stale_started, running = running, b[3] or '0', ''
      redis.call('HSET', bkey, 'running', '', 'last_status', 'failed')
      redis.call('ZREM', K('running'), ref)
    end
    if running ~= '' then
      if c.schedule then out[#out + 1] = {ref, sid, '', '', '0', '', stale, stale_started, {}} end
    elseif c.schedule then
      seq = seq + 1
      local eid = c.execution_prefix .. int(seq)
      take(ref, eid, c.lease_ms or c.timeout_ms, true, now, false)
      out[#out + 1] = claimed(ref, eid, now, stale, stale_started)
    elseif redis.call('HGET', skey, 'paused') ~= '1' then
      local iv = num(redis.call('HGET', skey, 'interval_ms'))
      local due = num(b[4])
      local nr = next_run(iv, num(b[5]))
      redis.call('HSET', bkey, 'next_run_ms', int(nr))
      redis.call('ZADD', K('due'), nr, ref)
      seq = seq + 1
      local eid = c.execution_prefix .. int(seq)
      take(ref, eid, c.lease_ms or c.timeout_ms, false, due, false)
      out[#out + 1] = claimed(ref, eid, due, stale, stale_started)
    elseif stale ~= '' then
      out[#out + 1] = {ref, sid, '', '', '0', '', stale, stale_started, {}}
    end
  end
  return out
end

if CALL.renew then
  local r = CALL.renew
  local bkey = K('batch:' .. r.batch)
  if redis.call('HGET', bkey, 'running') ~= r.execution_id then return {'lost'} end
  redis.call('HSET', bkey, 'deadline_ms', int(now + r.lease_ms))
  redis.call('ZADD', K('running'), now + r.lease_ms, r.batch)
  return {'ok'}
end

if CALL.finish then
  local f = CALL.finish
  local bkey = K('batch:' .. f.batch)
  if redis.call('HGET', bkey, 'running') ~= f.execution_id then return {'lost'} end
  redis.call('ZREM', K('running'), f.batch)
  redis.call('HSET', bkey, 'running', '', 'last_status', f.status, 'last_run_ms',
    redis.call('HGET', bkey, 'started_ms') or int(now))
  redis.call('HSET', K('schedule:' .. sid_of(f.batch)), 'last_run_ms', int(now))
  local kind = redis.call('HGET', K('schedule:' .. sid_of(f.batch)), 'kind')
  for _, t in ipairs(f.failed or {}) do
    if redis.call('HEXISTS', KEY.tenants, t.tenant_id) == 1 then
      to_retry(kind, t.tenant_id, t.error, f.period_end_ms)
    end
  end
  return {'ok'}
end

if CALL.retry_claim then
  local r = CALL.retry_claim
  local items
  if r.item then
    items = redis.call('ZSCORE', K('retry'), r.item) and {r.item} or {}
  else
    items = redis.call('ZRANGEBYSCORE', K('retry'), '-inf', now, 'LIMIT', 0, r.limit)
  end
  local out = {}
  for _, item in ipairs(items) do
    local h = redis.call('HMGET', K('retry:' .. item), 'kind', 'tenant_id', 'tries',
      'period_end_ms')
    if not h[1] or redis.call('HEXISTS', KEY.tenants, h[2]) == 0 then
      redis.call('ZREM', K('retry'), item)
      redis.call('DEL', K('retry:' .. item))
    else
      redis.call('HSET', K('retry:' .. item), 'token', r.token)
      redis.call('ZADD', K('retry'), now + r.lease_ms, item)
      out[#out + 1] = {item, h[1], h[2], h[3], h[4]}
    end
  end
  return out
end

if CALL.retry_finish then
  local f = CALL.retry_finish
  local rkey = K('retry:' .. f.item)
  local h = redis.call('HMGET', rkey, 'token', 'tries', 'kind', 'tenant_id', 'first_ms')
  if h[1] ~= f.token then return {'lost'} end
  if f.status == 'succeeded' then
    redis.call('ZREM', K('retry'), f.item)
    redis.call('DEL', rkey)
    return {'done'}
  end
  local tries = num(h[2]) + 1
  if tries >= CALL.max_retries then
    redis.call('ZREM', K('retry'), f.item)
    redis.call('DEL', rkey)
    redis.call('HSET', K('failed'), f.item, cjson.encode({kind = h[3], tenant_id = h[4],
      error = f.error, tries = tries, first_failed_ms = tonumber(h[5]), failed_at_ms = now}))
    return {'failed'}
  end
  redis.call('HSET', rkey, 'tries', int(tries), 'error', f.error, 'token', '')
  redis.call('ZADD', K('retry'), retry_due(tries), f.item)
  return {'retry'}
end

-- Consolidate a schedule: keep the fullest ceil(tenants / capacity) batches and move the
-- tenants of the others into them; every tenant stays in exactly one batch.
local function rebalance(sid)
  local nums = batch_numbers(sid)
  local sizes, total = {}, 0
  for i, n in ipairs(nums) do
    sizes[i] = {n, num(redis.call('HGET', K('batch:' .. sid .. '#' .. int(n)), 'size'))}
    total = total + sizes[i][2]
  end
  local keep = math.max(1, math.ceil(total / cap))
  if #sizes <= keep then return 0 end
  table.sort(sizes, function(a, b) if a[2] ~= b[2] then return a[2] > b[2] end return a[1] < b[1] end)
  local kind = redis.call('HGET', K('schedule:' .. sid), 'kind')
  local moved = 0
  for i = keep + 1, #sizes do
    local ref = sid .. '#' .. int(sizes[i][1])
    for _, tenant in ipairs(redis.call('SMEMBERS', K('members:' .. ref))) do
      for j = 1, keep do
        local to = sid .. '#' .. int(sizes[j][1])
        if num(redis.call('HGET', K('batch:' .. to), 'size')) < cap then
          unplace(tenant, kind)
          add_to(to, sid, tenant, kind)
          moved = moved + 1
          break
        end
      end
    end
  end
  return moved
end

if CALL.control then
  local c = CALL.control
  if c.action == 'rebalance' then
    local out = {}
    local sids = c.schedule and {c.schedule} or redis.call('SMEMBERS', K('schedules'))
    for _, sid in ipairs(sids) do
      local before = redis.call('SCARD', K('batches:' .. sid))
      local moved = rebalance(sid)
      out[#out + 1] = {sid, moved, before, redis.call('SCARD', K('batches:' .. sid))}
    end
    return out
  end
  if c.action == 'requeue' then
    local h = redis.call('HGET', K('failed'), c.item)
    local rkey = K('retry:' .. c.item)
    if h then
      local f = cjson.decode(h)
      redis.call('HDEL', K('failed'), c.item)
      redis.call('HSET', rkey, 'kind', f.kind, 'tenant_id', f.tenant_id, 'tries', '0',
        'error', f.error or '', 'first_ms', int(now), 'period_end_ms', int(now), 'token', '')
    elseif redis.call('EXISTS', rkey) == 1 then
      redis.call('HSET', rkey, 'tries', '0')
    else
      return {'not_found'}
    end
    redis.call('ZADD', K('retry'), now, c.item)
    return {'ok'}
  end
  local skey = K('schedule:' .. c.schedule)
  if redis.call('EXISTS', skey) == 0 then return {'not_found'} end
  if c.action == 'pause' then redis.call('HSET', skey, 'paused', '1')
  elseif c.action == 'resume' then redis.call('HSET', skey, 'paused', '0')
  else error('unknown schedules control action ' .. tostring(c.action)) end
  redis.call('XADD', KEY.changes, '*', 'd', cjson.encode({kind = 'schedule',
    schedule_id = c.schedule, paused = c.action == 'pause',
    version = redis.call('INCR', K('change_version')), at_ms = now}))
  return {'ok'}
end

if CALL.dump then
  local state = {now_ms = now, schedules = {}, tenants = {}, retry = {}, failed = {}}
  for _, sid in ipairs(redis.call('SMEMBERS', K('schedules'))) do
    local s = redis.call('HGETALL', K('schedule:' .. sid))
    local sched = {id = sid, hash = s, batches = {}}
    for _, n in ipairs(batch_numbers(sid)) do
      local ref = sid .. '#' .. int(n)
      local b = {ref = ref, number = n, hash = redis.call('HGETALL', K('batch:' .. ref)),
        count = redis.call('SCARD', K('members:' .. ref)),
        due = redis.call('ZSCORE', K('due'), ref) or false}
      if CALL.members then b.members = redis.call('SMEMBERS', K('members:' .. ref)) end
      sched.batches[#sched.batches + 1] = b
    end
    state.schedules[#state.schedules + 1] = sched
  end
  if CALL.members then
    local reg = redis.call('HGETALL', KEY.tenants)
    for i = 1, #reg, 2 do
      state.tenants[#state.tenants + 1] = {id = reg[i], plan = reg[i + 1],
        hash = redis.call('HGETALL', K('tenant:' .. reg[i]))}
    end
    state.due = redis.call('ZRANGE', K('due'), 0, -1, 'WITHSCORES')
    state.overrides = redis.call('ZRANGE', K('overrides'), 0, -1, 'WITHSCORES')
  end
  state.tenant_count = redis.call('HLEN', KEY.tenants)
  local retry = redis.call('ZRANGE', K('retry'), 0, -1, 'WITHSCORES')
  for i = 1, #retry, 2 do
    state.retry[#state.retry + 1] = {item = retry[i], due_ms = tonumber(retry[i + 1]),
      hash = redis.call('HGETALL', K('retry:' .. retry[i]))}
  end
  local failed = redis.call('HGETALL', K('failed'))
  for i = 1, #failed, 2 do state.failed[#state.failed + 1] = cjson.decode(failed[i + 1]) end
  return cjson.encode(state)
end
error('schedules: a call needs tenants, override, claim, finish, retry_claim, retry_finish, control, restore or dump')
