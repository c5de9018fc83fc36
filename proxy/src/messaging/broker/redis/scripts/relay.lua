if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  local entry = redis.call('XADD', KEYS[2], '*', 'envelope', ARGV[2], 'attempts', '0')
  if ARGV[3] ~= '' then
    for _, group in ipairs(redis.call('SMEMBERS', KEYS[3])) do
      redis.call('RPUSH', KEYS[2] .. ':order:' .. group .. ':' .. ARGV[3], ARGV[4])
    end
  end
  return entry
end
return false
