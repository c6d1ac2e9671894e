-- inspect: read a record and its remaining time to live, changing nothing.
-- KEYS[1]  record key
-- Returns {} when there is no record, else {record, pttl_ms, owner_token}.
local rec = redis.call('HGET', KEYS[1], 'rec')
if not rec then
  return {}
end
local tok = redis.call('HGET', KEYS[1], 'tok') or ''
return {rec, redis.call('PTTL', KEYS[1]), tok}
