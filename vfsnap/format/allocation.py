"""Allocation of one image from its metadata alone: which guest ranges it holds as data, which
as zeros, and which it leaves to its backing file (for `vfsnap map` and `vfsnap diff`).

The answers follow QEMU's block status (`qcow2_co_block_status`, file-posix's
`raw_co_block_status`), so that a chain's map agrees with `qemu-img map`:

- qcow2: a normal or compressed (sub)cluster is `DATA`; a zero-flagged one `ZERO` (with or
  without a host cluster); anything else `UNALLOCATED` (docs/interop/qcow2.rst "Cluster mapping",
  "Extended L2 Entries"). Nothing is read but the L1 table (in memory) and the L2 tables of the
  range, from the table cache, or the writer's dirty tables, so acknowledged writes that are not
  yet flushed are included. Unallocated L1 entries are skipped whole, and an L2 table is
  classified in C (byte slices, big-integer OR, `bytes.translate`, one regex for the runs), so
  the cost is the number of L2 tables plus the number of runs, never the number of clusters.
- raw: `SEEK_DATA`/`SEEK_HOLE` on the file; a hole is `ZERO` (it reads as zeros and nothing below
  it is read), data is `DATA`. Where the filesystem cannot tell, everything is data (as QEMU).

Integrity checks are the reader's job: an entry pointing outside the file is reported as what
its flags say, and reading it fails with EIO as before.
"""

from __future__ import annotations

import errno
import os
import re
import sys

from vfsnap.format.image import DATA, UNALLOCATED, ZERO, Image
from vfsnap.format.qcow2 import Qcow2Image
from vfsnap.format.raw import RawImage
from vfsnap.format.tables import OFFSET_MASK, OFLAG_COMPRESSED

# A run is (start, end, kind), kind one of DATA, ZERO, UNALLOCATED; runs are sorted, adjacent
# runs have different kinds.
Run = tuple[int, int, int]

_LITTLE = sys.byteorder == "little"


def _byte(k: int) -> int:
    """Index, inside one native u64 of a table array, of the byte holding bits 8k..8k+7."""
    return k if _LITTLE else 7 - k


def _table(mapping) -> bytes:
    return bytes(mapping(i) for i in range(256))


# Per-entry classification codes (see `_standard_codes`): compressed 4, zero flag 2, host offset 1.
_COMPRESSED_CODE = _table(lambda b: 4 if b & 0x40 else 0)  # bit 62: byte 7, bit 6
_ZERO_CODE = _table(lambda b: 2 if b & 1 else 0)  # bit 0: byte 0, bit 0
_OFFSET_LOW = _table(lambda b: b & 0xFE)  # bits 9-15 of byte 1 (bit 8 is reserved)
_NONZERO = _table(lambda b: 1 if b else 0)
# Compressed is data whatever the rest says; then the zero flag; then a host offset.
_KIND_LETTER = _table(lambda b: ord("D") if b & 4 or b == 1 else ord("Z") if b & 2 else ord("U"))
_RUNS = re.compile(rb"D+|Z+|U+")
_NONZERO_RUNS = re.compile(rb"\x01+")
_LETTER_KIND = {ord("D"): DATA, ord("Z"): ZERO, ord("U"): UNALLOCATED}
_ZERO_BLOCK_BYTES = 4096
_ZERO_BLOCK = bytes(_ZERO_BLOCK_BYTES)


def allocation(image: Image, start: int, end: int) -> list[Run]:
    """Runs covering guest [start, end) of `image` (end at most its virtual size)."""
    end = min(end, image.size)
    if start >= end:
        return []
    if isinstance(image, Qcow2Image):
        return _qcow2_allocation(image, start, end)
    if isinstance(image, RawImage):
        return _raw_allocation(image.fd, start, end)
    raise TypeError(f"no allocation for {image!r}")  # pragma: no cover - a new format


def _append(out: list[Run], start: int, end: int, kind: int) -> None:
    if start >= end:
        return
    if out and out[-1][2] == kind and out[-1][1] == start:
        out[-1] = (out[-1][0], end, kind)
    else:
        out.append((start, end, kind))


# -- raw --------------------------------------------------------------------------------------


def _raw_allocation(fd: int, start: int, end: int) -> list[Run]:
    """QEMU's `find_allocation`: SEEK_DATA, then SEEK_HOLE; past the last data (ENXIO) zeros;
    any other failure means the filesystem cannot tell, and the rest counts as data."""
    out: list[Run] = []
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            _append(out, pos, end, ZERO if exc.errno == errno.ENXIO else DATA)
            break
        if data > pos:
            _append(out, pos, min(data, end), ZERO)
            pos = data
            continue
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            hole = end
        if hole <= pos:  # cannot happen on a sane filesystem; count it as data, as QEMU would
            hole = end
        _append(out, pos, min(hole, end), DATA)
        pos = hole
    return out


# -- qcow2 ------------------------------------------------------------------------------------


