-- Apply one partition-batch of classified frames to the counts, exactly once.
--
-- KEYS[1]  <prefix>:{<topic>:<partition>}:wm   the partition's offset watermark
-- ARGV[1]  <prefix>:{<topic>:<partition>}      the key stem; every key below shares its hash tag,
--                                              so the script touches one Redis Cluster slot only
-- ARGV[2]  TTL of count keys, seconds
-- ARGV[3]  camera-trap sequence gap, milliseconds
-- ARGV[4]  JSON array of [window_name, window_size_ms]
-- ARGV[5]  JSON array of frames in offset order:
--          {"o": offset, "s": source, "t": captured_at_ms, "l": [labels], "e": [species] | null}
--          "e" is null for non-wildlife sources; for wildlife ones it lists the frame's species.
--
-- A frame whose offset is at or below the watermark was applied before (a replay after a crash,
-- or a stale worker's late write): it changes nothing. The watermark advances in the same
-- atomic step as the counts. Camera-trap events follow stream_worker.counting.event_updates
-- exactly (same state, same windows): a sequence is anchored at its first frame, grows while
-- frames come within the gap of its span, and counts each species once, in the windows of its
-- start. Returns {applied, watermark, key1, {field, value, ...}, key2, ...}: the absolute values
-- of every count hash the batch touched, for the counts topic.

local wm_key = KEYS[1]
local stem = ARGV[1]
local ttl = tonumber(ARGV[2])
local gap_ms = tonumber(ARGV[3])
local windows = cjson.decode(ARGV[4])
local frames = cjson.decode(ARGV[5])

local wm = tonumber(redis.call('GET', wm_key) or '-1')
local applied = 0
local touched = {}
local touched_order = {}

local function fmt(n)
  return string.format('%d', n)
end

-- The count hash of a source in one window containing time t (created on first use).
local function count_key(source, window, t)
  local start = t - (t % window[2])
  local key = stem .. ':c:' .. source .. ':' .. window[1] .. ':' .. fmt(start)
  if not touched[key] then
    touched[key] = true
    touched_order[#touched_order + 1] = key
    local index = stem .. ':cw:' .. source .. ':' .. window[1]
    redis.call('ZADD', index, start, fmt(start))
    redis.call('ZREMRANGEBYSCORE', index, '-inf', '(' .. fmt(start - ttl * 1000))
    redis.call('EXPIRE', index, ttl)
  end
  return key
end

for _, f in ipairs(frames) do
  if f.o > wm then
    for _, w in ipairs(windows) do
      local key = count_key(f.s, w, f.t)
      redis.call('HINCRBY', key, '_frames', 1)
      for _, label in ipairs(f.l) do
        redis.call('HINCRBY', key, label, 1)
      end
    end
    if type(f.e) == 'table' then
      local ev_key = stem .. ':ev:' .. f.s
      local st = redis.call('HMGET', ev_key, 'start', 'lo', 'hi', 'species')
      local start, lo, hi = tonumber(st[1]), tonumber(st[2]), tonumber(st[3])
      -- A frame older than the open sequence by more than the gap is late: counted as a
      -- frame above, but it cannot reopen a closed sequence.
      if not (start and f.t <= lo - gap_ms) then
        local seen = {}
        if not start or f.t >= hi + gap_ms then
          start, lo, hi = f.t, f.t, f.t
        else
          if f.t < lo then lo = f.t end
          if f.t > hi then hi = f.t end
          for species in string.gmatch(st[4] or '', '[^,]+') do seen[species] = true end
        end
        for _, species in ipairs(f.e) do
          if not seen[species] then
            seen[species] = true
            for _, w in ipairs(windows) do
              redis.call('HINCRBY', count_key(f.s, w, start), 'event:' .. species, 1)
            end
          end
        end
        local seen_list = {}
        for species, _ in pairs(seen) do seen_list[#seen_list + 1] = species end
        table.sort(seen_list)
        redis.call('HSET', ev_key, 'start', fmt(start), 'lo', fmt(lo), 'hi', fmt(hi),
          'species', table.concat(seen_list, ','))
        redis.call('EXPIRE', ev_key, ttl)
      end
    end
    applied = applied + 1
    wm = f.o
  end
end

redis.call('SET', wm_key, fmt(wm))
local out = {applied, wm}
for _, key in ipairs(touched_order) do
  redis.call('EXPIRE', key, ttl)
  redis.call('SADD', stem .. ':dirty', key)
  out[#out + 1] = key
  out[#out + 1] = redis.call('HGETALL', key)
end
redis.call('EXPIRE', stem .. ':dirty', ttl)
return out
