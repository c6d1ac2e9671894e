-- claim: claim an idempotency key for a new execution, or return its record.
-- KEYS[1]  record key (a hash: field "tok" = owner token, "rec" = record)
-- ARGV[1]  owner token
-- ARGV[2]  encoded in-progress record
-- ARGV[3]  lease in milliseconds
-- Returns {1} when claimed, {0, record} when a record exists.
local rec = redis.call('HGET', KEYS[1], 'rec')
if rec then
  return {0, rec}
end
redis.call('HSET', KEYS[1], 'tok', ARGV[1], 'rec', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1}
