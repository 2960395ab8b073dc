"""Inode numbers for the tree: stable while a name exists, never reused for another object.

Every node of the tree is named by a node of `vfsnap.fs.tree` (`VolumeFile(vol)`,
`SnapshotDir(vol, snap)`, ...). A node gets a number when first seen and keeps it; when the
object is deleted its node is retired, so a new object with the same name gets a fresh number and
the kernel can never serve the old one's cached pages for it. Numbers are freed once the kernel
has forgotten them (lookup count zero).
"""

from __future__ import annotations

import errno

import pyfuse3

from vfsnap.fs.tree import ControlFile, FixedNode, Node, RootDir, SnapshotsDir, VolumesDir

ROOT = pyfuse3.ROOT_INODE
VOLUMES = 2
SNAPSHOTS = 3
CONTROL = 4
FIRST_DYNAMIC = 16

FIXED_NODES: dict[int, FixedNode] = {ROOT: RootDir(), VOLUMES: VolumesDir(), SNAPSHOTS: SnapshotsDir(),
                                     CONTROL: ControlFile()}


class InodeTable:
    def __init__(self):
        self._by_node: dict[Node, int] = {node: ino for ino, node in FIXED_NODES.items()}
        self._by_ino: dict[int, Node] = dict(FIXED_NODES)
        self._lookups: dict[int, int] = {}
        self._next = FIRST_DYNAMIC

    def ino(self, node: Node) -> int:
        ino = self._by_node.get(node)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_node[node] = ino
            self._by_ino[ino] = node
        return ino

    def node(self, ino: int) -> Node:
        node = self._by_ino.get(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def is_current(self, ino: int) -> bool:
        node = self._by_ino.get(ino)
        return node is not None and self._by_node.get(node) == ino

    def looked_up(self, ino: int, count: int = 1) -> None:
        if ino >= FIRST_DYNAMIC:
            self._lookups[ino] = self._lookups.get(ino, 0) + count

    def forget(self, ino: int, count: int) -> None:
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        if ino >= FIRST_DYNAMIC and not self.is_current(ino):
            self._by_ino.pop(ino, None)

    def retire(self, node: Node) -> None:
        """The object `node` names is gone; its number lives on only while the kernel holds it."""
        ino = self._by_node.pop(node, None)
        if ino is not None and not self._lookups.get(ino):
            self._by_ino.pop(ino, None)

    def rename(self, old: Node, new: Node) -> None:
        """The object named `old` is now named `new` (a rename): it keeps its inode number,
        which the kernel has just moved to the new name."""
        self.retire(new)
        ino = self._by_node.pop(old, None)
        if ino is not None:
            self._by_node[new] = ino
            self._by_ino[ino] = new

    def retire_where(self, predicate) -> None:
        """Retire every dynamic node for which `predicate(node)` is true."""
        for node in [n for n, ino in self._by_node.items() if ino >= FIRST_DYNAMIC and predicate(n)]:
            self.retire(node)

    def known(self, node: Node) -> int | None:
        """The inode number of `node` if one was ever given out (the kernel may cache it)."""
        return self._by_node.get(node)
