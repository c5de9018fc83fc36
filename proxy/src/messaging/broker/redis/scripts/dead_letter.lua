local previous = redis.call('HGET', KEYS[2], ARGV[2])
if previous then redis.call('XDEL', KEYS[1], previous) end
local entry = redis.call('XADD', KEYS[1], '*', 'envelope', ARGV[1], 'id', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], entry)
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[3])
local lists = { redis.call('XRANGE', KEYS[1], '-', ARGV[4], 'COUNT', 64) }
if excess > 0 then
  table.insert(lists, redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', math.min(excess, 64)))
end
for _, list in ipairs(lists) do
  for _, e in ipairs(list) do
    local fields = e[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'id' then redis.call('HDEL', KEYS[2], fields[i + 1]) end
    end
    redis.call('XDEL', KEYS[1], e[1])
  end
end
return entry
