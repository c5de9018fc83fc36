-- KEYS: the legacy dead-letter stream and index, the queue's dead-letter stream and index.
-- ARGV[1]: the queue. Moves the legacy entries whose envelope came from the queue, keeping
-- their entry ids (so their age) where the new stream allows; returns how many moved.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local moved = 0
for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  local ok, env = pcall(cjson.decode, f['envelope'] or '')
  if ok and type(env) == 'table' and type(env['metadata']) == 'table'
      and env['metadata']['original_queue'] == ARGV[1] and f['id'] then
    local added = redis.pcall('XADD', KEYS[3], e[1], 'envelope', f['envelope'], 'id', f['id'])
    if type(added) == 'table' and added['err'] then
      added = redis.call('XADD', KEYS[3], '*', 'envelope', f['envelope'], 'id', f['id'])
    end
    redis.call('HSET', KEYS[4], f['id'], added)
    redis.call('XDEL', KEYS[1], e[1])
    redis.call('HDEL', KEYS[2], f['id'])
    moved = moved + 1
  end
end
return moved
