"""vfsnap: a FUSE view of Cinder remotefs volumes with snapshots as directories."""

__version__ = "0.1.0"
