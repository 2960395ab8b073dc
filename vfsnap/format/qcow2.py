"""qcow2 images: the L1/L2 mapping of guest clusters (docs/interop/qcow2.rst "Cluster mapping").

Reading needs no refcounts: the header, the L1 table (loaded once) and L2 tables (through the
mount's shared `TableCache`) tell for every guest cluster whether it is data in this file, zeros,
compressed, or left to the backing file. Entries that break the rules (unaligned, beyond the end
of the file, pointing into the image's own metadata, subclusters both allocated and zero) become
`BAD` extents: a read touching one fails with EIO, the rest of the image stays readable.
"""

from __future__ import annotations

import logging
import os
import threading
from array import array

from vfsnap.errors import CorruptImage
from vfsnap.format.cache import TableCache
from vfsnap.format.compression import decompress_cluster
from vfsnap.format.header import Qcow2Header, read_header
from vfsnap.format.image import COMPRESSED, DATA, UNALLOCATED, ZERO, CompressedCluster, Image, pread_full
from vfsnap.format.tables import (
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_ZERO,
    SUBCLUSTERS,
    ClusterSet,
    cluster_span,
    compressed_span,
    table_from_bytes,
    used_entries_bytes,
)
from vfsnap.format.writer import Qcow2Writer

log = logging.getLogger(__name__)

# Memory of one entry of the set of metadata clusters, counted against the table cache.
METADATA_ENTRY_BYTES = 8

BAD = 4  # extent kind: `where` is the CorruptImage to raise when the range is read

# Set on the FUSE loop's thread while it resolves a read (`deferred_loads`): an L2 table that is
# not cached is not read there (the share may be slow or hang) but reported by TableMissing,
# before anything is changed; the caller reads it on a worker thread and tries again.
_loop_state = threading.local()


