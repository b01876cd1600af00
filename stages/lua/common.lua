-- Shared helpers, put before every stage script (stages/scripts.py), after the preamble
-- pipeline.scripts generates from the script's types in schemas/rows.py: KEY.<name> and
-- CALL, read by name (a name the Struct does not declare raises). An optional field that
-- is absent reads as false: test it by truth (`if row.pool then`), never `== nil`.
-- Key names follow schemas/keys.py: device side under {pool}, user side under {u:ID}.

local function k_pool(P, suffix) return P .. ':{pool}:' .. suffix end
local function k_user(P, uid, suffix) return P .. ':{u:' .. uid .. '}:' .. suffix end
local function opt(v) if v == nil or v == false or v == '' then return cjson.null end return v end

-- Add a reply to a producer's reply stream; the stream expires if nobody reads it
-- (its TTL is set once per script call, however many replies it gets).
local reply_ttl_set = {}
local function send_reply(stream, json, ttl_s)
  if stream == nil or stream == '' then return end
  redis.call('XADD', stream, 'MAXLEN', '~', 10000, '*', 'd', json)
  if not reply_ttl_set[stream] then
    redis.call('EXPIRE', stream, ttl_s)
    reply_ttl_set[stream] = true
  end
end

-- Active allocations per host (P:{pool}:host_active, host -> count): how many devices
-- of each host an active allocation holds, read by the least_loaded and bin_pack
-- strategies. Every script that gives a device an allocation or takes it away changes
-- it in the same atomic call: select.lua allocating and close_allocation through
-- host_active_add (added up per host, written once by flush_stats: one write per host
-- and call, not per allocation; host_pending gives a count in the middle of a call),
-- admin.lua and events.lua moving a held device to another host through
-- host_active_now; rebuild.lua recomputes it.
local host_counts = {}
local function host_active_add(P, host, n)
  if host and host ~= '' then host_counts[host] = (host_counts[host] or 0) + n end
end
local function host_pending(host) return host_counts[host] or 0 end
local function host_active_now(P, host, n)
  if host and host ~= '' then redis.call('HINCRBY', k_pool(P, 'host_active'), host, n) end
end

-- The devices listed (P:{pool}:devices, a set) and the same ids sorted
-- (P:{pool}:device_ids, every score 0, so in id order: what `devices list` pages through
-- with a cursor). Every script that lists or unlists a device does it through these.
local function list_device(P, id)
  redis.call('SADD', k_pool(P, 'devices'), id)
  redis.call('ZADD', k_pool(P, 'device_ids'), 0, id)
end
local function unlist_device(P, id)
  redis.call('SREM', k_pool(P, 'devices'), id)
  redis.call('ZREM', k_pool(P, 'device_ids'), id)
end

-- Counters of the pool's stats hash, added up during a script call and written once
-- at its end by flush_stats (every script that counts, or calls host_active_add, must
-- call it last).
local stat_counts = {}
local function count_stat(name)
  stat_counts[name] = (stat_counts[name] or 0) + 1
end
local function flush_stats(P)
  for name, n in pairs(stat_counts) do
    redis.call('HINCRBY', k_pool(P, 'stats'), name, n)
  end
  for host, n in pairs(host_counts) do
    if n ~= 0 then redis.call('HINCRBY', k_pool(P, 'host_active'), host, n) end
  end
end

