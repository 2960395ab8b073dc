"""The mount's memory budget: a byte-bounded LRU of metadata tables, shared by every image of a
mount, and the account of everything else the budget covers.

One budget (`memory_budget`, formerly `table_cache_size`) bounds, for all open volumes together:
the L2 tables and refcount blocks cached here (least recently used evicted first), every open image's L1 table and
metadata map (pinned: an image whose L1 would not fit fails to open, with EIO), the L2 tables
images hold dirty until they are written back (an image whose dirty tables take more than a
quarter of the budget writes them back early), the refcount blocks a writer changed and has
not written yet, and the resolved maps of every view
(`vfsnap.chain.view.MapBudget`, which registers itself with `share_with`). When the budget is
exceeded, the maps and the cached tables give way in turn: whichever holds more than half of the
budget gives first, so that neither starves the other.

Threads (vfsnap/share/io.py): the loop and the worker threads that hold a volume's write lock
both use the cache, so every method holds a lock and the LRU and its byte counts stay
consistent. Only the loop's thread gives back map chunks (views are the loop's alone); a worker
that overfills the budget evicts tables only, and the loop's next use evens it out.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

DEFAULT_CAPACITY = 32 * 1024 * 1024


class TableCache:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._tables: OrderedDict[tuple[int, int], tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._pinned = 0
        self._held = 0  # dirty tables images hold until write-back
        self._maps = None  # the MapBudget sharing this budget, if any
        self._owner_ids = itertools.count(1)
        # Reentrant: _shrink runs inside put/hold/pin.
        self._lock = threading.RLock()

    def new_owner(self) -> int:
        """A key prefix for one image; never reused, so a closed image's tables can't be served."""
        return next(self._owner_ids)

    def share_with(self, maps) -> None:
        """Count `maps` (an object with `used_bytes` and `evict_one()`) against this budget."""
        self._maps = maps

    @property
    def maps_bytes(self) -> int:
        return self._maps.used_bytes if self._maps is not None else 0

    @property
    def used_bytes(self) -> int:
        """Tables cached and pinned, dirty tables held (not the maps)."""
        return self._bytes + self._pinned + self._held

    @property
    def total_bytes(self) -> int:
        return self.used_bytes + self.maps_bytes

    def usage(self) -> dict:
        return {"budget": self.capacity, "tables": self._bytes, "pinned": self._pinned, "dirty": self._held}

    def pin(self, nbytes: int, *, what: str) -> None:
        """Count a table held outside the LRU (an L1 table) against the same budget."""
        from vfsnap.errors import VfsnapError

        if self._pinned + nbytes > self.capacity:
            raise VfsnapError(
                f"{what}: its {nbytes}-byte L1 table does not fit in memory_budget={self.capacity} "
                f"({self._pinned} bytes already held by other images; option table_cache_size is the same)"
            )
        with self._lock:
            self._pinned += nbytes
            self._shrink(keep=0)

    def unpin(self, nbytes: int) -> None:
        with self._lock:
            self._pinned = max(0, self._pinned - nbytes)

    def hold(self, nbytes: int) -> None:
        """Count dirty tables an image holds (they cannot be evicted, only written back)."""
        with self._lock:
            self._held += nbytes
            self._shrink(keep=0)

    def unhold(self, nbytes: int) -> None:
        with self._lock:
            self._held = max(0, self._held - nbytes)

    @property
    def dirty_over_limit(self) -> bool:
        """Dirty tables take more than their share: the image adding more should write back."""
        return self._held > self.capacity // 4

    def _shrink(self, keep: int) -> None:
        """Evict until the budget holds: the maps give first while they hold more than half of
        it, then the least recently used tables (all but the `keep` newest)."""
        maps = self._maps if threading.current_thread() is threading.main_thread() else None
        while self.total_bytes > self.capacity:
            if maps is not None and (self.maps_bytes > self.capacity // 2 or len(self._tables) <= keep):
                if not maps.evict_one():
                    if len(self._tables) <= keep:
                        return
                    self._evict_table()
            elif len(self._tables) > keep:
                self._evict_table()
            else:
                return

    def _evict_table(self) -> None:
        _, (_, size) = self._tables.popitem(last=False)
        self._bytes -= size

    def evict_one(self) -> bool:
        """Give back the least recently used table (for the maps' side); False when none."""
        with self._lock:
            if not self._tables:
                return False
            self._evict_table()
            return True

    def get(self, owner: int, offset: int):
        with self._lock:
            key = (owner, offset)
            item = self._tables.get(key)
            if item is None:
                return None
            self._tables.move_to_end(key)
            return item[0]

    def put(self, owner: int, offset: int, table: object, nbytes: int) -> None:
        with self._lock:
            key = (owner, offset)
            old = self._tables.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._tables[key] = (table, nbytes)
            self._bytes += nbytes
            self._shrink(keep=1)

    def put_if(self, owner: int, offset: int, table: object, nbytes: int, current) -> None:
        """`put`, if `current()` still holds at that moment (tested under the lock that every
        other thread's `put` takes too)."""
        with self._lock:
            if current():
                self.put(owner, offset, table, nbytes)

    def discard(self, owner: int, offset: int) -> None:
        with self._lock:
            item = self._tables.pop((owner, offset), None)
            if item is not None:
                self._bytes -= item[1]

    def discard_owner(self, owner: int) -> None:
        with self._lock:
            for key in [k for k in self._tables if k[0] == owner]:
                self._bytes -= self._tables.pop(key)[1]
