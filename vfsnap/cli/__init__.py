"""Command-line entry points: `vfsnap` and `mount.vfsnap`."""
