local head = redis.call('LINDEX', KEYS[1], 0)
if not head or head == ARGV[1] or not redis.call('LPOS', KEYS[1], ARGV[1]) then return 1 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 0
