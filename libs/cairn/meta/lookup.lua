-- A lookup in one round trip (cairn.meta.namespace `lookup`): the parent's attributes,
-- the entry, and the attributes of the inode the entry names. The client checks the
-- permissions and types on what this answers.
--
-- KEYS: 1 parent attr, 2 parent entries
-- ARGV: 1 name, 2 the attr key of an inode with '%s' for its number
-- Answers {parent attr or false, entry or false, child attr or false}.

local parent = redis.call('GET', KEYS[1])
local entry = redis.call('HGET', KEYS[2], ARGV[1])
local child = false
if parent and entry and #entry >= 9 then
  -- a packed entry "<BQ": the type, then the inode as a little-endian u64
  local ino = 0
  for i = 9, 2, -1 do
    ino = ino * 256 + string.byte(entry, i)
  end
  child = redis.call('GET', string.format(ARGV[2], string.format('%.0f', ino)))
end
return {parent, entry, child}
