-- The common close (cairn.meta.namespace `_release_open`) in one round trip: drops the
-- session's open of the inode and answers 0 when nothing more is to be done (the inode is
-- gone or still linked), 1 when the inode is unlinked and the client must decide whether
-- this was its last open (a transaction of its own).
--
-- KEYS: 1 attr, 2 opened set of the inode, 3 the session's open set
-- ARGV: 1 session id, 2 inode

redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[2])
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
-- packed attributes "<BBIIIqqqIQIQ": nlink is the little-endian u32 at bytes 39..42
local b1, b2, b3, b4 = string.byte(raw, 39, 42)
if b1 + b2 * 256 + b3 * 65536 + b4 * 16777216 > 0 then return 0 end
return 1
