"""Inode numbers for the tree: stable while a name exists, never reused for another object.

Every node of the tree is named by a key: `("volume", vol)`, `("snapdir", vol)`,
`("snapshot", vol, snap)`, `("snapfile", vol, snap)`, `("latest", vol)`. A key gets a number
when first seen and keeps it; when the object is deleted its key is retired, so a new object
with the same name gets a fresh number and the kernel can never serve the old one's cached
pages for it. Numbers are freed once the kernel has forgotten them (lookup count zero).
"""

from __future__ import annotations

import errno

import pyfuse3

ROOT = pyfuse3.ROOT_INODE
VOLUMES = 2
SNAPSHOTS = 3
CONTROL = 4
FIRST_DYNAMIC = 16

FIXED_KEYS = {ROOT: ("root",), VOLUMES: ("volumes",), SNAPSHOTS: ("snapshots",), CONTROL: ("control",)}


class InodeTable:
    def __init__(self):
        self._by_key: dict[tuple, int] = {key: ino for ino, key in FIXED_KEYS.items()}
        self._by_ino: dict[int, tuple] = dict(FIXED_KEYS)
        self._lookups: dict[int, int] = {}
        self._next = FIRST_DYNAMIC

    def ino(self, key: tuple) -> int:
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self._by_key[key] = ino
            self._by_ino[ino] = key
        return ino

    def key(self, ino: int) -> tuple:
        key = self._by_ino.get(ino)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return key

    def is_current(self, ino: int) -> bool:
        key = self._by_ino.get(ino)
        return key is not None and self._by_key.get(key) == ino

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

    def retire(self, key: tuple) -> None:
        """The object named `key` is gone; its number lives on only while the kernel holds it."""
        ino = self._by_key.pop(key, None)
        if ino is not None and not self._lookups.get(ino):
            self._by_ino.pop(ino, None)

    def rekey(self, old: tuple, new: tuple) -> None:
        """The object named `old` is now named `new` (a rename): it keeps its inode number,
        which the kernel has just moved to the new name."""
        self.retire(new)
        ino = self._by_key.pop(old, None)
        if ino is not None:
            self._by_key[new] = ino
            self._by_ino[ino] = new

    def retire_where(self, predicate) -> None:
        """Retire every dynamic key for which `predicate(key)` is true."""
        for key in [k for k, ino in self._by_key.items() if ino >= FIRST_DYNAMIC and predicate(k)]:
            self.retire(key)

    def known(self, key: tuple) -> int | None:
        """The inode number of `key` if one was ever given out (the kernel may cache it)."""
        return self._by_key.get(key)
