"""The Redis key map: the only place Cairn spells a metadata key name.

One Cairn file system lives in one Redis database (as JuiceFS does); META_URL names it.
Keys are short because there are millions of them. Extend this map, never spell keys
elsewhere. <ino> and <sid> are decimal integers; values marked "packed" are struct-encoded
(cairn.meta.types / cairn.meta.slices say how).

  setting                 JSON: the file system's settings (name, uuid, storage, block size...)
  csi:volumes             hash  volume id -> msgpack record of a CSI volume (catalogue)
  csi:snapshots           hash  snapshot id -> msgpack record of a CSI snapshot (catalogue)
  sessions                zset  session id -> last heartbeat (unix seconds)
  session:<sid>           hash  session info (hostname, pid, mountpoint, version, started)
  session:<sid>:open      set   inodes this session holds open
  session:<sid>:locks     set   lock keys (lf<ino> / lp<ino>) this session holds a lock in
  usage:space / usage:inodes   counters of used bytes and inodes for the whole volume

  counter:inode           counter: last inode handed out (clients take batches)
  counter:slice           counter: last slice id handed out (clients take batches)
  counter:session         counter: last session id

  i<ino>                  string packed Attr of an inode
  d<ino>                  hash   directory entries: name -> packed (type, inode)
  n<ino>                  zset   the same names, all scored 0, for ordered paging (ZRANGEBYLEX)
  p<ino>                  hash   parent inode -> link count, for files with hard links
  s<ino>                  string symlink target
  x<ino>                  hash   extended attributes: name -> value
  c<ino>_<index>          list   packed slice records of one 64 MiB chunk, oldest first
  o<ino>                  set    sessions that hold the inode open
  lf<ino>                 hash   flock locks: "<sid>:<owner>" -> b"R" | b"W"
  lp<ino>                 hash   POSIX record locks: "<sid>:<owner>" -> packed ranges

  slicerefs               hash   "<slice id>_<size>" -> number of chunk records naming it
  delslices               zset   "<slice id>_<size>" -> unix time after which its objects go
  delfiles                zset   "<ino>:<length>" -> time: files whose chunks are being freed
  dirquota                hash   inode -> "<space limit>,<inode limit>" (0 = unlimited)
  dirquota:space          hash   inode -> bytes used below the directory
  dirquota:inodes         hash   inode -> inodes used below the directory
  detached                zset   root inode of a tree being cloned, not linked yet -> unix
                                 time of its last progress (cairn.meta.clone)

  changes:<uuid>          pub/sub channel (not a key: channels span every database, hence
                          the volume's uuid): msgpack change notes between mounts
                          (cairn.vfs.changes)
"""

SETTING = "setting"
CSI_VOLUMES = "csi:volumes"
CSI_SNAPSHOTS = "csi:snapshots"
SESSIONS = "sessions"
USED_SPACE = "usage:space"
USED_INODES = "usage:inodes"

NEXT_INODE = "counter:inode"
NEXT_SLICE = "counter:slice"
NEXT_SESSION = "counter:session"

SLICE_REFS = "slicerefs"
DELETED_SLICES = "delslices"
DELETED_FILES = "delfiles"
QUOTA = "dirquota"
QUOTA_SPACE = "dirquota:space"
QUOTA_INODES = "dirquota:inodes"
DETACHED = "detached"

# SCAN patterns matching exactly one kind of per-inode key (dump, fsck).
ATTR_PATTERN = "i[0-9]*"
CHUNK_PATTERN = "c[0-9]*_[0-9]*"


def changes(uuid: str) -> str:
    return f"changes:{uuid}"


def session(sid: int | str) -> str:
    return f"session:{sid}"


def session_open(sid: int | str) -> str:
    return f"session:{sid}:open"


def session_locks(sid: int | str) -> str:
    return f"session:{sid}:locks"


def attr(ino: int) -> str:
    return f"i{ino}"


def entries(ino: int) -> str:
    return f"d{ino}"


def names(ino: int) -> str:
    return f"n{ino}"


def parents(ino: int) -> str:
    return f"p{ino}"


def symlink(ino: int) -> str:
    return f"s{ino}"


def xattrs(ino: int) -> str:
    return f"x{ino}"


def chunk(ino: int, index: int) -> str:
    return f"c{ino}_{index}"


def opened(ino: int) -> str:
    return f"o{ino}"


def flocks(ino: int) -> str:
    return f"lf{ino}"


def plocks(ino: int) -> str:
    return f"lp{ino}"


def slice_key(slice_id: int, size: int) -> str:
    """The member naming one slice in slicerefs and delslices."""
    return f"{slice_id}_{size}"


def parse_slice_key(member: bytes | str) -> tuple[int, int]:
    text = member.decode() if isinstance(member, bytes) else member
    sid, size = text.split("_")
    return int(sid), int(size)


def parse_chunk_key(key: bytes | str) -> tuple[int, int]:
    """(inode, index) of a chunk key."""
    text = key.decode() if isinstance(key, bytes) else key
    ino, index = text[1:].split("_")
    return int(ino), int(index)


def inode_of(key: bytes | str) -> int:
    """The inode number of a per-inode key (i123 -> 123)."""
    text = key.decode() if isinstance(key, bytes) else key
    return int(text.lstrip("idnpsxolfc").split("_")[0])
