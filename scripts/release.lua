-- release: delete an in-progress key owned by a token.
-- KEYS[1]  record key
-- ARGV[1]  owner token
-- Returns 1 when deleted, or when the key is already gone (the lease ended,
-- or a retried release whose first reply was lost): either way nobody owns
-- it. Returns 0 when another token owns it, it holds a completed record, or
-- this token was fenced off by a forget.
if redis.call('HGET', KEYS[1], 'tok') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 1
end
return 0
