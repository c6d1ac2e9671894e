-- renew: extend the lease of an in-progress key owned by a token.
-- KEYS[1]  record key (layout 3 or 2, or a layout-1 hash: see claim.lua)
-- ARGV[1]  owner token
-- ARGV[2]  lease in milliseconds
-- Returns 1 when renewed, 0 when the token no longer owns the key.
local v = redis.pcall('GETRANGE', KEYS[1], 0, 258)
if type(v) == 'table' then
  if not (v.err and string.find(v.err, 'WRONGTYPE', 1, true)) then
    return v
  end
  if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then
    return 0
  end
elseif not ((string.byte(v, 1) == 2 or string.byte(v, 1) == 3) and string.sub(v, 2, 2) == 'I'
    and string.sub(v, 4, 3 + (string.byte(v, 3) or 0)) == ARGV[1]) then
  return 0
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
