"""The FUSE client: a Cairn volume mounted into the local file system tree.

  operations  `Operations`, the pyfuse3 request handlers: one method per FUSE op, each a thin
              translation onto cairn.vfs.VFS (inode numbers, credentials, errno)
  mount       the mount process: checks, mount options, serving until unmounted or signalled,
              background start with a ready handshake, PID files, `unmount`

`cairn mount` and `cairn umount` (cairn.cli.mount) are the commands; the CSI node plugin runs
the same `cairn mount --background` per staged volume.
"""
