"""The metadata engine: inodes, directories, chunks and slices, sessions, quotas, in Redis."""
