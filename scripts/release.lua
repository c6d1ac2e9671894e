-- release: delete an in-progress key owned by a token.
-- KEYS[1]  record key
-- ARGV[1]  owner token
-- Returns 1 when deleted, 0 when the token does not own the key.
if redis.call('HGET', KEYS[1], 'tok') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
