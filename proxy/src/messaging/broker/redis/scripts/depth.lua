local function ms(id) return tonumber(string.match(id, '^(%d+)')) end
local depth, oldest = 0, -1
local function older(m) if m and (oldest < 0 or m < oldest) then oldest = m end end
local found = false
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == ARGV[1] then
      found = true
      local pending = f['pending'] or 0
      depth = depth + pending
      if pending > 0 then older(ms(redis.call('XPENDING', KEYS[1], ARGV[1])[2])) end
      local nxt = redis.call('XRANGE', KEYS[1], '(' .. f['last-delivered-id'], '+', 'COUNT', 1)
      if #nxt > 0 then
        older(ms(nxt[1][1]))
        if type(f['lag']) == 'number' then depth = depth + f['lag'] else depth = depth + 1 end
      end
    end
  end
end
if not found and ok then
  -- the group is made at its first read, from the stream's start: all of it waits for it
  depth = redis.call('XLEN', KEYS[1])
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #first > 0 then older(ms(first[1][1])) end
end
depth = depth + redis.call('ZCARD', KEYS[2]) + redis.call('XLEN', KEYS[3])
local dead = redis.call('XLEN', KEYS[4])
local dead_oldest = -1
if dead > 0 then dead_oldest = ms(redis.call('XRANGE', KEYS[4], '-', '+', 'COUNT', 1)[1][1]) end
return {depth, oldest, dead, dead_oldest}