class TableMissing(Exception):
    """L2 tables a mapping needs are not in memory (only raised inside `deferred_loads`).

    It names the first missing table and, found by `add_range`, the others the same resolution
    goes on to need from this image: one hand-off to a worker thread reads them all, where one
    try per table would map the range again from its start each time (a 1 MiB chunk of
    512-byte clusters spans 32 tables: 32 tries, 528 table mappings instead of 32)."""

    def __init__(self, image: "Qcow2Image", l2_offset: int, l1_index: int):
        super().__init__(f"{image.name}: L2 table at {l2_offset:#x} not loaded")
        self.image = image
        self.l2_offset = l2_offset
        self.l1_index = l1_index
        self.epoch = image._table_epoch
        self.offsets = [l2_offset]

    def add_range(self, start: int, end: int) -> None:
        """Also name the tables of guest [start, end) that are neither in memory nor known to be
        bad (those are left for the mapping to report), up to MAX_TABLES_PER_MISS and
        MAX_TABLE_READ bytes in all."""
        image = self.image
        most = max(1, min(MAX_TABLES_PER_MISS, MAX_TABLE_READ // image.cluster_size))
        loaded = getattr(_loop_state, "loaded", None) or {}
        table_shift = image.cluster_bits + image.l2_bits
        last = min((end - 1) >> table_shift, len(image.l1) - 1)
        for l1_index in range(start >> table_shift, last + 1):
            if len(self.offsets) >= most:
                break
            l2_offset = image.l1[l1_index] & OFFSET_MASK
            if (not l2_offset or l2_offset in self.offsets or image._bad_l2_offset(l2_offset)
                    or (image._dirty_l2 and l2_offset in image._dirty_l2)
                    or image._cache.get(image._cache_owner, l2_offset) is not None
                    or (image, l2_offset) in loaded):
                continue
            self.offsets.append(l2_offset)

    def load(self) -> list[bytes]:
        """The tables' bytes, in the order of `offsets` (for a worker thread). Tables next to
        each other in the file are read together: on a network share each read is a round trip."""
        cs = self.image.cluster_size
        found: dict[int, bytes] = {}
        ordered = sorted(set(self.offsets))
        i = 0
        while i < len(ordered):
            j = i + 1
            while j < len(ordered) and ordered[j] == ordered[j - 1] + cs and (j - i) * cs < MAX_TABLE_READ:
                j += 1
            data = pread_full(self.image.fd, (j - i) * cs, ordered[i])
            for k in range(i, j):
                found[ordered[k]] = data[(k - i) * cs:(k - i + 1) * cs]
            i = j
        return [found[offset] for offset in self.offsets]

    def insert(self, tables: list[bytes], loaded: dict) -> None:
        """Keep what `load` read (on the loop) in `loaded`, for the retry of the same
        resolution (a small table cache may have dropped it again by then)."""
        for offset, data in zip(self.offsets, tables):
            loaded[(self.image, offset)] = (self.epoch, table_from_bytes(data))


# How many tables one miss reads at most, and how many bytes (a read of neighbours too).
MAX_TABLES_PER_MISS = 64
MAX_TABLE_READ = 1 << 20


class deferred_loads:
    """`with deferred_loads(loaded):` L2 tables missing from memory raise TableMissing, unless
    `loaded` holds them: read for this resolution by an earlier try, and still current (no
    table of the image changed or was written back since: else the bytes may be older than
    the table, and the table is found where the change left it)."""

    def __init__(self, loaded: dict | None = None):
        self.loaded = loaded if loaded is not None else {}

    def __enter__(self):
        _loop_state.defer = True
        _loop_state.loaded = self.loaded

    def __exit__(self, *exc_info):
        _loop_state.defer = False
        _loop_state.loaded = None



class Qcow2Image(Qcow2Writer, Image):
    format = "qcow2"

    def __init__(self, fd: int, name: str, *, writable: bool, table_cache: TableCache):
        super().__init__(fd, name, writable=writable)
        self.file_size = os.fstat(fd).st_size
        self.header: Qcow2Header = read_header(fd, self.file_size, name=name)
        h = self.header
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.l2_bits = h.l2_bits
        self.l2_entries = 1 << h.l2_bits
        self.extended_l2 = h.extended_l2
        self.subcluster_size = self.cluster_size // SUBCLUSTERS if self.extended_l2 else self.cluster_size
        self._cache = table_cache
        self._cache_owner = table_cache.new_owner()
        self._pinned = 0
        try:
            self._pin(h.l1_size * 8)
            self.l1 = self._load_l1()
            self._metadata_clusters = self._find_metadata_clusters()
        except BaseException:
            table_cache.unpin(self._pinned)
            raise
        self._last_compressed: tuple[int, bytes] | None = None
        # Write state (see "writing" below); None until the first write prepares the image.
        self._refcounts = None
        self._dirty_l2: dict[int, array] = {}
        self._dirty_l1: set[int] = set()
        self._in_place: dict[int, int] = {}  # guest cluster -> host offset, writable in place
        # Counts changes and write-backs of L2 tables (see TableMissing.insert).
        self._table_epoch = 0

    # -- opening --------------------------------------------------------------------------

    def _load_l1(self) -> array:
        h = self.header
        if not h.l1_size:
            return array("Q")
        data = pread_full(self.fd, h.l1_size * 8, h.l1_table_offset)
        return table_from_bytes(data)

    def _pin(self, nbytes: int) -> None:
        self._cache.pin(nbytes, what=self.name)
        self._pinned += nbytes

    def _find_metadata_clusters(self) -> ClusterSet:
        """Clusters holding this image's own metadata, which no data entry may point into.

        Its memory counts against the table cache budget like the L1 table's: a hostile
        refcount table naming a million blocks fails the image, not the daemon.
        """
        h = self.header
        cb = self.cluster_bits
        l1_span = cluster_span(h.l1_table_offset, h.l1_size * 8, cb)
        rt_span = cluster_span(h.refcount_table_offset, h.refcount_table_clusters << cb, cb)
        # The refcount table is read for a moment only (QEMU caps it at 8 MiB); what is kept is
        # counted first, without building it, and must fit the budget before it is built.
        rt_bytes = h.refcount_table_clusters << cb
        raw = pread_full(self.fd, rt_bytes, h.refcount_table_offset) if rt_bytes else b""
        # Only up to the last used entry: a small image's table is a cluster of mostly zeros,
        # and looking at all of them cost 1 ms per image (a 1000-deep chain opened in 2 s).
        used = used_entries_bytes(raw)
        reftable = table_from_bytes(raw[:used]) if used else ()
        blocks = sum(1 for e in reftable if e & OFFSET_MASK)
        tables = sum(1 for e in self.l1 if e & OFFSET_MASK)
        self._pin((blocks + tables + len(l1_span) + len(rt_span) + 1) * METADATA_ENTRY_BYTES)
        members = [0, *l1_span, *rt_span]
        members += ((e & OFFSET_MASK) >> cb for e in reftable if e & OFFSET_MASK)
        members += ((e & OFFSET_MASK) >> cb for e in self.l1 if e & OFFSET_MASK)
        return ClusterSet(members)

    # -- Image interface ------------------------------------------------------------------

    @property
    def size(self) -> int:
        # QEMU counts whole 512-byte sectors: a header size of 1000 is a 512-byte disk.
        return self.header.size & ~511

    @property
    def granularity(self) -> int:
        return self.subcluster_size

    @property
    def backing_file(self) -> str | None:
        return self.header.backing_file

    @property
    def backing_format(self) -> str | None:
        return self.header.backing_format

    def close(self) -> None:
        if not self.closed:
            self._cache.discard_owner(self._cache_owner)
            self._cache.unpin(self._pinned)
            self._cache.unhold(len(self._dirty_l2) * self.cluster_size)  # a failed write-back's
            if self._refcounts is not None:
                self._refcounts.release()
        super().close()

    def reload(self) -> None:
        """Read header, L1 table and metadata map again; forget cached L2 tables.

        Only for an image with nothing of ours unwritten (another host wrote it meanwhile).
        """
        assert not self.dirty, "reloading an image with unwritten changes"
        self.file_size = os.fstat(self.fd).st_size
        header = read_header(self.fd, self.file_size, name=self.name)
        self._cache.unpin(self._pinned)
        self._pinned = 0
        self.header = header
        self._pin(header.l1_size * 8)
        self.l1 = self._load_l1()
        self._metadata_clusters = self._find_metadata_clusters()
        self._table_epoch += 1  # first: a load in flight on another thread must not cache its copy
        self._cache.discard_owner(self._cache_owner)
        self._last_compressed = None
        if self._refcounts is not None:
            self._refcounts.release()
        self._refcounts = None
        self._in_place.clear()

    # -- L2 tables ------------------------------------------------------------------------

    def _l2_table(self, l1_index: int) -> array | None:
        """The L2 table for `l1_index`, or None when the L1 entry is unallocated."""
        if l1_index >= len(self.l1):
            raise CorruptImage(f"{self.name}: guest cluster beyond the L1 table (index {l1_index})")
        l2_offset = self.l1[l1_index] & OFFSET_MASK
        if not l2_offset:
            return None
        table = self._dirty_l2.get(l2_offset) if self._dirty_l2 else None
        if table is None:
            table = self._cache.get(self._cache_owner, l2_offset)
        if table is None:
            table = self._load_l2(l2_offset, l1_index)
        return table

    def _load_l2(self, l2_offset: int, l1_index: int) -> array:
        cs = self.cluster_size
        if self._bad_l2_offset(l2_offset):
            raise CorruptImage(
                f"{self.name}: L1 entry {l1_index} names an L2 table at {l2_offset:#x}, "
                f"which is unaligned, in the header or beyond the end of the file ({self.file_size:#x})"
            )
        if getattr(_loop_state, "defer", False):
            known = _loop_state.loaded.get((self, l2_offset))
            if known is None or known[0] != self._table_epoch or self.closed:
                raise TableMissing(self, l2_offset, l1_index)
            epoch, table = known
        else:
            epoch = self._table_epoch
            table = table_from_bytes(pread_full(self.fd, cs, l2_offset))
        # Cached only if no table of this image became dirty or was written back since the read
        # began: another thread (the write lock's holder, a merge's copy) may have changed this
        # one meanwhile, and our copy would then hide its change from every later lookup. The
        # check and the insertion are one step under the cache's lock; the writer moves the
        # epoch on before it caches what it wrote back.
        self._cache.put_if(self._cache_owner, l2_offset, table, cs, lambda: self._table_epoch == epoch)
        return table

    def _bad_l2_offset(self, l2_offset: int) -> bool:
        cs = self.cluster_size
        return bool(l2_offset % cs or l2_offset + cs > self.file_size or l2_offset < cs)

    # -- mapping --------------------------------------------------------------------------

    def map_range(self, start: int, end: int) -> list[tuple[int, int, int, object]]:
        """Extents covering [start, end) of the guest; `end` must not exceed the virtual size."""
        out: list[tuple[int, int, int, object]] = []
        cb = self.cluster_bits
        table_shift = cb + self.l2_bits
        pos = start
        while pos < end:
            l1_index = pos >> table_shift
            span_end = min(end, (l1_index + 1) << table_shift)
            try:
                table = self._l2_table(l1_index)
            except TableMissing as miss:
                miss.add_range(span_end, end)
                raise
            except CorruptImage as exc:
                _append(out, pos, span_end, BAD, exc)
                pos = span_end
                continue
            if table is None:
                _append(out, pos, span_end, UNALLOCATED, 0)
            elif self.extended_l2:
                self._map_extended(table, pos, span_end, out)
            else:
                self._map_standard(table, pos, span_end, out)
            pos = span_end
        return out

    def _map_standard(self, table: array, pos: int, end: int, out: list) -> None:
        cb = self.cluster_bits
        mask = self.l2_entries - 1
        while pos < end:
            cluster = pos >> cb
            cluster_start = cluster << cb
            cluster_end = min(end, cluster_start + self.cluster_size)
            entry = table[cluster & mask]
            if entry & OFLAG_COMPRESSED:
                _append(out, pos, cluster_end, *self._compressed_extent(entry, cluster))
            elif entry & OFLAG_ZERO:
                _append(out, pos, cluster_end, ZERO, 0)
            else:
                host = entry & OFFSET_MASK
                if not host:
                    _append(out, pos, cluster_end, UNALLOCATED, 0)
                else:
                    problem = self._check_data_cluster(host, cluster_start)
                    if problem is None:
                        _append(out, pos, cluster_end, DATA, host + (pos - cluster_start))
                    else:
                        _append(out, pos, cluster_end, BAD, problem)
            pos = cluster_end

    def _map_extended(self, table: array, pos: int, end: int, out: list) -> None:
        cb = self.cluster_bits
        mask = self.l2_entries - 1
        sc_size = self.subcluster_size
        while pos < end:
            cluster = pos >> cb
            cluster_start = cluster << cb
            cluster_end = min(end, cluster_start + self.cluster_size)
            index = (cluster & mask) * 2
            entry, bitmap = table[index], table[index + 1]
            if entry & OFLAG_COMPRESSED:
                _append(out, pos, cluster_end, *self._compressed_extent(entry, cluster))
                pos = cluster_end
                continue
            host = entry & OFFSET_MASK
            alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
            problem = None
            if alloc & zero:
                problem = CorruptImage(
                    f"{self.name}: subclusters of guest offset {cluster_start:#x} are both allocated and zero"
                )
            elif alloc and not host:
                problem = CorruptImage(
                    f"{self.name}: subclusters of guest offset {cluster_start:#x} allocated without a host cluster"
                )
            elif alloc:
                problem = self._check_data_cluster(host, cluster_start)
            if problem is not None:
                _append(out, pos, cluster_end, BAD, problem)
                pos = cluster_end
                continue
            while pos < cluster_end:
                sc = (pos - cluster_start) // sc_size
                sc_end = min(cluster_end, cluster_start + (sc + 1) * sc_size)
                bit = 1 << sc
                if alloc & bit:
                    _append(out, pos, sc_end, DATA, host + (pos - cluster_start))
                elif zero & bit:
                    _append(out, pos, sc_end, ZERO, 0)
                else:
                    _append(out, pos, sc_end, UNALLOCATED, 0)
                pos = sc_end

    def _check_data_cluster(self, host: int, guest: int) -> CorruptImage | None:
        if host & (self.cluster_size - 1):
            return CorruptImage(f"{self.name}: data cluster for guest offset {guest:#x} at unaligned {host:#x}")
        if host >= self.file_size:
            return CorruptImage(
                f"{self.name}: data cluster for guest offset {guest:#x} at {host:#x} "
                f"lies beyond the end of the file ({self.file_size:#x})"
            )
        if host >> self.cluster_bits in self._metadata_clusters:
            return CorruptImage(f"{self.name}: data cluster for guest offset {guest:#x} points into metadata at {host:#x}")
        return None

    def _compressed_extent(self, entry: int, cluster: int) -> tuple[int, object]:
        cb = self.cluster_bits
        host, length = compressed_span(entry, cb)
        if host >= self.file_size or host < self.cluster_size:
            return BAD, CorruptImage(
                f"{self.name}: compressed cluster for guest offset {cluster << cb:#x} at {host:#x} "
                "lies outside the file's data area"
            )
        return COMPRESSED, CompressedCluster(self, host, length, cluster)

    def read_compressed(self, cluster: CompressedCluster) -> bytes:
        """The decoded bytes of one compressed cluster (the last one is kept for sequential reads)."""
        last = self._last_compressed
        if last is not None and last[0] == cluster.host_offset:
            return last[1]
        data = os.pread(self.fd, cluster.length, cluster.host_offset)
        where = f"{self.name}: compressed cluster for guest offset {cluster.guest_cluster << self.cluster_bits:#x}"
        decoded = decompress_cluster(data, self.cluster_size, self.header.compression_type, where=where)
        self._last_compressed = (cluster.host_offset, decoded)
        return decoded


def _append(out: list, start: int, end: int, kind: int, where: object) -> None:
    """Append an extent, merging it into the previous one when they continue each other."""
    if out:
        p_start, p_end, p_kind, p_where = out[-1]
        if p_kind == kind and p_end == start:
            if kind == ZERO or kind == UNALLOCATED:
                out[-1] = (p_start, end, kind, 0)
                return
            if kind == DATA and p_where + (p_end - p_start) == where:
                out[-1] = (p_start, end, kind, p_where)
                return
    out.append((start, end, kind, where))

