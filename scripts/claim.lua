-- claim: claim an idempotency key for a new execution, or return its record.
-- KEYS[1]  record key: a string in layout 2 (see redis_layout.go): one byte
--          2, a state byte ('I' in progress, 'D' completed, 'F' a fence
--          left by a forget), the owner token's length in one byte, the
--          token, then the record; or, written by versions before layout 2,
--          a hash (field "tok" = owner token, "rec" = record, "done" = the
--          completing token, "fenced" = a forgotten owner's token)
-- ARGV[1]  owner token
-- ARGV[2]  the in-progress value, in layout 2
-- ARGV[3]  lease in milliseconds (at least 1)
-- Returns 1 when claimed; {0, value, pttl_ms, 2} when a layout-2 value
-- exists (the caller's own in-progress claim gets its lease renewed, and
-- changes nothing else); {0, record, pttl_ms} when a layout-1 record exists;
-- {2} when this token was fenced off by a forget (see forget.lua).
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'table' then
  if not (v.err and string.find(v.err, 'WRONGTYPE', 1, true)) then
    return v
  end
  -- Layout 1 (a hash), written by an earlier version.
  local rec = redis.call('HGET', KEYS[1], 'rec')
  if rec then
    return {0, rec, redis.call('PTTL', KEYS[1])}
  end
  local fenced = redis.call('HGET', KEYS[1], 'fenced')
  if not fenced then
    return redis.error_reply('WRONGTYPE the hash holds no idempotency record')
  end
  if fenced == ARGV[1] then
    return {2}
  end
  redis.call('DEL', KEYS[1])
elseif v then
  if string.byte(v, 1) == 2 and string.sub(v, 2, 2) == 'F' then
    local n = string.byte(v, 3) or 0
    if string.sub(v, 4, 3 + n) == ARGV[1] then
      return {2}
    end
  else
    local n = string.byte(v, 3) or 0
    if string.byte(v, 1) == 2 and string.sub(v, 2, 2) == 'I' and string.sub(v, 4, 3 + n) == ARGV[1] then
      -- The caller's own claim, applied by an earlier try whose reply was
      -- lost (a client library's retry, or the renewer's take-back). Renew
      -- its lease: a write of this connection's own, so that a WAIT or
      -- WAITAOF pipelined behind this script waits until the replicas hold
      -- the record, instead of answering at once for a connection that
      -- wrote nothing (Valkey does; see redis_acks.go).
      redis.call('PEXPIRE', KEYS[1], ARGV[3])
    end
    return {0, v, redis.call('PTTL', KEYS[1]), 2}
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
