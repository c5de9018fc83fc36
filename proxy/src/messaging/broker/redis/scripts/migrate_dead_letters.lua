-- KEYS: the legacy dead-letter stream and index, the queue's dead-letter stream and index.
-- ARGV: the queue, the cursor (an entry id, exclusive, or '-' to start), the last entry id to
-- look at, how many entries to look at. Moves the legacy entries whose envelope came from the
-- queue, keeping their entry ids (their age) where the new stream allows, else appended now; an
-- id already in the new index keeps its copy there. Returns {moved, the next cursor, or '' when
-- the range is done}.
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local start = ARGV[2]
if start ~= '-' then start = '(' .. start end
local count = tonumber(ARGV[4])
local entries = redis.call('XRANGE', KEYS[1], start, ARGV[3], 'COUNT', count)
local moved = 0
for _, e in ipairs(entries) do
  local f = {}
  for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
  -- a dead letter has an id field; a message of a queue by the same name does not
  if f['id'] then
    local ok, env = pcall(cjson.decode, f['envelope'] or '')
    if ok and type(env) == 'table' and type(env['metadata']) == 'table'
        and env['metadata']['original_queue'] == ARGV[1] then
      if not redis.call('HGET', KEYS[4], f['id']) then
        local added = redis.pcall('XADD', KEYS[3], e[1], 'envelope', f['envelope'], 'id', f['id'])
        if type(added) == 'table' and added['err'] then
          added = redis.call('XADD', KEYS[3], '*', 'envelope', f['envelope'], 'id', f['id'])
        end
        redis.call('HSET', KEYS[4], f['id'], added)
        moved = moved + 1
      end
      redis.call('XDEL', KEYS[1], e[1])
      redis.call('HDEL', KEYS[2], f['id'])
    end
  end
end
if #entries < count then return {moved, ''} end
return {moved, entries[#entries][1]}
