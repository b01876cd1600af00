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
-- While `held_replies` names a stream (select.lua with CALL.hold_replies:
-- DEVSCHED_REPLICAS_TO_ACK > 0), the reply goes there instead (s = its stream, d = the
-- reply, t = the TTL) and its id and stream are listed in `held_list`: the stage
-- delivers it after WAIT (pipeline/replication.py, deliver_held.lua).
local reply_ttl_set, held_replies, held_list  -- set by begin_call (call.lua) at every call
local function send_reply(stream, json, ttl_s)
  if stream == nil or stream == '' then return end
  if held_replies then
    held_list[#held_list + 1] = redis.call('XADD', held_replies, '*', 's', stream, 'd', json,
      't', ttl_s)
    held_list[#held_list + 1] = stream
    return
  end
  redis.call('XADD', stream, 'MAXLEN', '~', 10000, '*', 'd', json)
  if not reply_ttl_set[stream] then
    redis.call('EXPIRE', stream, ttl_s)
    reply_ttl_set[stream] = true
  end
end

-- Counters of the pool's stats hash, added up during a script call and written once
-- at its end by flush_stats (every script that counts, or calls host_active_add, must
-- call it last; allocations.lua's flush_stats writes the host counts too).
local stat_counts  -- set by begin_call
local function count_stat(name)
  stat_counts[name] = (stat_counts[name] or 0) + 1
end
local function flush_stats(P)
  for name, n in pairs(stat_counts) do
    redis.call('HINCRBY', k_pool(P, 'stats'), name, n)
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

-- State of one script call, reset at its start (call.lua): with Redis Functions
-- (pipeline/scripts.py) every helper file, above call.lua's marker line, is the library's
-- top level, run once at load, so what a call changes up there must be set afresh by
-- begin_call; what follows the marker (the script's own file) runs at every call, as all
-- of it does under EVALSHA. A helper file with state of its own wraps begin_call (as
-- allocations.lua does).
local function begin_call()
  reply_ttl_set, held_replies, held_list = {}, false, {}
  stat_counts = {}
end
