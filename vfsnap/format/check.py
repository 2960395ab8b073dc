"""Consistency check and repair of qcow2 metadata (what `qemu-img check [-r all]` does).

References are counted from scratch: the header cluster, the refcount table and blocks, the
active L1 table and every L2 table and data cluster it reaches, the internal snapshots' tables
(walked again for each snapshot, as QEMU counts them) and the bitmap directory and tables.
They are compared with the stored refcounts: a count above the references is a leak (harmless,
`qemu-img check` exit 3), below is a corruption (exit 2). COPIED flags of the active tables are
checked against the counts. Repair rebuilds the refcount structures at the end of the file and
fixes COPIED flags.
"""

from __future__ import annotations

import os
import struct
from array import array

import attrs

from vfsnap.errors import CorruptImage
from vfsnap.format.header import EXT_BITMAPS, MAX_L1_BYTES
from vfsnap.format.image import pread_full
from vfsnap.format.tables import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    cluster_span,
    compressed_span,
    sync,
    table_from_bytes,
    table_to_bytes,
    write_all,
)

MAX_REPORTED = 50


@attrs.frozen
class CheckReport:
    image: str
    corruptions: tuple[str, ...] = ()
    leaks: tuple[int, ...] = ()  # cluster indices counted but not referenced
    copied_errors: int = 0
    repaired: bool = False
    unrepairable: bool = False

    @property
    def clean(self) -> bool:
        return not self.corruptions and not self.leaks and not self.copied_errors

    def lines(self) -> list[str]:
        out = [f"{self.image}: corruption: {c}" for c in self.corruptions[:MAX_REPORTED]]
        if len(self.corruptions) > MAX_REPORTED:
            out.append(f"{self.image}: ... {len(self.corruptions) - MAX_REPORTED} more corruptions")
        if self.leaks:
            out.append(f"{self.image}: {len(self.leaks)} leaked cluster(s)")
        if self.copied_errors:
            out.append(f"{self.image}: {self.copied_errors} wrong COPIED flag(s)")
        return out


