"""The nodes of the mounted tree (DESIGN.md section 2), one small immutable type each.

    MNT/                 RootDir
    ├── volumes/         VolumesDir
    │   └── <vol>        VolumeFile(volume)
    ├── snapshots/       SnapshotsDir
    │   └── <vol>/       VolumeSnapshotsDir(volume)
    │       ├── <snap>/  SnapshotDir(volume, snapshot)
    │       │   └── <vol>  SnapshotFile(volume, snapshot)
    │       └── latest   LatestLink(volume)
    └── .vfsnap          ControlFile

A node names an object by what it is, not by an inode: nodes are equal when they name the same
object, and hashable, so the inode table (`vfsnap.fs.inodes`) maps node <-> inode. Handlers
dispatch on the type (isinstance, match); which nodes exist on the share is for the handlers to ask.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class RootDir:
    """MNT/"""


@attrs.frozen
class VolumesDir:
    """MNT/volumes/"""


@attrs.frozen
class SnapshotsDir:
    """MNT/snapshots/"""


@attrs.frozen
class ControlFile:
    """MNT/.vfsnap: found by name, never listed (xattrs for the tools)."""


@attrs.frozen
class VolumeFile:
    """MNT/volumes/<vol>: the live volume."""

    volume: str


@attrs.frozen
class VolumeSnapshotsDir:
    """MNT/snapshots/<vol>/: the volume's snapshots (mkdir takes one, rmdir deletes one)."""

    volume: str


@attrs.frozen
class SnapshotDir:
    """MNT/snapshots/<vol>/<snap>/"""

    volume: str
    snapshot: str


@attrs.frozen
class SnapshotFile:
    """MNT/snapshots/<vol>/<snap>/<vol>: the volume as it was at the snapshot, read-only."""

    volume: str
    snapshot: str


@attrs.frozen
class LatestLink:
    """MNT/snapshots/<vol>/latest: symlink to the newest snapshot (absent when there is none)."""

    volume: str


Node = (RootDir | VolumesDir | SnapshotsDir | ControlFile | VolumeFile | VolumeSnapshotsDir | SnapshotDir
        | SnapshotFile | LatestLink)

# The nodes that are there whatever the share holds (fixed inode numbers, `vfsnap.fs.inodes`).
FixedNode = RootDir | VolumesDir | SnapshotsDir | ControlFile
Directory = RootDir | VolumesDir | SnapshotsDir | VolumeSnapshotsDir | SnapshotDir
# The files with a view of a volume's data (and its `user.vfsnap.*` attributes on them and
# on the snapshot's directory).
ImageNode = VolumeFile | SnapshotDir | SnapshotFile
SnapshotNode = SnapshotDir | SnapshotFile
# The nodes that name one volume: all of them go when the volume does.
VolumeNode = VolumeFile | VolumeSnapshotsDir | SnapshotDir | SnapshotFile | LatestLink


def parent(node: Node) -> Node:
    """The directory `..` names (the root is its own parent)."""
    match node:
        case VolumeFile():
            return VolumesDir()
        case VolumeSnapshotsDir():
            return SnapshotsDir()
        case SnapshotDir(volume) | LatestLink(volume):
            return VolumeSnapshotsDir(volume)
        case SnapshotFile(volume, snapshot):
            return SnapshotDir(volume, snapshot)
        case _:
            return RootDir()


def belongs_to(node: Node, volume: str) -> bool:
    """Whether `node` is one of the volume's own names (file, snapshot directory, snapshots, latest)."""
    return isinstance(node, VolumeNode) and node.volume == volume
