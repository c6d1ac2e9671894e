-- release: delete an in-progress key owned by a token.
-- KEYS[1]  record key (layout 3 or 2, or a layout-1 hash: see claim.lua)
-- ARGV[1]  owner token
-- Returns 1 when deleted, or when the key is already gone (the lease ended,
-- or a retried release whose first reply was lost): either way nobody owns
-- it. Returns 0 when another token owns it, it holds a completed record, or
-- this token was fenced off by a forget.
local v = redis.pcall('GETRANGE', KEYS[1], 0, 258)
if type(v) == 'table' then
  if not (v.err and string.find(v.err, 'WRONGTYPE', 1, true)) then
    return v
  end
  if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then
    return 0
  end
elseif v == '' then
  return 1 - redis.call('EXISTS', KEYS[1])
elseif not ((string.byte(v, 1) == 2 or string.byte(v, 1) == 3) and string.sub(v, 2, 2) == 'I'
    and string.sub(v, 4, 3 + (string.byte(v, 3) or 0)) == ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
