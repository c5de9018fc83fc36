if redis.call('LINDEX', KEYS[1], 0) == ARGV[1] then redis.call('LPOP', KEYS[1]) end
local head = redis.call('LINDEX', KEYS[1], 0)
if not head then return 0 end
for _, member in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local first = string.find(member, '\n', 1, true)
  if string.sub(member, 1, first - 1) == head then
    local second = string.find(member, '\n', first + 1, true)
    redis.call('XADD', KEYS[3], '*', 'envelope', string.sub(member, second + 1),
      'attempts', string.sub(member, first + 1, second - 1))
    redis.call('LREM', KEYS[2], 1, member)
    return 1
  end
end
return 0
