-- jobs: the live state of the tracked timer jobs (stages/jobs.py); claim, finish, control.
-- KEY: known (the set of job names seen). Each job's hash is named from CALL.prefix and the job's name,
-- <prefix>:{jobs}:job:<name> (schemas.keys.Keys.job). CALL: schemas.rows.JobsCall.
-- What it guarantees, atomically per call:
--  * claim: a scheduled run of a job is claimed at most once per period. A job is due
--    when it is not paused, holds no claim and now >= next_run_ms; claiming it sets the
--    claim (running = the execution id, deadline = now + lease, or now + timeout without
--    a lease) and moves next_run_ms to
--    the start of the next period (interval boundaries), so a second worker handling the
--    same tick, or a redelivered tick, finds it not due. A claim past its deadline belongs
--    to a worker that died: it is reported (stale) and the run retried under a new claim,
--    up to max_retries; past them the job gives up until its next period. A manual claim
--    ignores paused and next_run_ms but never takes a live claim (busy).
--  * renew: the run holding the claim is alive: its deadline moves to now + lease (a claim
--    taken over as stale is left alone: lost);
--  * finish: ends the claim it names (a claim taken over as stale is left alone: lost);
--    a failed scheduled run is due again at once until it has failed max_retries times.
--  * control: pause, resume, set_interval (next run one new interval from now).
-- Returns, claim: per job {name, outcome, execution_id, attempt, stale_id, stale_started_ms}
-- (outcome: run, retry, gave_up, busy, paused, not_due); finish: {ok|lost, hash...};
-- renew: {ok|lost};
-- control: {hash...}.
local P, now = CALL.prefix, CALL.now_ms

local function job_key(name) return P .. ':{jobs}:job:' .. name end
local function int(x) return string.format('%d', x) end

-- The job's hash, created with the defaults the first time the job is seen.
local function ensure(key, name, interval, first_run, max_retries, timeout)
  if redis.call('EXISTS', key) == 0 then
    redis.call('HSET', key, 'interval_ms', int(interval), 'next_run_ms', int(first_run),
      'paused', '0', 'running', '', 'retries', '0', 'max_retries', int(max_retries),
      'timeout_ms', int(timeout), 'status', 'idle')
    redis.call('SADD', KEY.known, name)
  end
end

local function next_period(interval) return math.floor(now / interval) * interval + interval end

local function take(key, eid, timeout, attempt, manual)
  redis.call('HSET', key, 'running', eid, 'started_ms', int(now),
    'deadline_ms', int(now + timeout), 'attempt', int(attempt), 'manual', manual and '1' or '0',
    'status', 'running')
end

if CALL.claim then
  local out = {}
  for _, j in ipairs(CALL.claim) do
    local key = job_key(j.name)
    ensure(key, j.name, j.interval_ms, j.first_run_ms, j.max_retries, j.timeout_ms)
    local h = redis.call('HMGET', key, 'interval_ms', 'next_run_ms', 'paused', 'running',
      'deadline_ms', 'retries', 'max_retries', 'timeout_ms', 'started_ms', 'manual')
    local interval, next_run = tonumber(h[1]), tonumber(h[2])
    local running, deadline = h[4] or '', tonumber(h[5] or '0') or 0
    local retries, max_retries = tonumber(h[6] or '0') or 0, tonumber(h[7])
    local timeout = j.lease_ms or tonumber(h[8])  -- how long a claim holds unrenewed
    local outcome, eid, attempt, stale, stale_started = 'not_due', '', 0, '', 0
    if running ~= '' and now <= deadline then
      outcome = 'busy'
    elseif running ~= '' then
      -- the worker holding the claim died: its run is failed, and retried
      stale, stale_started = running, tonumber(h[9] or '0') or 0
      if j.manual or h[10] == '1' then
        -- a manual run that died is not retried; a manual claim takes over at once
        redis.call('HSET', key, 'running', '', 'status', 'failed', 'last_status', 'failed',
          'last_run_ms', int(stale_started))
        if j.manual then outcome, eid = 'run', j.execution_id; take(key, eid, timeout, 0, true)
        else outcome = 'gave_up' end
      else
        retries = retries + 1
        if retries > max_retries then
          outcome = 'gave_up'
          redis.call('HSET', key, 'running', '', 'retries', '0', 'status', 'failed',
            'last_status', 'failed', 'last_run_ms', int(stale_started),
            'next_run_ms', int(math.max(next_run, next_period(interval))))
        else
          outcome, eid, attempt = 'retry', j.execution_id, retries
          redis.call('HSET', key, 'retries', int(retries))
          take(key, eid, timeout, attempt, false)
        end
      end
    elseif j.manual then
      outcome, eid = 'run', j.execution_id
      take(key, eid, timeout, 0, true)
    elseif h[3] == '1' then
      outcome = 'paused'
    elseif now >= next_run then
      outcome, eid, attempt = 'run', j.execution_id, retries
      redis.call('HSET', key, 'next_run_ms', int(next_period(interval)))
      take(key, eid, timeout, attempt, false)
    end
    out[#out + 1] = {j.name, outcome, eid, attempt, stale, stale_started}
  end
  return out
end

if CALL.renew then
  local r = CALL.renew
  local key = job_key(r.name)
  if redis.call('HGET', key, 'running') ~= r.execution_id then return {'lost'} end
  redis.call('HSET', key, 'deadline_ms', int(now + r.lease_ms))
  return {'ok'}
end

if CALL.finish then
  local f = CALL.finish
  local key = job_key(f.name)
  local h = redis.call('HMGET', key, 'running', 'manual', 'retries', 'max_retries',
    'started_ms')
  if h[1] ~= f.execution_id then
    return {'lost', redis.call('HGETALL', key)}
  end
  redis.call('HSET', key, 'running', '', 'status', f.status, 'last_status', f.status,
    'last_run_ms', h[5] or int(now))
  if h[2] ~= '1' then
    local retries, max_retries = tonumber(h[3] or '0') or 0, tonumber(h[4])
    if f.status == 'succeeded' then
      redis.call('HSET', key, 'retries', '0')
    elseif retries + 1 > max_retries then
      redis.call('HSET', key, 'retries', '0')  -- gave up: the next period runs it afresh
    else
      redis.call('HSET', key, 'retries', int(retries + 1), 'next_run_ms', int(now))
    end
  end
  return {'ok', redis.call('HGETALL', key)}
end

if CALL.control then
  local c = CALL.control
  local key = job_key(c.name)
  ensure(key, c.name, c.default_interval_ms, c.first_run_ms, c.max_retries, c.timeout_ms)
  if c.action == 'pause' then
    redis.call('HSET', key, 'paused', '1')
  elseif c.action == 'resume' then
    redis.call('HSET', key, 'paused', '0')
  elseif c.action == 'set_interval' then
    redis.call('HSET', key, 'interval_ms', int(c.interval_ms),
      'next_run_ms', int(now + c.interval_ms))
  else
    error('unknown job control action ' .. tostring(c.action))
  end
  return redis.call('HGETALL', key)
end
error('jobs: a call needs claim, finish or control')