-- The rows of a batch (CALL.items): calls handlers[row.op](row) for each, in order, and
-- returns their entry ids, to ack. A kind without a handler raises (nothing half-done
-- is acked: the script's writes so far stay, the call fails, the batch is redelivered).
local function each_row(rows, handlers)
  local ids = {}
  for i = 1, #rows do
    local row = rows[i]
    local handler = handlers[row.op]
    if handler == nil then error('no handler for row ' .. tostring(row.op)) end
    ids[i] = row.entry_id
    handler(row)
  end
  return ids
end

-- Ack entries of a group, in chunks (unpack() has a bounded stack).
local function ack_all(stream, group, ids)
  for first = 1, #ids, 500 do
    redis.call('XACK', stream, group, unpack(ids, first, math.min(first + 499, #ids)))
  end
end

-- A user's state is one hash, so that what a script needs of a user comes in one HMGET
-- and goes back in one HSET: the quota (status, expires_at_ms, max_*, total_*, version),
-- the usage (USAGE_FIELDS), one 'hold:<request id>' per admitted request select has not
-- decided yet, and one 'alloc:<allocation id>' (its "cpu mem sto") per active allocation.
local function k_state(P, uid) return k_user(P, uid, 'user') end
local USAGE_FIELDS = {'used_devices', 'used_cpu', 'used_mem', 'used_sto'}

-- The usage {devices, cpu, mem, sto} from an HMGET reply whose USAGE_FIELDS start at
-- index i; missing fields count as 0.
local function usage_at(reply, i)
  return {tonumber(reply[i]) or 0, tonumber(reply[i + 1]) or 0, tonumber(reply[i + 2]) or 0,
          tonumber(reply[i + 3]) or 0}
end

local function read_usage(P, uid)
  return usage_at(redis.call('HMGET', k_state(P, uid), unpack(USAGE_FIELDS)), 1)
end

-- Write a user's usage as `used` (read earlier in this same atomic script call) plus
-- the changes, in one HSET, with any further field/value pairs given.
local function add_usage(P, uid, used, d_dev, d_cpu, d_mem, d_sto, ...)
  redis.call('HSET', k_state(P, uid), 'used_devices', used[1] + d_dev, 'used_cpu', used[2] + d_cpu,
    'used_mem', used[3] + d_mem, 'used_sto', used[4] + d_sto, ...)
end

-- Messages. Every reply and change a script emits is built by one function per kind,
-- named for its Struct in schemas/messages.py: here when two scripts emit the kind, else
-- in the one script that does (the strict decoders of tests/test_script_contract.py read
-- every one). Replies come back as JSON (they are sent and kept for idempotency), changes
-- as tables for emit_change.

-- Failed: `remaining` is nil for "unknown" (sent as null).
local function failed_reply(rid, reason, message, remaining)
  return cjson.encode({type = 'failed', request_id = rid, reason = reason, message = message,
                       remaining_devices = remaining == nil and cjson.null or remaining})
end

-- AllocationChange; `released_at`, `seconds` and `reason` (an EndReason) are nil while
-- the allocation is active.
local function allocation_change(aid, device_id, uid, tenant, rid, status, allocated_at, expires,
                                 minutes, cpu, mem, sto, pool, version, now, released_at, seconds,
                                 reason)
  return {kind = 'allocation', allocation_id = aid, device_id = device_id, user_id = uid,
    tenant_id = opt(tenant), request_id = rid, status = status, allocated_at_ms = allocated_at,
    expires_at_ms = expires, released_at_ms = released_at, duration_minutes = minutes,
    duration_seconds = seconds, cpu_cores = cpu, memory_mb = mem, storage_mb = sto, pool = pool,
    version = version, at_ms = now, reason = reason}
end

-- RequestRejected: a request that got a failure reply.
local function rejected_change(rid, uid, tenant, reason, message, now)
  return {kind = 'rejected', request_id = rid, user_id = opt(uid), tenant_id = opt(tenant),
    reason = reason, message = message, at_ms = now}
end

local function emit_change(stream, tbl)
  redis.call('XADD', stream, '*', 'd', cjson.encode(tbl))
end

-- Score of a device in a free pool: best fit orders by CPU, then memory.
local CPU_SCALE = 1073741824
local function fit_score(cpu, mem) return cpu * CPU_SCALE + mem end

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
-- status, end, duration, version, end_reason) for released_ttl: the change carries the
-- whole allocation to PostgreSQL.
-- `a` is the allocation as HMGET of ALLOC_FIELDS, when the caller has read it already.
local function close_allocation(P, changes, aid, end_ms, status, now, released_ttl, a, reason)
  local akey = k_pool(P, 'alloc:' .. aid)
  a = a or redis.call('HMGET', akey, unpack(ALLOC_FIELDS))
  if not a[1] or a[5] ~= 'allocated' then return nil end
  local allocated_at = tonumber(a[6])
  if end_ms < allocated_at then end_ms = allocated_at end
  local dur = math.floor((end_ms - allocated_at) / 1000)
  local version = tonumber(a[13]) + 1
  redis.call('DEL', akey)
  redis.call('HSET', akey, 'device_id', a[1], 'user_id', a[2], 'status', status,
    'released_at_ms', end_ms, 'duration_seconds', dur, 'version', version, 'end_reason', reason)
  redis.call('EXPIRE', akey, released_ttl)
  redis.call('ZREM', k_pool(P, 'expiry'), aid)
  count_stat(status)
  local dkey = k_pool(P, 'dev:' .. a[1])
  local d = redis.call('HMGET', dkey, 'alloc', 'status', 'cpu_cores', 'memory_mb', 'pool', 'host')
  if d[1] == aid then
    host_active_add(P, d[6], -1)
    if d[2] == 'allocated' then
      redis.call('HSET', dkey, 'alloc', '', 'last_alloc', aid, 'status', 'available')
      redis.call('ZADD', k_pool(P, 'free:' .. d[5]), fit_score(tonumber(d[3]), tonumber(d[4])), a[1])
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
  return rec
end
