-- complete: store the final record of a key, if the token still owns it.
-- KEYS[1]  record key (field "tok" = owner while in progress, "done" = the
--          token that completed it, "rec" = record)
-- ARGV[1]  owner token
-- ARGV[2]  encoded final record
-- ARGV[3]  ttl in milliseconds
-- Returns 1 when stored under the lease (or already stored by this token: a
-- retried command whose first reply was lost), 2 when stored after the lease
-- had expired with nobody else claiming the key, 0 when another token owns
-- or completed it.
if redis.call('HGET', KEYS[1], 'done') == ARGV[1] then
  -- A retry (its first reply lost, or too few replicas acknowledged it):
  -- rewrite the TTL, a write of this connection's own for a WAIT after it.
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
local tok = redis.call('HGET', KEYS[1], 'tok')
local ret = 1
if not tok then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
  ret = 2
elseif tok ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rec', ARGV[2], 'done', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return ret
