"""A byte-bounded LRU for metadata tables, shared by every image of a mount.

Whatever sizes the images claim, the tables held here plus every open image's L1 table never
exceed the mount's `table_cache_size` (an image whose L1 would not fit fails to open, with
EIO); an image keeps its *dirty* L2 tables itself until they are written back (a bounded number).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

DEFAULT_CAPACITY = 64 * 1024 * 1024


class TableCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._tables: OrderedDict[tuple[int, int], tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._pinned = 0
        self._owner_ids = itertools.count(1)

    def new_owner(self) -> int:
        """A key prefix for one image; never reused, so a closed image's tables can't be served."""
        return next(self._owner_ids)

    @property
    def used_bytes(self) -> int:
        return self._bytes + self._pinned

    def pin(self, nbytes: int, *, what: str) -> None:
        """Count a table held outside the LRU (an L1 table) against the same budget."""
        from vfsnap.errors import VfsnapError

        if self._pinned + nbytes > self.capacity:
            raise VfsnapError(
                f"{what}: its {nbytes}-byte L1 table does not fit in table_cache_size={self.capacity} "
                f"({self._pinned} bytes already held by other images)"
            )
        self._pinned += nbytes
        self._shrink()

    def unpin(self, nbytes: int) -> None:
        self._pinned = max(0, self._pinned - nbytes)

    def _shrink(self) -> None:
        while self._bytes + self._pinned > self.capacity and self._tables:
            _, (_, size) = self._tables.popitem(last=False)
            self._bytes -= size

    def get(self, owner: int, offset: int):
        key = (owner, offset)
        item = self._tables.get(key)
        if item is None:
            return None
        self._tables.move_to_end(key)
        return item[0]

    def put(self, owner: int, offset: int, table: object, nbytes: int) -> None:
        key = (owner, offset)
        old = self._tables.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._tables[key] = (table, nbytes)
        self._bytes += nbytes
        while self._bytes + self._pinned > self.capacity and len(self._tables) > 1:
            _, (_, size) = self._tables.popitem(last=False)
            self._bytes -= size

    def discard(self, owner: int, offset: int) -> None:
        item = self._tables.pop((owner, offset), None)
        if item is not None:
            self._bytes -= item[1]

    def discard_owner(self, owner: int) -> None:
        for key in [k for k in self._tables if k[0] == owner]:
            self._bytes -= self._tables.pop(key)[1]
