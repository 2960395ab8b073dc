"""qcow2 refcounts: reading and changing counts, allocating clusters, growing the table.

docs/interop/qcow2.rst "Host cluster management". Counts live in refcount blocks (one cluster
each, `refcount_bits` per entry, sub-byte widths packed from the least significant bit) named by
the refcount table. Changes are made in memory and written back by `Qcow2Image.flush` in QEMU's
order (QCOW2-NOTES 1.8 rule 4): increments reach the disk before any L2 entry that relies on
them; decrements only after the L2 entries that dropped the references, so a crash can leak a
cluster but never leave one in use with a count of zero.

Memory: refcount blocks are cached in the mount's one budget (`vfsnap.format.cache`), as L2
tables are: clean blocks in its LRU, under an owner key of their own (one per `Refcounts`, so a
block is never served from before a rebuild or from an earlier write session); changed blocks are
held, counted against the budget, until the flush writes them, then go back to the LRU. The
refcount table itself stays outside the budget: 8 bytes per block, 4 KiB for a 1 TiB file.
"""

from __future__ import annotations

import os
from array import array

from vfsnap.errors import CorruptImage, NoSpace
from vfsnap.format.image import pread_full
from vfsnap.format.tables import OFFSET_MASK, sync, table_from_bytes, table_to_bytes, write_all


