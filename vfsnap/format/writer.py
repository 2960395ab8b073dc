"""The write half of qcow2 images (QEMU's qcow2-cluster.c): in-place writes, allocation with
copy-on-write, L2/L1 updates, resizing, header rewrites, and the ordered write-back of metadata.
"""

from __future__ import annotations

import errno as errno_codes
import logging
import os
from array import array

import attrs

from vfsnap.errors import CorruptImage, NotPermitted, ReadOnly, VfsnapError
from vfsnap.format.create import round_size
from vfsnap.format.header import INCOMPAT_DIRTY, MAX_L1_BYTES, Qcow2Header, read_header, serialize_header_area, with_backing
from vfsnap.format.tables import (
    ALL_SUBCLUSTERS_ALLOCATED,
    OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    cluster_span,
    compressed_span,
    sync,
    table_to_bytes,
    write_all,
    write_error,
)

log = logging.getLogger(__name__)

# Write back dirty L2 tables once this many are held (bounds memory and what a crash loses).
MAX_DIRTY_L2_TABLES = 256
# Clusters remembered as writable in place (a dict entry each, about 100 bytes).
MAX_IN_PLACE_CLUSTERS = 1 << 16


class Qcow2Writer:
    """Mixed into `Qcow2Image`; works on its header, L1 table, L2 cache and file descriptor.

    Metadata changes stay in memory until `flush`, which writes them in the order that makes a
    crash at any point leak clusters at worst (QCOW2-NOTES 1.8 rule 4):
    (a, b) data and refcount increments, fdatasync; (c) L2 tables, fdatasync; L1 entries,
    fdatasync; (d) only then the refcount decrements of clusters whose last reference went away.
    """

    # -- preparing ------------------------------------------------------------------------

    def prepare_for_writing(self) -> None:
        """Checks and header fixes due before the first write (QCOW2-NOTES checklist 4, 5)."""
        if self._refcounts is not None:
            return
        if not self.writable:
            raise ReadOnly(f"{self.name}: image is open read-only")
        h = self.header
        if h.marked_corrupt:
            raise CorruptImage(f"{self.name}: image is marked corrupt; repair it (qemu-img check -r all) before writing")
        if h.dirty:
            from vfsnap.format.check import rebuild_refcounts

            rebuild_refcounts(self)
            h = self.header
        if not h.refcount_table_clusters:
            raise CorruptImage(f"{self.name}: image has no refcount table")
        from vfsnap.format.refcount import Refcounts

        if self._refcounts is not None:  # the rebuild's, written back: counts read afresh below
            self._refcounts.release()
        refcounts = Refcounts(self)
        # vfsnap maintains no bitmaps and knows no other autoclear feature: clear them all before
        # the first write, as the specification requires. And mark the image dirty while its
        # metadata changes: a crash then leaves the bit set, and the next mount (or QEMU's next
        # read-write open) rebuilds the refcounts, which reclaims the clusters a crash leaked.
        # Only once that mark is durable may metadata change (rule 5).
        incompatible = h.incompatible_features | (INCOMPAT_DIRTY if h.version >= 3 else 0)
        if h.autoclear_features or incompatible != h.incompatible_features:
            self.write_header(attrs.evolve(h, autoclear_features=0, incompatible_features=incompatible))
        log.debug("%s: marked dirty for writing", self.name)
        self._refcounts = refcounts

    def close_writes(self) -> None:
        """Write everything back and clear the dirty bit: the image is consistent on disk."""
        self.flush()
        log.debug("%s: close_writes (refcounts %s, dirty %s)", self.name, self._refcounts is not None, self.header.dirty)
        if self._refcounts is not None and self.header.dirty:
            self.write_header(attrs.evolve(self.header, incompatible_features=self.header.incompatible_features & ~INCOMPAT_DIRTY))
            self._refcounts.release()
            self._refcounts = None  # the next metadata change marks it dirty again

    @property
    def refcounts(self):
        self.prepare_for_writing()
        return self._refcounts

    def write_header(self, header: Qcow2Header) -> None:
        """Rewrite the header area of cluster 0 in one write and make it durable (rule 4f)."""
        old_area = serialize_header_area(self.header, self.cluster_size)
        old_end = max(len(old_area), self.header.backing_file_offset + self.header.backing_file_size)
        area = serialize_header_area(header, self.cluster_size)
        area += bytes(max(0, old_end - len(area)))
        try:
            write_all(self.fd, area, 0, self.name)
            sync(self.fd, self.name)
        finally:
            # What is on disk now, written or not: never act on a header we only meant to write.
            self.header = read_header(self.fd, os.fstat(self.fd).st_size, name=self.name)

    def set_backing(self, backing_file: str | None, backing_format: str | None) -> None:
        """Point the image at another backing file (`qemu-img rebase -u`)."""
        if not self.writable:
            raise ReadOnly(f"{self.name}: image is open read-only")
        self.flush()
        self.write_header(with_backing(self.header, backing_file, backing_format))

    def switch_refcount_table(self, offset: int, clusters: int) -> None:
        self._metadata_clusters.update(cluster_span(offset, clusters << self.cluster_bits, self.cluster_bits))
        self.write_header(attrs.evolve(self.header, refcount_table_offset=offset, refcount_table_clusters=clusters))

    # -- writing data ---------------------------------------------------------------------

    def in_place_offset(self, offset: int, length: int) -> int | None:
        """Host offset at which guest [offset, offset+length) can be overwritten in place.

        Only within one cluster that this image alone owns (COPIED) and that holds plain data;
        anything else (unallocated, zero, compressed, shared, partly allocated subclusters)
        needs a new cluster.
        """
        cb = self.cluster_bits
        cluster = offset >> cb
        if (offset + length - 1) >> cb != cluster:
            return None
        known = self._in_place.get(cluster)
        if known is not None:
            return known + (offset - (cluster << cb))
        l1_index = cluster >> self.l2_bits
        if l1_index >= len(self.l1) or not self.l1[l1_index] & OFLAG_COPIED:
            return None
        table = self._l2_table(l1_index)
        index = cluster & (self.l2_entries - 1)
        if self.extended_l2:
            entry = table[index * 2]
            if table[index * 2 + 1] != ALL_SUBCLUSTERS_ALLOCATED:
                return None
        else:
            entry = table[index]
        if entry & (OFLAG_COPIED | OFLAG_COMPRESSED | OFLAG_ZERO) != OFLAG_COPIED:
            return None
        host = entry & OFFSET_MASK
        if not host or self._check_data_cluster(host, cluster << cb) is not None:
            return None
        # Remember the answer: the next write to this cluster skips the table walk. Forgotten
        # whenever the cluster's entry changes (_set_entry) or the tables are reloaded.
        if len(self._in_place) >= MAX_IN_PLACE_CLUSTERS:
            self._in_place.clear()
        self._in_place[cluster] = host
        return host + (offset - (cluster << cb))

    def write_in_place(self, host: int, data) -> None:
        try:
            written = os.pwrite(self.fd, data, host)
        except OSError as exc:
            raise write_error(exc, self.name) from None
        if written != len(data):  # short: finish it
            write_all(self.fd, memoryview(data)[written:], host + written, self.name)
        self._data_dirty = True
        self._data_generation += len(data)

    def write_clusters(self, first_cluster: int, data) -> int:
        """Store whole guest clusters in newly allocated host clusters; return the host offset.

        The data is written at once; the L2 entries that point at it are written back later,
        after the data and the refcounts (rules 4a, 4b). Old references are released.
        """
        cb = self.cluster_bits
        count = len(data) >> cb
        assert count and len(data) == count << cb, "write_clusters takes whole clusters"
        refcounts = self.refcounts
        start = refcounts.allocate(count)
        host = start << cb
        try:
            write_all(self.fd, data, host, self.name)
        except VfsnapError:
            # Nothing references the clusters yet: give them back right away.
            for cluster in range(start, start + count):
                refcounts.change(cluster, -1)
            raise
        self.file_size = max(self.file_size, host + len(data))
        self._data_dirty = True
        self._data_generation += len(data)
        for i in range(count):
            self._set_entry(first_cluster + i, (host + (i << cb)) | OFLAG_COPIED, ALL_SUBCLUSTERS_ALLOCATED)
        if len(self._dirty_l2) > MAX_DIRTY_L2_TABLES or self._cache.dirty_over_limit:
            # bounds memory (the mount's budget) and what a crash loses; frees wait for reads in
            # flight (vfsnap/share/io.py rule 5)
            self.flush(apply_frees=False)
        return host

    def zero_clusters(self, first_cluster: int, count: int) -> None:
        """Make whole guest clusters read as zeros, hiding the backing file (discard, write -z).

        v3: zero flag without a host cluster (`0x1`), freeing what was there. v2 has no zero
        flag: the caller must write clusters of zeros instead (rule 6).
        """
        if self.header.version < 3:
            raise NotPermitted(f"{self.name}: qcow2 v2 has no zero clusters")
        self.prepare_for_writing()
        for cluster in range(first_cluster, first_cluster + count):
            if self.extended_l2:
                self._set_entry(cluster, 0, ALL_SUBCLUSTERS_ALLOCATED << 32)
            else:
                self._set_entry(cluster, OFLAG_ZERO, 0)

    def _set_entry(self, cluster: int, entry: int, bitmap: int) -> None:
        self._in_place.pop(cluster, None)
        l1_index = cluster >> self.l2_bits
        if l1_index >= len(self.l1):
            raise CorruptImage(f"{self.name}: write beyond the L1 table (guest cluster {cluster})")
        table = self._l2_for_write(l1_index)
        index = cluster & (self.l2_entries - 1)
        if self.extended_l2:
            old = table[index * 2]
            table[index * 2] = entry
            table[index * 2 + 1] = bitmap
        else:
            old = table[index]
            table[index] = entry
        self._release(old)

    def _release(self, entry: int) -> None:
        """Drop the reference an overwritten L2 entry held (the count drops after flush)."""
        cb = self.cluster_bits
        if entry & OFLAG_COMPRESSED:
            host, length = compressed_span(entry, cb)
            first, last = host >> cb, (host + length - 1) >> cb
            self._refcounts.free(first, last - first + 1)
            return
        host = entry & OFFSET_MASK
        if host:
            self._refcounts.free(host >> cb)

    def _l2_for_write(self, l1_index: int) -> array:
        """The L2 table for `l1_index`, owned by this image and marked dirty."""
        l1_entry = self.l1[l1_index]
        l2_offset = l1_entry & OFFSET_MASK
        if l2_offset and l1_entry & OFLAG_COPIED:
            table = self._dirty_l2.get(l2_offset)
            if table is None:
                table = self._l2_table(l1_index)
                self._table_epoch += 1  # a copy read from the file earlier is now out of date
                self._dirty_l2[l2_offset] = table
                self._cache.hold(self.cluster_size)
            return table
        # No table yet, or one shared with an internal snapshot: allocate our own (rule 2).
        refcounts = self.refcounts
        new_offset = refcounts.allocate(1) << self.cluster_bits
        if l2_offset:
            table = array("Q", self._l2_table(l1_index))
            refcounts.free(l2_offset >> self.cluster_bits)
        else:
            table = array("Q", bytes(self.cluster_size))
        self._table_epoch += 1
        self._dirty_l2[new_offset] = table
        self._cache.hold(self.cluster_size)
        self._metadata_clusters.add(new_offset >> self.cluster_bits)
        self.l1[l1_index] = new_offset | OFLAG_COPIED
        self._dirty_l1.add(l1_index)
        return table

    # -- write-back -----------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(
            self._data_dirty or self._dirty_l2 or self._dirty_l1
            or (self._refcounts is not None and (self._refcounts.dirty or self._refcounts.has_pending_frees))
        )

    def flush(self, apply_frees: bool = True) -> None:
        """Make every write so far durable, metadata in dependency order.

        With `apply_frees=False` the counts of clusters whose last reference went away stay as
        they are (`apply_pending_frees` lowers them later, once no read in flight can still
        be reading such a cluster: vfsnap/share/io.py rule 5)."""
        refcounts = self._refcounts
        need_sync = self._data_dirty
        if refcounts is not None and refcounts.write_increments():
            need_sync = True
        if self._dirty_l2 or self._dirty_l1:
            self._table_epoch += 1
            if need_sync:
                sync(self.fd, self.name)  # data and counts before the entries that use them
            cs = self.cluster_size
            for offset, table in sorted(self._dirty_l2.items()):
                write_all(self.fd, table_to_bytes(table), offset, self.name)
                self.file_size = max(self.file_size, offset + cs)
                self._cache.put(self._cache_owner, offset, table, cs)
            self._cache.unhold(len(self._dirty_l2) * cs)
            self._dirty_l2.clear()
            if self._dirty_l1:
                sync(self.fd, self.name)  # new L2 tables before the L1 entries naming them
                self._write_l1_entries(sorted(self._dirty_l1))
                self._dirty_l1.clear()
            need_sync = True
        if need_sync:
            sync(self.fd, self.name)
        self._data_dirty = False
        self._synced_generation = self._data_generation
        if apply_frees:
            self.apply_pending_frees()

    def flush_keeping_frees(self) -> None:
        self.flush(apply_frees=False)

    def apply_pending_frees(self) -> None:
        """Lower the counts of clusters no entry references any more (after a flush)."""
        refcounts = self._refcounts
        if refcounts is not None and refcounts.has_pending_frees:
            refcounts.apply_frees()
            self._data_dirty = True  # the lowered counts are synced with the next flush
            self._data_generation += 1

    def _write_l1_entries(self, indexes: list[int]) -> None:
        first, last = indexes[0], indexes[-1]
        data = table_to_bytes(self.l1[first : last + 1])
        write_all(self.fd, data, self.header.l1_table_offset + first * 8, self.name)

    # -- resizing -------------------------------------------------------------------------

    def resize(self, new_size: int) -> None:
        """Grow the virtual size (shrinking is refused), moving the L1 table if it is too small.

        The size is rounded up to whole 512-byte sectors, as qemu-img does.
        """
        new_size = round_size(new_size)
        if new_size < self.size:
            raise NotPermitted(f"{self.name}: shrinking a volume is not supported")
        if new_size == self.size:
            return
        needed = self.header.l1_entries_needed(new_size)
        if needed * 8 > MAX_L1_BYTES:
            # What qemu-img resize answers: "Failed to grow the L1 table: File too large".
            raise VfsnapError(f"{self.name}: {new_size} bytes need an L1 table of {needed} entries, more than "
                              f"qcow2 allows with {self.cluster_size}-byte clusters", errno=errno_codes.EFBIG)
        self.prepare_for_writing()
        self.flush()
        if needed <= len(self.l1):
            self.write_header(attrs.evolve(self.header, size=new_size))
            return
        refcounts = self._refcounts
        cb = self.cluster_bits
        growth = (needed - len(self.l1)) * 8
        try:
            self._cache.pin(growth, what=self.name)
        except VfsnapError as exc:
            raise VfsnapError(f"{exc} (raise memory_budget)", errno=errno_codes.EFBIG) from None
        self._pinned += growth
        new_l1 = array("Q", self.l1)
        new_l1.extend([0] * (needed - len(new_l1)))
        clusters = -(-(needed * 8) // self.cluster_size)
        start = refcounts.allocate(clusters)
        try:
            data = table_to_bytes(new_l1)
            data += bytes((clusters << cb) - len(data))
            write_all(self.fd, data, start << cb, self.name)
            self.file_size = max(self.file_size, (start + clusters) << cb)
            refcounts.write_increments()
            sync(self.fd, self.name)
        except VfsnapError:
            for cluster in range(start, start + clusters):  # nothing references them yet
                refcounts.change(cluster, -1)
            self._cache.unpin(growth)
            self._pinned -= growth
            raise
        old_offset, old_size = self.header.l1_table_offset, self.header.l1_size
        self.write_header(attrs.evolve(self.header, size=new_size, l1_size=needed, l1_table_offset=start << cb))
        self.l1 = new_l1
        self._metadata_clusters.update(range(start, start + clusters))
        if old_size:
            first = old_offset >> cb
            last = (old_offset + old_size * 8 - 1) >> cb
            refcounts.free(first, last - first + 1)
            self._metadata_clusters.difference_update(range(first, last + 1))
        self.flush()

