"""qcow2 table entries: bit layouts and conversion of big-endian tables to native arrays."""

from __future__ import annotations

import os
import sys
from array import array

OFFSET_MASK = 0x00FFFFFFFFFFFE00  # bits 9-55 of L1, L2 and refcount table entries
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
SUBCLUSTERS = 32
ALL_SUBCLUSTERS_ALLOCATED = 0xFFFFFFFF

_SWAP = sys.byteorder == "little"


def table_from_bytes(data: bytes) -> array:
    """Big-endian u64 entries as an array of native ints."""
    table = array("Q")
    table.frombytes(data)
    if _SWAP:
        table.byteswap()
    return table


_ZERO_RUN = bytes(4096)


def used_entries_bytes(raw: bytes, entry_size: int = 8) -> int:
    """The length of `raw` up to the end of its last entry that is not all zero bytes.

    A small image's refcount table is a cluster of mostly zeros: whole zero runs are skipped by
    comparison (memcmp), and only the last run is stripped byte by byte (`bytes.rstrip` alone took
    0.1 ms per 64 KiB table: a tenth of a second to open a 1000-deep chain)."""
    end = len(raw)
    step = len(_ZERO_RUN)
    while end >= step and raw[end - step : end] == _ZERO_RUN:
        end -= step
    end = len(raw[max(0, end - step) : end].rstrip(b"\0")) + max(0, end - step)
    return -(-end // entry_size) * entry_size


def table_to_bytes(table: array) -> bytes:
    if _SWAP:
        swapped = array("Q", table)
        swapped.byteswap()
        return swapped.tobytes()
    return table.tobytes()


def cluster_span(offset: int, length: int, cluster_bits: int) -> range:
    """Indexes of the clusters that bytes [offset, offset+length) touch."""
    if not offset or not length:
        return range(0)
    return range(offset >> cluster_bits, ((offset + length - 1) >> cluster_bits) + 1)


def compressed_span(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host byte offset, byte length) of a compressed cluster descriptor."""
    offset_bits = 62 - (cluster_bits - 8)
    host = entry & ((1 << offset_bits) - 1)
    sectors = ((entry >> offset_bits) & ((1 << (cluster_bits - 8)) - 1)) + 1
    return host, sectors * 512 - (host & 511)


class ClusterSet:
    """A set of cluster indexes as a sorted array: 8 bytes an entry (a Python set costs ~64),
    membership by bisection. Changes are rare (a new L2 table), lookups per resolved cluster."""

    __slots__ = ("_items",)

    def __init__(self, items=()):
        self._items = array("Q", sorted(set(items)))

    def __contains__(self, cluster: int) -> bool:
        from bisect import bisect_left

        items = self._items
        i = bisect_left(items, cluster)
        return i < len(items) and items[i] == cluster

    def __len__(self) -> int:
        return len(self._items)

    def add(self, cluster: int) -> None:
        from bisect import bisect_left

        i = bisect_left(self._items, cluster)
        if i == len(self._items) or self._items[i] != cluster:
            self._items.insert(i, cluster)  # a memmove in C: cheap even for many tables

    def update(self, clusters) -> None:
        self._items = array("Q", sorted(set(self._items).union(clusters)))

    def difference_update(self, clusters) -> None:
        self._items = array("Q", sorted(set(self._items).difference(clusters)))


def write_all(fd: int, data, offset: int, name: str) -> None:
    """pwrite all of `data`; a full share becomes NoSpace, other failures VfsnapError."""
    view = memoryview(data)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    except OSError as exc:
        raise write_error(exc, name) from None


def write_error(exc: OSError, name: str, doing: str = "write"):
    """The domain error for a failed write (or `doing="sync"`) of an image."""
    from vfsnap.errors import share_error

    return share_error(exc, f"{name}: {doing} failed")


def sync(fd: int, name: str) -> None:
    """fdatasync, with failures as VfsnapError naming the image."""
    try:
        os.fdatasync(fd)
    except OSError as exc:
        raise write_error(exc, name, "sync") from None
