-- Creates one entry in one round trip (cairn.meta.namespace `_create`).
--
-- The client read the parent's attributes (maybe earlier) and decided, from them, the
-- permission and link-count outcomes, the new entry's attributes and the parent's new
-- attributes. All of that holds only if the parent is unchanged, so the script first
-- compares: when the parent differs, it answers {1, current attributes} (nothing is
-- written) and the client decides again. Otherwise, in the order the errors take:
-- volume and directory quotas, the errors decided before the existence check, EEXIST, the
-- errors decided after it; then it writes everything, and registers the open if asked.
--
-- KEYS: 1 parent attr, 2 parent entries, 3 parent names, 4 new attr, 5 new symlink,
--       6 volume space used, 7 volume inodes used, 8 quota limits, 9 quota space used,
--       10 quota inodes used, 11 opened set of the new inode, 12 the session's open set
-- ARGV: 1 expected parent attr, 2 new parent attr, 3 name, 4 entry value, 5 new attr,
--       6 symlink target ('' for none), 7 space, 8 volume capacity (0: none),
--       9 volume inode limit (0: none), 10 error before the existence check ('' for none),
--       11 error after it, 12 session id ('' for no open), 13 new inode, 14.. quota dirs
-- Answers {0} done, {1, attr or nothing} parent changed or gone, {2, errno name, message}.

local current = redis.call('GET', KEYS[1])
if current ~= ARGV[1] then
  if current then return {1, current} end
  return {1}
end

local space = tonumber(ARGV[7])
local capacity = tonumber(ARGV[8])
local inode_limit = tonumber(ARGV[9])
if space > 0 and capacity > 0 then
  if tonumber(redis.call('GET', KEYS[6]) or '0') + space > capacity then
    return {2, 'ENOSPC', 'volume capacity reached'}
  end
end
if inode_limit > 0 then
  if tonumber(redis.call('GET', KEYS[7]) or '0') + 1 > inode_limit then
    return {2, 'ENOSPC', 'volume inode limit reached'}
  end
end
for i = 14, #ARGV do
  local dir = ARGV[i]
  local limit = redis.call('HGET', KEYS[8], dir)
  if limit then
    local max_space, max_inodes = string.match(limit, '^(%-?%d+),(%-?%d+)$')
    max_space, max_inodes = tonumber(max_space), tonumber(max_inodes)
    if space > 0 and max_space and max_space ~= 0 then
      if tonumber(redis.call('HGET', KEYS[9], dir) or '0') + space > max_space then
        return {2, 'EDQUOT', 'quota of directory ' .. dir .. ' exceeded (space)'}
      end
    end
    if max_inodes and max_inodes ~= 0 then
      if tonumber(redis.call('HGET', KEYS[10], dir) or '0') + 1 > max_inodes then
        return {2, 'EDQUOT', 'quota of directory ' .. dir .. ' exceeded (inodes)'}
      end
    end
  end
end

if ARGV[10] ~= '' then return {2, ARGV[10], 'refused before the existence check'} end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then
  return {2, 'EEXIST', 'the name exists'}
end
if ARGV[11] ~= '' then return {2, ARGV[11], 'refused'} end

redis.call('SET', KEYS[4], ARGV[5])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[3], 0, ARGV[3])
if ARGV[6] ~= '' then redis.call('SET', KEYS[5], ARGV[6]) end
if space ~= 0 then redis.call('INCRBY', KEYS[6], space) end
redis.call('INCRBY', KEYS[7], 1)
for i = 14, #ARGV do
  if space ~= 0 then redis.call('HINCRBY', KEYS[9], ARGV[i], space) end
  redis.call('HINCRBY', KEYS[10], ARGV[i], 1)
end
if ARGV[12] ~= '' then
  redis.call('SADD', KEYS[11], ARGV[12])
  redis.call('SADD', KEYS[12], ARGV[13])
end
return {0}
