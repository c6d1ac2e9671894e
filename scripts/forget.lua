-- forget: delete the record of a key, whatever its state (support tooling).
-- KEYS[1]  record key
-- Deleting an in-progress record leaves, for the rest of its lease, a fence
-- naming its owner token: a new claim takes the key at once, but the owner,
-- if it is still running, can no longer renew, take back or complete it, so
-- a forgotten record is never written back.
-- Returns 1 when something was deleted, 0 when the key held no record.
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then
  return 0
end
if t ~= 'hash' then
  -- Not ours (a corrupt key): deleting it is how an operator repairs it.
  return redis.call('DEL', KEYS[1])
end
local tok = redis.call('HGET', KEYS[1], 'tok')
if not redis.call('HGET', KEYS[1], 'rec') then
  if redis.call('HEXISTS', KEYS[1], 'fenced') == 1 then
    return 0
  end
  return redis.call('DEL', KEYS[1])
end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
if tok and ttl > 0 then
  redis.call('HSET', KEYS[1], 'fenced', tok)
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
