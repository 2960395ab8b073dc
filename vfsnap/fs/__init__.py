"""The FUSE tree: inodes, handlers and the control file."""
