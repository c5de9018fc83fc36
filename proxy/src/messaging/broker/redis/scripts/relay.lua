-- KEYS[1] the queue's stream, KEYS[2] its ordered groups, KEYS[3..] one relayed marker per
-- message; ARGV[1] the dedup window (ms), then per message: envelope, ordering key, id.
local groups = nil
for i = 3, #KEYS do
  local at = (i - 3) * 3 + 2
  if redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[1]) then
    redis.call('XADD', KEYS[1], '*', 'envelope', ARGV[at], 'attempts', '0')
    local key = ARGV[at + 1]
    if key ~= '' then
      groups = groups or redis.call('SMEMBERS', KEYS[2])
      for _, group in ipairs(groups) do
        redis.call('RPUSH', KEYS[1] .. ':order:' .. group .. ':' .. key, ARGV[at + 2])
      end
    end
  end
end
return 0
