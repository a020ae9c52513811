"""The SSD tier: a crash-safe object store (superblock, journal, checkpoints, extents, checksums) over a
block transport (io_uring on a file or raw block device)."""