def _qcow2_allocation(image: Qcow2Image, start: int, end: int) -> list[Run]:
    out: list[Run] = []
    cb = image.cluster_bits
    table_shift = cb + image.l2_bits
    l1 = image.l1
    pos = start
    while pos < end:
        l1_index = pos >> table_shift
        span_end = min(end, (l1_index + 1) << table_shift)
        # `_l2_table` checks the index against the L1 table and the L2 offset against the file.
        if l1_index < len(l1) and not l1[l1_index] & OFFSET_MASK:
            _append(out, pos, span_end, UNALLOCATED)
        else:
            table = image._l2_table(l1_index)  # the writer's dirty copy first, then the cache
            if table is None:
                _append(out, pos, span_end, UNALLOCATED)
            else:
                first = (pos >> cb) & (image.l2_entries - 1)
                last = ((span_end - 1) >> cb) & (image.l2_entries - 1)
                base = l1_index << table_shift
                if image.extended_l2:
                    runs = _extended_runs(table, first, last + 1, cb, image.subcluster_size)
                else:
                    runs = _standard_runs(table, first, last + 1, cb)
                for run_start, run_end, kind in runs:
                    _append(out, max(pos, base + run_start), min(span_end, base + run_end), kind)
        pos = span_end
    return out


def _standard_runs(table, first: int, stop: int, cluster_bits: int) -> list[Run]:
    """Runs of L2 entries [first, stop) of a standard table, in bytes from the table's start."""
    raw = table[first:stop].tobytes()
    # Only the part between the first and the last non-zero 4 KiB of the table needs
    # classifying (a sparse volume's tables are mostly zeros): comparing slices with zeros is a
    # memcmp, where `bytes.strip` or a conversion to one big integer would cost 5-20x more.
    used = [i for i in range(0, len(raw), _ZERO_BLOCK_BYTES) if raw[i : i + _ZERO_BLOCK_BYTES] != _ZERO_BLOCK[: len(raw) - i]]
    if not used:
        return [(first << cluster_bits, stop << cluster_bits, UNALLOCATED)]
    lo, hi = first + used[0] // 8, first + min(len(raw), used[-1] + _ZERO_BLOCK_BYTES) // 8
    codes = _standard_codes(raw[(lo - first) * 8 : (hi - first) * 8], hi - lo)
    out: list[Run] = []
    _append(out, first << cluster_bits, lo << cluster_bits, UNALLOCATED)
    for m in _RUNS.finditer(codes):
        _append(out, (lo + m.start()) << cluster_bits, (lo + m.end()) << cluster_bits, _LETTER_KIND[codes[m.start()]])
    _append(out, hi << cluster_bits, stop << cluster_bits, UNALLOCATED)
    return out


def _standard_codes(raw: bytes, count: int) -> bytes:
    """One letter per 8-byte entry: D(ata), Z(ero) or U(nallocated), computed without a Python
    loop: per-entry bytes are strided slices, flags become small numbers by `translate`, and the
    numbers add up in one big integer without carries (each byte stays below 8)."""
    big = "big"
    offset = int.from_bytes(raw[_byte(1) :: 8].translate(_OFFSET_LOW), big)
    for k in range(2, 7):
        offset |= int.from_bytes(raw[_byte(k) :: 8], big)
    has_offset = offset.to_bytes(count, big).translate(_NONZERO)
    code = (int.from_bytes(raw[_byte(7) :: 8].translate(_COMPRESSED_CODE), big)
            + int.from_bytes(raw[_byte(0) :: 8].translate(_ZERO_CODE), big)
            + int.from_bytes(has_offset, big))
    return code.to_bytes(count, big).translate(_KIND_LETTER)


def _extended_runs(table, first: int, stop: int, cluster_bits: int, subcluster_size: int) -> list[Run]:
    """Runs of clusters [first, stop) of an extended-L2 table (entry, bitmap pairs): clusters
    whose 16 bytes are all zero are found in C; only the others are looked at one by one."""
    cluster_size = 1 << cluster_bits
    raw = table[2 * first : 2 * stop].tobytes()
    count = stop - first
    anything = 0
    for k in range(16):
        anything |= int.from_bytes(raw[k::16], "big")
    used = anything.to_bytes(count, "big").translate(_NONZERO)
    out: list[Run] = []
    pos = first
    for m in _NONZERO_RUNS.finditer(used):
        _append(out, pos << cluster_bits, (first + m.start()) << cluster_bits, UNALLOCATED)
        for cluster in range(first + m.start(), first + m.end()):
            entry, bitmap = table[2 * cluster], table[2 * cluster + 1]
            at = cluster << cluster_bits
            if entry & OFLAG_COMPRESSED:
                _append(out, at, at + cluster_size, DATA)
                continue
            alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
            for sc in range(32):
                bit = 1 << sc
                kind = DATA if alloc & bit else ZERO if zero & bit else UNALLOCATED
                _append(out, at + sc * subcluster_size, at + (sc + 1) * subcluster_size, kind)
        pos = first + m.end()
    _append(out, pos << cluster_bits, stop << cluster_bits, UNALLOCATED)
    return out