class Refcounts:
    def __init__(self, image):
        h = image.header
        self.image = image
        self.fd = image.fd
        self.cluster_bits = h.cluster_bits
        self.cluster_size = h.cluster_size
        self.order = h.refcount_order
        self.bits = 1 << self.order
        self.max_count = (1 << self.bits) - 1
        # log2 of the number of entries in one block
        self.block_shift = self.cluster_bits + 3 - self.order
        self.table_offset = h.refcount_table_offset
        self.table_clusters = h.refcount_table_clusters
        if not self.table_clusters:
            raise CorruptImage(f"{image.name}: image has no refcount table")
        self.table: array = table_from_bytes(pread_full(self.fd, self.table_clusters << self.cluster_bits, self.table_offset))
        self._cache = image._cache
        self._cache_owner = self._cache.new_owner()
        self._dirty_blocks: dict[int, bytearray] = {}  # changed, not yet written: held in the budget
        self._table_dirty = False
        self._pending_frees: list[int] = []  # clusters whose reference was dropped, not yet durable
        self.free_hint = 0
        size = os.fstat(self.fd).st_size
        self.end_cluster = -(-size // self.cluster_size)  # first cluster past the end of the file

    # -- reading and writing counts -------------------------------------------------------

    def _block(self, block_index: int, *, create: bool) -> bytearray | None:
        block = self._dirty_blocks.get(block_index)
        if block is not None:
            return block
        offset = self.table[block_index] & OFFSET_MASK if block_index < len(self.table) else 0
        if not offset:
            if not create:
                return None
            return self._create_block(block_index)
        if offset % self.cluster_size:
            raise CorruptImage(f"{self.image.name}: refcount block {block_index} at unaligned {offset:#x}")
        block = self._cache.get(self._cache_owner, block_index)
        if block is None:
            block = bytearray(pread_full(self.fd, self.cluster_size, offset))
            self._cache.put(self._cache_owner, block_index, block, self.cluster_size)
        return block

    def _changed(self, block_index: int, block: bytearray) -> None:
        """`block` was changed in memory: hold it (out of the LRU) until the flush writes it."""
        if block_index not in self._dirty_blocks:
            self._cache.discard(self._cache_owner, block_index)
            self._dirty_blocks[block_index] = block
            self._cache.hold(self.cluster_size)

    def release(self) -> None:
        """Give back the budget's bytes (the image is done writing, or these counts are
        replaced); changed blocks not yet written are dropped from the account, not written."""
        self._cache.discard_owner(self._cache_owner)
        self._cache.unhold(len(self._dirty_blocks) * self.cluster_size)
        self._dirty_blocks = {}

    def get(self, cluster: int) -> int:
        block = self._block(cluster >> self.block_shift, create=False)
        if block is None:
            return 0
        return self._get_entry(block, cluster & ((1 << self.block_shift) - 1))

    def _get_entry(self, block: bytearray, index: int) -> int:
        bits = self.bits
        if bits >= 8:
            width = bits >> 3
            return int.from_bytes(block[index * width : (index + 1) * width], "big")
        bit = index * bits
        return (block[bit >> 3] >> (bit & 7)) & self.max_count

    def _set_entry(self, block: bytearray, index: int, value: int) -> None:
        bits = self.bits
        if bits >= 8:
            width = bits >> 3
            block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
            return
        bit = index * bits
        shift = bit & 7
        byte = block[bit >> 3] & ~(self.max_count << shift)
        block[bit >> 3] = byte | (value << shift)

    def change(self, cluster: int, delta: int) -> int:
        """Add `delta` to a cluster's count (in memory); return the new count."""
        block_index = cluster >> self.block_shift
        block = self._block(block_index, create=delta > 0)
        if block is None:
            raise CorruptImage(f"{self.image.name}: freeing cluster {cluster} that has no refcount block")
        index = cluster & ((1 << self.block_shift) - 1)
        value = self._get_entry(block, index) + delta
        if value < 0:
            raise CorruptImage(f"{self.image.name}: refcount of cluster {cluster} would drop below zero")
        if value > self.max_count:
            raise CorruptImage(f"{self.image.name}: refcount of cluster {cluster} overflows {self.bits} bits")
        self._set_entry(block, index, value)
        self._changed(block_index, block)
        if value == 0 and cluster < self.free_hint:
            self.free_hint = cluster
        return value

    # -- allocation -----------------------------------------------------------------------

    def allocate(self, count: int) -> int:
        """Find `count` contiguous free clusters, count them as used; return the first index."""
        start = self._find_free(count)
        # Claim the run before counting it: a refcount block created while counting must be
        # placed after the run, not inside it.
        self.end_cluster = max(self.end_cluster, start + count)
        if not self._count_free_run(start, count):
            for cluster in range(start, start + count):
                self.change(cluster, +1)
        return start

    def _whole_byte_run(self, start: int, count: int) -> tuple[int, int, int] | None:
        """(block index, first byte, end byte) when clusters [start, start+count) have counts
        of whole bytes in one refcount block; None otherwise (the slow path handles it)."""
        if self.bits < 8 or count <= 1:
            return None
        block_index = start >> self.block_shift
        if (start + count - 1) >> self.block_shift != block_index:
            return None
        width = self.bits >> 3
        first = (start & ((1 << self.block_shift) - 1)) * width
        return block_index, first, first + count * width

    def _count_free_run(self, start: int, count: int) -> bool:
        """Fast path of `allocate` (1 MiB writes allocate 16 clusters at a time): set the
        counts of a free run in an existing block to 1 with one slice; False if not possible."""
        where = self._whole_byte_run(start, count)
        if where is None:
            return False
        block_index, first, end = where
        block = self._block(block_index, create=False)
        if block is None or any(block[first:end]):
            return False
        width = self.bits >> 3
        block[first:end] = (1).to_bytes(width, "big") * count
        self._changed(block_index, block)
        return True

    def _run_is_free(self, start: int, count: int) -> bool | None:
        """Whether clusters [start, start+count) all have count 0, by one slice; None when
        the run does not lie in one block with whole-byte counts."""
        where = self._whole_byte_run(start, count)
        if where is None:
            return None
        block_index, first, end = where
        block = self._block(block_index, create=False)
        return block is None or not any(block[first:end])

    def _find_free(self, count: int) -> int:
        cluster = self.free_hint
        run_start, run = cluster, 0
        # Below the end of the file: reuse freed clusters (QEMU's free_cluster_index scan).
        while cluster < self.end_cluster:
            if self.get(cluster) == 0:
                if run == 0:
                    run_start = cluster
                run += 1
                if run == count:
                    break
            else:
                run = 0
                if count == 1 or cluster == self.free_hint:
                    self.free_hint = cluster + 1
            cluster += 1
        else:
            # Append: continue the free run at the end of the file, skipping stray counts
            # past the end (qemu-img check does not look there, we must).
            if run == 0:
                run_start = cluster
                if self._run_is_free(cluster, count):
                    run = count
            while run < count:
                if self.get(cluster) == 0:
                    run += 1
                else:
                    run_start, run = cluster + 1, 0
                cluster += 1
        if run_start + count > (1 << (56 - self.cluster_bits)):
            raise NoSpace(f"{self.image.name}: image would exceed the qcow2 address space")
        return run_start

    def free(self, cluster: int, count: int = 1) -> None:
        """Drop references; the counts go down only after the new metadata is durable."""
        self._pending_frees.extend(range(cluster, cluster + count))

    def _create_block(self, block_index: int) -> bytearray:
        """A new, empty refcount block for `block_index`, placed and counted."""
        if block_index >= len(self.table):
            self._grow_table(block_index)
            # Counting the new table's clusters may already have created this very block
            # (the table landed in its range): use it, never replace it with an empty one.
            existing = self._block(block_index, create=False)
            if existing is not None:
                return existing
        block = bytearray(self.cluster_size)
        self._changed(block_index, block)
        # The block needs a cluster of its own, counted in some block: take the first free
        # cluster at or after the end of the file. If the new block covers it, it counts itself.
        place = self._find_free_at_end()
        self.table[block_index] = place << self.cluster_bits
        self._table_dirty = True
        self.end_cluster = max(self.end_cluster, place + 1)
        self.change(place, +1)
        return block

    def _find_free_at_end(self) -> int:
        cluster = self.end_cluster
        while True:
            block_index = cluster >> self.block_shift
            if block_index not in self._dirty_blocks and (
                block_index >= len(self.table) or not self.table[block_index] & OFFSET_MASK
            ):
                return cluster  # no block yet, so its count is zero
            if self.get(cluster) == 0:
                return cluster
            cluster += 1

    def _grow_table(self, needed_index: int) -> None:
        """Move the refcount table to a bigger place at the end of the file.

        The new table and the blocks that count its clusters are written and synced, then the
        header is switched to the new table in one write, then the old table's clusters freed.
        """
        # Write everything already pending first, so the on-disk state is consistent.
        self.image.flush()
        entries_per_cluster = self.cluster_size // 8
        place = self.end_cluster
        new_entries = max(needed_index + 1, len(self.table) * 2, entries_per_cluster)
        while True:
            # The table must also name the blocks that will count its own clusters, which go
            # right after it: one per 2^block_shift clusters, plus one for a boundary.
            new_clusters = -(-new_entries // entries_per_cluster)
            blocks = (new_clusters >> self.block_shift) + 2
            needed = ((place + new_clusters + blocks) >> self.block_shift) + 1
            if needed <= new_entries:
                break
            new_entries = needed
        new_entries = new_clusters * entries_per_cluster
        table = array("Q", self.table)
        table.extend([0] * (new_entries - len(table)))
        old_offset, old_clusters = self.table_offset, self.table_clusters
        self.table = table
        self.end_cluster = place + new_clusters
        # Count the new table's clusters (this may create blocks, which land after it).
        for cluster in range(place, place + new_clusters):
            self.change(cluster, +1)
        self.table_offset, self.table_clusters = place << self.cluster_bits, new_clusters
        self._write_blocks()
        write_all(self.fd, table_to_bytes(self.table), self.table_offset, self.image.name)
        sync(self.fd, self.image.name)
        self.image.switch_refcount_table(self.table_offset, new_clusters)
        self._table_dirty = False
        self.free(old_offset >> self.cluster_bits, old_clusters)

    # -- write-back -----------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return bool(self._dirty_blocks) or self._table_dirty

    @property
    def has_pending_frees(self) -> bool:
        return bool(self._pending_frees)

    def _write_blocks(self) -> None:
        for block_index in sorted(self._dirty_blocks):
            offset = self.table[block_index] & OFFSET_MASK
            write_all(self.fd, self._dirty_blocks[block_index], offset, self.image.name)
        # Written: clean now, back to the LRU (only once all are written: a failed write keeps
        # every block held, to be written by the next flush).
        written, self._dirty_blocks = self._dirty_blocks, {}
        self._cache.unhold(len(written) * self.cluster_size)
        for block_index, block in written.items():
            self._cache.put(self._cache_owner, block_index, block, self.cluster_size)

    def write_increments(self) -> bool:
        """Step 1 of a flush: dirty blocks, then table entries. Returns whether a sync is needed."""
        if not self.dirty:
            return False
        self._write_blocks()
        if self._table_dirty:
            # New blocks must be durable before the table names them.
            sync(self.fd, self.image.name)
            write_all(self.fd, table_to_bytes(self.table), self.table_offset, self.image.name)
            self._table_dirty = False
        return True

    def apply_frees(self) -> None:
        """Last step of a flush: the references are gone on disk, now lower the counts."""
        frees, self._pending_frees = self._pending_frees, []
        for cluster in frees:
            self.change(cluster, -1)
        self._write_blocks()
