-- claim: claim an idempotency key for a new execution, or return its record.
-- KEYS[1]  record key (a hash: field "tok" = owner token, "rec" = record;
--          a forgotten in-progress record leaves only "fenced" = its token)
-- ARGV[1]  owner token
-- ARGV[2]  encoded in-progress record
-- ARGV[3]  lease in milliseconds (at least 1)
-- Returns {1} when claimed, {0, record, pttl_ms} when a record exists, {2}
-- when this token was fenced off by a forget (see forget.lua).
local rec = redis.call('HGET', KEYS[1], 'rec')
if rec then
  return {0, rec, redis.call('PTTL', KEYS[1])}
end
local fenced = redis.call('HGET', KEYS[1], 'fenced')
if fenced then
  if fenced == ARGV[1] then
    return {2}
  end
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'tok', ARGV[1], 'rec', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1}
