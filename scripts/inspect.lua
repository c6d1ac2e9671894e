-- inspect: read a record and its remaining time to live, changing nothing.
-- KEYS[1]  record key (layout 3 or 2, or a layout-1 hash: see claim.lua)
-- Returns {} when there is no record; {value, pttl_ms, '', 2} for a
-- layout-2 or layout-3 value that is not a fence; {record, pttl_ms, owner_token} for a
-- layout-1 record.
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'hash' then
  local rec = redis.call('HGET', KEYS[1], 'rec')
  if not rec then
    return {}
  end
  local tok = redis.call('HGET', KEYS[1], 'tok') or ''
  return {rec, redis.call('PTTL', KEYS[1]), tok}
end
if t ~= 'string' then
  return {}
end
local v = redis.call('GET', KEYS[1])
if (string.byte(v, 1) == 2 or string.byte(v, 1) == 3) and string.sub(v, 2, 2) == 'F' then
  return {}
end
return {v, redis.call('PTTL', KEYS[1]), '', 2}
