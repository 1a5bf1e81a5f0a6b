"""The data path: file bytes <-> slices of immutable blocks in the object store.

  layout   pure arithmetic: file offsets -> chunks, slices -> blocks, reads -> block ranges
  writer   ChunkWriter / FileWriter / SliceWriter: buffer, upload blocks, then commit slices
  reader   ChunkReader: resolve a range into block pieces, fetch them, read ahead
  compact  compact_chunk / Compactor: rewrite a fragmented chunk as one slice
  gc       gc: drain the slice delete queue, find and delete leaked objects
  fsck     fsck: missing objects, leaks, reference and usage counters

The metadata engine (cairn.meta) says which slices make a file; this package moves the
bytes. Import the submodules directly (`from cairn.chunk.writer import ChunkWriter`).
"""
