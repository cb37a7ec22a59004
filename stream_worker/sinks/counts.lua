-- Apply one partition-batch of classified frames to the counts, exactly once.
--
-- KEYS[1]  <prefix>:{<topic>:<partition>}:wm     the partition's offset watermark
-- KEYS[2]  <prefix>:{<topic>:<partition>}:owner  hash: the consumer group counting the partition
--                                                and the topic ID the watermark belongs to
-- ARGV[1]  <prefix>:{<topic>:<partition>}      the key stem; every key below shares its hash tag,
--                                              so the script touches one Redis Cluster slot only
-- ARGV[2]  TTL of count keys, seconds
-- ARGV[3]  camera-trap sequence gap, milliseconds
-- ARGV[4]  JSON array of [window_name, window_size_ms]
-- ARGV[5]  JSON array of frames in offset order:
--          {"o": offset, "s": source, "t": captured_at_ms, "l": [labels], "e": [species] | null,
--           "x": [score of each species]}
--          "e" is null for non-wildlife sources; for wildlife ones it lists the frame's species.
-- ARGV[6]  the consumer group of the caller
-- ARGV[7]  the topic's ID (Kafka topic IDs, KIP-516), or '' when the broker gives none
--
-- The watermark belongs to one incarnation of the topic and one consumer group. A topic that was
-- deleted and created again (a new ID) starts its offsets at 0: its old watermark would skip
-- every new frame below it, so it is reset (the reply says from what). A partition counted by
-- another group is refused with an error reply starting 'LOOKOUT_OWNER': two groups writing
-- the same counts would count every frame twice, and a watermark of one group would make the
-- other skip frames. An empty frame list only claims the partition and returns its watermark.
--
-- A frame whose offset is at or below the watermark was applied before (a replay after a crash,
-- or a stale worker's late write): it changes nothing. The watermark advances in the same
-- atomic step as the counts. Camera-trap events follow stream_worker.counting.event_updates
-- exactly (same state, same windows): a sequence is anchored at its first frame, grows while
-- frames come within the gap of its span, and counts each species once, in the windows of its
-- start. Each sequence with a species also keeps its event record, <stem>:e:<source>:<start>
-- (lo, hi, frames showing a species, n:<species>, b:<species> best score, closed once a later
-- frame starts the next sequence), listed in <stem>:edirty until the worker has published it
-- to the events topic. Returns {applied, watermark, reset_from, key1, {field, value, ...}, key2, ...}: the
-- absolute values of every count hash the batch touched, for the counts topic; reset_from is the
-- watermark dropped because the topic was recreated, or -1.

local wm_key = KEYS[1]
local stem = ARGV[1]
local ttl = tonumber(ARGV[2])
local gap_ms = tonumber(ARGV[3])
local windows = cjson.decode(ARGV[4])
local frames = cjson.decode(ARGV[5])

local owner_key = KEYS[2]
local group = ARGV[6]
local topic_id = ARGV[7]

local owner = redis.call('HMGET', owner_key, 'group', 'topic_id')
if owner[1] and owner[1] ~= group then
  return redis.error_reply('LOOKOUT_OWNER ' .. owner[1])
end
local wm = tonumber(redis.call('GET', wm_key) or '-1')
local reset_from = -1
if topic_id ~= '' and owner[2] and owner[2] ~= '' and owner[2] ~= topic_id then
  reset_from = wm
  wm = -1
end
if not owner[1] or (topic_id ~= '' and owner[2] ~= topic_id) then
  -- A watermark without an owner was written before owners existed: it is adopted.
  redis.call('HSET', owner_key, 'group', group, 'topic_id', topic_id)
end
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
    -- Forget the windows whose count hash has expired. A count hash lives ttl seconds after its
    -- last write, whatever its event time, so the index is trimmed by what exists, never by
    -- event time: a backfill spanning more than the TTL keeps all its windows, and no single
    -- frame far ahead can drop the real ones. The oldest two are checked on each new window,
    -- which keeps the index as small as the windows that exist.
    for _, member in ipairs(redis.call('ZRANGE', index, 0, 1)) do
      if member ~= fmt(start)
        and redis.call('EXISTS', stem .. ':c:' .. source .. ':' .. window[1] .. ':' .. member) == 0 then
        redis.call('ZREM', index, member)
      end
    end
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
          if start then
            -- The open sequence ends here: its event records are final.
            local done = stem .. ':e:' .. f.s .. ':' .. fmt(start)
            if redis.call('EXISTS', done) == 1 then
              redis.call('HSET', done, 'closed', '1')
              redis.call('SADD', stem .. ':edirty', done)
              redis.call('EXPIRE', stem .. ':edirty', ttl)
            end
          end
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
        -- The sequence's event record(s): one per species, frames and best score of each.
        local seen_any = next(seen) ~= nil
        if seen_any then
          local event = stem .. ':e:' .. f.s .. ':' .. fmt(start)
          redis.call('HSET', event, 'lo', fmt(lo), 'hi', fmt(hi))
          if #f.e > 0 then redis.call('HINCRBY', event, 'frames', 1) end
          for i, species in ipairs(f.e) do
            redis.call('HINCRBY', event, 'n:' .. species, 1)
            local score = tonumber(f.x[i]) or 0
            -- HMGET, not HGET: the script's commands are those the documented Redis ACL grants.
            local best = tonumber(redis.call('HMGET', event, 'b:' .. species)[1] or '-1')
            if score > best then redis.call('HSET', event, 'b:' .. species, tostring(score)) end
          end
          redis.call('EXPIRE', event, ttl)
          redis.call('SADD', stem .. ':edirty', event)
          redis.call('EXPIRE', stem .. ':edirty', ttl)
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
local out = {applied, wm, reset_from}
for _, key in ipairs(touched_order) do
  redis.call('EXPIRE', key, ttl)
  redis.call('SADD', stem .. ':dirty', key)
  out[#out + 1] = key
  out[#out + 1] = redis.call('HGETALL', key)
end
redis.call('EXPIRE', stem .. ':dirty', ttl)
return out
