-- claim: claim an idempotency key for a new execution, or return its record.
-- KEYS[1]  record key: a string in layout 3 (see redis_layout.go): one byte
--          3, a state byte ('I' in progress, 'D' completed, 'F' a fence
--          left by a forget), the owner token's length in one byte, the
--          token, the owner's fencing token in 8 bytes, then the record; in
--          layout 2 (byte 2 first, no fencing token); or, written by
--          versions before layout 2, a hash (field "tok" = owner token,
--          "rec" = record, "done" = the completing token, "fenced" = a
--          forgotten owner's token)
-- ARGV[1]  owner token
-- ARGV[2]  the in-progress value, in layout 3, its fencing token 0
-- ARGV[3]  lease in milliseconds (at least 1)
-- Returns {1, fence} when claimed; {0, value, pttl_ms, 2} when a layout-2 or
-- layout-3 value exists (the caller's own in-progress claim gets its lease
-- renewed, and changes nothing else: its fence stays);
-- {0, record, pttl_ms} when a layout-1 record exists;
-- {2} when this token was fenced off by a forget (see forget.lua).
--
-- The fence of a claim is the server's clock in microseconds (TIME), or
-- one more than the fence left by a forget when that is greater. The key
-- is gone before any other new claim (released, expired or deleted), so the
-- fence grows for every new owner as long as the server's clock does not
-- step back between two claims of one key (see the README, "Fencing a
-- handler's writes"). Below 2^53, so Lua's numbers hold it exactly.
local t = redis.call('TIME')
local fence = tonumber(t[1]) * 1000000 + tonumber(t[2])
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
  local l = string.byte(v, 1)
  if (l == 2 or l == 3) and string.sub(v, 2, 2) == 'F' then
    local n = string.byte(v, 3) or 0
    if string.sub(v, 4, 3 + n) == ARGV[1] then
      return {2}
    end
    if l == 3 then
      local prev = 0
      for i = 4 + n, 11 + n do
        prev = prev * 256 + (string.byte(v, i) or 0)
      end
      if prev >= fence then
        fence = prev + 1
      end
    end
  else
    local n = string.byte(v, 3) or 0
    if (l == 2 or l == 3) and string.sub(v, 2, 2) == 'I' and string.sub(v, 4, 3 + n) == ARGV[1] then
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
local b, f = {}, fence
for i = 8, 1, -1 do
  b[i] = f % 256
  f = (f - b[i]) / 256
end
local n = string.byte(ARGV[2], 3)
redis.call('SET', KEYS[1], string.sub(ARGV[2], 1, 3 + n) .. string.char(unpack(b)) .. string.sub(ARGV[2], 12 + n), 'PX', ARGV[3])
return {1, fence}
