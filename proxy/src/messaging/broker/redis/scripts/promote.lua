local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local cut = string.find(member, '\n', 1, true)
  redis.call('XADD', KEYS[2], '*', 'envelope', string.sub(member, cut + 1),
    'attempts', string.sub(member, 1, cut - 1))
  redis.call('ZREM', KEYS[1], member)
end
return #due
