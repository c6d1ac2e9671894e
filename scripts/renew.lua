-- renew: extend the lease of an in-progress key owned by a token.
-- KEYS[1]  record key
-- ARGV[1]  owner token
-- ARGV[2]  lease in milliseconds
-- Returns 1 when renewed, 0 when the token no longer owns the key.
if redis.call('HGET', KEYS[1], 'tok') == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
