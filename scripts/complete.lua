-- complete: store the final record of a key, if the token still owns it.
-- KEYS[1]  record key (layout 3 or 2, or a layout-1 hash: see claim.lua)
-- ARGV[1]  owner token
-- ARGV[2]  the completed value, in layout 3
-- ARGV[3]  ttl in milliseconds
-- Returns 1 when stored under the lease (or already stored by this token: a
-- retried command whose first reply was lost), 2 when stored after the lease
-- had expired with nobody else claiming the key, 0 when another token owns
-- or completed it, or this token was fenced off by a forget.
local v = redis.pcall('GETRANGE', KEYS[1], 0, 258)
local state, tok
if type(v) == 'table' then
  if not (v.err and string.find(v.err, 'WRONGTYPE', 1, true)) then
    return v
  end
  -- Layout 1 (a hash), written by an earlier version.
  if redis.call('HGET', KEYS[1], 'done') == ARGV[1] then
    state, tok = 'D', ARGV[1]
  elseif redis.call('HGET', KEYS[1], 'tok') == ARGV[1] then
    state, tok = 'I', ARGV[1]
  end
elseif v == '' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 2
elseif string.byte(v, 1) == 2 or string.byte(v, 1) == 3 then
  state, tok = string.sub(v, 2, 2), string.sub(v, 4, 3 + (string.byte(v, 3) or 0))
end
if tok ~= ARGV[1] then
  return 0
end
if state == 'D' then
  -- A retry (its first reply lost, or too few replicas acknowledged it):
  -- rewrite the TTL, a write of this connection's own for a WAIT after it.
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if state == 'I' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
