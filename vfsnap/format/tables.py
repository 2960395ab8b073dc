"""qcow2 table entries: bit layouts and conversion of big-endian tables to native arrays."""

from __future__ import annotations

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
