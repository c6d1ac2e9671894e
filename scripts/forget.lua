-- forget: delete the record of a key, whatever its state (support tooling).
-- KEYS[1]  record key (layout 3 or 2, or a layout-1 hash: see claim.lua)
-- Deleting an in-progress record leaves, for the rest of its lease, a fence
-- naming its owner token and keeping its fencing token (a value in state
-- 'F', in the record's layout, 2 or 3): a new claim takes
-- the key at once, but the owner, if it is still running, can no longer
-- renew, take back or complete it, so a forgotten record is never written
-- back.
-- Returns 1 when something was deleted, 0 when the key held no record.
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then
  return 0
end
local owner, fence = nil, ''
local l = 2
if t == 'hash' then
  -- Layout 1, written by an earlier version.
  if not redis.call('HGET', KEYS[1], 'rec') then
    if redis.call('HEXISTS', KEYS[1], 'fenced') == 1 then
      return 0
    end
    return redis.call('DEL', KEYS[1])
  end
  owner = redis.call('HGET', KEYS[1], 'tok')
elseif t == 'string' then
  local v = redis.call('GETRANGE', KEYS[1], 0, 266)
  if string.byte(v, 1) == 2 or string.byte(v, 1) == 3 then
    local state = string.sub(v, 2, 2)
    if state == 'F' then
      return 0
    end
    if state == 'I' then
      local n = string.byte(v, 3) or 0
      owner = string.sub(v, 4, 3 + n)
      l = string.byte(v, 1)
      if l == 3 then
        fence = string.sub(v, 4 + n, 11 + n)
      end
    end
  end
end
-- Anything else is not ours (a corrupt key): deleting it is how an
-- operator repairs it.
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
if owner and ttl > 0 then
  redis.call('SET', KEYS[1], string.char(l) .. 'F' .. string.char(#owner) .. owner .. fence, 'PX', ttl)
end
return 1