class _References:
    """How often each host cluster is referenced."""

    def __init__(self, image):
        self.cluster_bits = image.cluster_bits
        self.file_size = os.fstat(image.fd).st_size
        self.file_clusters = -(-self.file_size // image.cluster_size)
        self.counts = array("I", bytes(4 * (self.file_clusters + 1)))
        self.problems: list[str] = []
        self.beyond_eof = 0  # references to clusters the file does not reach (truncated?)
        self.first_beyond_eof = ""

    @property
    def unrepairable(self) -> bool:
        """Data is missing: no refcount rebuild can bring it back."""
        return bool(self.beyond_eof)

    def add(self, offset: int, length: int, what: str) -> None:
        if not offset:
            return
        # QEMU's rule (qcow2-refcount.c inc_refcounts): the last cluster may be partly past the
        # end of the file, but a region reaching a whole cluster or more past it is corrupt.
        if offset + length - self.file_size >= (1 << self.cluster_bits):
            self.beyond_eof += 1
            self.first_beyond_eof = self.first_beyond_eof or f"{what} at {offset:#x}"
            return
        for cluster in cluster_span(offset, length, self.cluster_bits):
            if cluster >= len(self.counts):
                self.counts.extend([0] * (cluster + 1 - len(self.counts)))
            self.counts[cluster] += 1

    def finish(self) -> "_References":
        if self.beyond_eof:
            self.problems.append(
                f"{self.beyond_eof} reference(s) to clusters beyond the end of the file, first {self.first_beyond_eof}: "
                "the image was truncated or its tables point outside it; that data is lost"
            )
        return self

    def add_cluster(self, offset: int, what: str) -> None:
        self.add(offset, 1 << self.cluster_bits, what)


def count_references(image, *, include_refcount_structures: bool = True) -> _References:
    h = image.header
    cb = image.cluster_bits
    refs = _References(image)
    refs.counts[0] += 1  # the header (offset 0 means "none" everywhere else)
    if include_refcount_structures and h.refcount_table_clusters:
        refs.add(h.refcount_table_offset, h.refcount_table_clusters << cb, "refcount table")
        reftable = table_from_bytes(pread_full(image.fd, h.refcount_table_clusters << cb, h.refcount_table_offset))
        for entry in reftable:
            if entry & OFFSET_MASK:
                refs.add_cluster(entry & OFFSET_MASK, "refcount block")
    refs.add(h.l1_table_offset, h.l1_size * 8, "L1 table")
    _walk_l1(image, image.l1, refs, active=True)
    for l1_offset, l1_size in _snapshot_l1s(image, refs):
        refs.add(l1_offset, l1_size * 8, "snapshot L1 table")
        l1 = table_from_bytes(pread_full(image.fd, l1_size * 8, l1_offset))
        _walk_l1(image, l1, refs, active=False)
    _walk_bitmaps(image, refs)
    return refs.finish()


def _walk_l1(image, l1: array, refs: _References, *, active: bool) -> None:
    cb = image.cluster_bits
    step = 2 if image.extended_l2 else 1
    for l1_index, l1_entry in enumerate(l1):
        l2_offset = l1_entry & OFFSET_MASK
        if not l2_offset:
            continue
        refs.add_cluster(l2_offset, "L2 table")
        if active:
            table = image._l2_table(l1_index)
        else:
            table = table_from_bytes(pread_full(image.fd, image.cluster_size, l2_offset))
        for i in range(0, len(table), step):
            entry = table[i]
            if entry & OFLAG_COMPRESSED:
                host, length = compressed_span(entry, cb)
                refs.add(host, length, "compressed cluster")
            elif entry & OFFSET_MASK:
                refs.add_cluster(entry & OFFSET_MASK, "data cluster")


MAX_SNAPSHOTS = 65536  # QEMU's QCOW_MAX_SNAPSHOTS
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20


def _snapshot_l1s(image, refs: _References) -> list[tuple[int, int]]:
    """The internal snapshots' L1 tables, each checked to lie inside the file and to be of a
    size QEMU accepts: a lying table is a problem reported, never a walk without end."""
    h = image.header
    if not h.nb_snapshots:
        return []
    if h.nb_snapshots > MAX_SNAPSHOTS or h.snapshots_offset >= refs.file_size:
        refs.problems.append(f"snapshot table ({h.nb_snapshots} entries at {h.snapshots_offset:#x}) is impossible")
        return []
    out = []
    offset = start = h.snapshots_offset
    for _ in range(h.nb_snapshots):
        if offset + 40 > refs.file_size or offset - start > MAX_SNAPSHOT_TABLE_BYTES:
            refs.problems.append(f"snapshot table at {start:#x} runs past the end of the file")
            return out
        fixed = pread_full(image.fd, 40, offset)
        l1_offset, l1_size, id_len, name_len = struct.unpack_from(">QIHH", fixed, 0)
        extra_size = struct.unpack_from(">I", fixed, 36)[0]
        if (l1_size * 8 > MAX_L1_BYTES or l1_offset % image.cluster_size
                or l1_offset + l1_size * 8 > refs.file_size or extra_size > 1 << 16):
            refs.problems.append(f"snapshot entry at {offset:#x} names an impossible L1 table "
                                 f"({l1_size} entries at {l1_offset:#x})")
        else:
            out.append((l1_offset, l1_size))
        length = 40 + extra_size + id_len + name_len
        offset += (length + 7) & ~7
    refs.add(start, offset - start, "snapshot table")
    return out


def _walk_bitmaps(image, refs: _References) -> None:
    ext = image.header.extension(EXT_BITMAPS)
    if ext is None or len(ext.data) < 24:
        return
    nb_bitmaps, _reserved, dir_size, dir_offset = struct.unpack_from(">IIQQ", ext.data, 0)
    if dir_size > 64 << 20 or dir_offset + dir_size > refs.file_size:
        refs.problems.append("bitmap directory is absurdly large or outside the file")
        return
    refs.add(dir_offset, dir_size, "bitmap directory")
    directory = pread_full(image.fd, dir_size, dir_offset)
    pos = 0
    for _ in range(nb_bitmaps):
        if pos + 24 > len(directory):
            break
        table_offset, table_size, _flags, name_size, _type, _gran, extra = struct.unpack_from(">QIIHBBI", directory, pos)
        if table_offset + table_size * 8 > refs.file_size or table_size * 8 > MAX_SNAPSHOT_TABLE_BYTES:
            refs.problems.append(f"bitmap table at {table_offset:#x} ({table_size} entries) lies outside the file")
            return
        refs.add(table_offset, table_size * 8, "bitmap table")
        table = table_from_bytes(pread_full(image.fd, table_size * 8, table_offset))
        for entry in table:
            if entry & OFFSET_MASK:
                refs.add_cluster(entry & OFFSET_MASK, "bitmap data")
        pos += (24 + extra + name_size + 7) & ~7


def check_image(image) -> CheckReport:
    """Compare stored refcounts with counted references; nothing is written."""
    from vfsnap.format.refcount import Refcounts

    refs = count_references(image)
    stored = Refcounts(image)
    corruptions = list(refs.problems)
    leaks = []
    limit = max(len(refs.counts), stored.end_cluster)
    for cluster in range(limit):
        counted = refs.counts[cluster] if cluster < len(refs.counts) else 0
        have = stored.get(cluster)
        if have < counted:
            corruptions.append(f"cluster {cluster} refcount={have} reference={counted}")
        elif have > counted and cluster < refs.file_clusters:
            leaks.append(cluster)
    copied = _copied_errors(image, stored, fix=False)
    stored.release()
    return CheckReport(image.name, tuple(corruptions), tuple(leaks), copied, unrepairable=refs.unrepairable)


def _copied_errors(image, refcounts, *, fix: bool) -> int:
    """Count (and optionally fix) COPIED flags on the active L1 and L2 tables."""
    cb = image.cluster_bits
    step = 2 if image.extended_l2 else 1
    errors = 0
    for l1_index, l1_entry in enumerate(image.l1):
        l2_offset = l1_entry & OFFSET_MASK
        if not l2_offset:
            continue
        want = refcounts.get(l2_offset >> cb) == 1
        if bool(l1_entry & OFLAG_COPIED) != want:
            errors += 1
            if fix:
                image.l1[l1_index] = l2_offset | (OFLAG_COPIED if want else 0)
                image._dirty_l1.add(l1_index)
        table = image._l2_table(l1_index)
        changed = False
        for i in range(0, len(table), step):
            entry = table[i]
            if entry & OFLAG_COMPRESSED:
                want_copied = False
            elif entry & OFFSET_MASK:
                want_copied = refcounts.get((entry & OFFSET_MASK) >> cb) == 1
            else:
                want_copied = False
            if bool(entry & OFLAG_COPIED) != want_copied:
                errors += 1
                if fix:
                    table[i] = (entry & ~OFLAG_COPIED) | (OFLAG_COPIED if want_copied else 0)
                    changed = True
        if changed and want:
            if l2_offset not in image._dirty_l2:
                image._cache.hold(image.cluster_size)
            image._dirty_l2[l2_offset] = table
    return errors


def rebuild_refcounts(image) -> CheckReport:
    """Write fresh refcount structures from the counted references (the dirty-bit repair).

    The new table and blocks go after everything else in the file and count themselves;
    the header is switched to them in one write once they are durable; the old structures
    become free space. Then COPIED flags are made exact and the dirty bit cleared.
    """
    from vfsnap.format.refcount import Refcounts

    h = image.header
    cs = image.cluster_size
    cb = image.cluster_bits
    refs = count_references(image, include_refcount_structures=False)
    if refs.unrepairable:
        raise CorruptImage(f"{image.name}: cannot rebuild refcounts: {refs.problems[-1]}")
    counts = refs.counts
    used_end = len(counts)
    while used_end and not counts[used_end - 1]:
        used_end -= 1
    place = max(used_end, refs.file_clusters)
    bits = 1 << h.refcount_order
    entries_per_block = (cs * 8) // bits
    table_clusters, nblocks = 1, 1
    while True:
        # The new blocks must cover everything up to and including themselves and the table.
        end = place + table_clusters + nblocks
        need_blocks = -(-end // entries_per_block)
        need_table = -(-(need_blocks * 8) // cs)
        if need_blocks <= nblocks and need_table <= table_clusters:
            break
        nblocks, table_clusters = max(nblocks, need_blocks), max(table_clusters, need_table)
    table_offset = place << cb
    first_block = place + table_clusters
    counts = array("I", counts[:end]) if len(counts) >= end else array("I", list(counts) + [0] * (end - len(counts)))
    for cluster in range(place, first_block + nblocks):
        counts[cluster] += 1
    max_count = (1 << bits) - 1
    table = array("Q", [0] * (table_clusters * cs // 8))
    for b in range(nblocks):
        block_counts = counts[b * entries_per_block : (b + 1) * entries_per_block]
        table[b] = (first_block + b) << cb
        write_all(image.fd, _pack_block(block_counts, bits, cs, max_count, image.name), (first_block + b) << cb, image.name)
    write_all(image.fd, table_to_bytes(table), table_offset, image.name)
    sync(image.fd, image.name)
    image.write_header(
        attrs.evolve(
            image.header,
            refcount_table_offset=table_offset,
            refcount_table_clusters=table_clusters,
        )
    )
    image._metadata_clusters = image._find_metadata_clusters()
    refcounts = Refcounts(image)
    if image._refcounts is not None:
        image._refcounts.release()
    image._refcounts = refcounts
    errors = _copied_errors(image, refcounts, fix=True)
    image.flush()
    image.write_header(attrs.evolve(image.header, incompatible_features=image.header.incompatible_features & ~1))
    return CheckReport(image.name, tuple(refs.problems), (), errors, repaired=True)


def _pack_block(counts, bits: int, cluster_size: int, max_count: int, name: str) -> bytes:
    block = bytearray(cluster_size)
    for index, value in enumerate(counts):
        if not value:
            continue
        if value > max_count:
            raise CorruptImage(f"{name}: a cluster is referenced {value} times, more than {bits}-bit refcounts hold")
        if bits >= 8:
            width = bits >> 3
            block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
        else:
            bit = index * bits
            block[bit >> 3] |= value << (bit & 7)
    return bytes(block)


__all__ = ["CheckReport", "check_image", "count_references", "rebuild_refcounts", "OFLAG_ZERO"]
