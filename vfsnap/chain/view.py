"""Views: a backing chain resolved into one map of where every guest byte lives.

A read must not cost more with a deeper chain, so a view resolves its chain once per *chunk*
(1-16 MiB of guest space) into sorted extents `[start, end) -> (fd, host offset)` and keeps the
chunks it has resolved. A read is then a bisect and one `pread` per extent it touches, whatever
the depth.

A live view (`split_top=True`) keeps two levels: its own chunks, resolved from the top image,
and a view of the chain *below* the top, whose chunks stay valid as long as that chain does.
Only the top changes under writes, reloads and snapshots, so only the top is ever re-resolved:
after a snapshot the old live map becomes the new below-map as it is.

The memory of all resolved maps of a mount is bounded by one `MapBudget`, which shares the
mount's memory budget with the table cache (vfsnap.format.cache): the least recently used views
give back their oldest chunks to stay within it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import weakref
from bisect import bisect_left, bisect_right

import trio

from vfsnap.errors import CorruptImage, NoSpace, ReadOnly
from vfsnap.format import BAD, COMPRESSED, DATA, UNALLOCATED, ZERO, CompressedCluster, Image, Qcow2Image, RawImage
from vfsnap.format.image import pread_full
from vfsnap.format.qcow2 import TableMissing, deferred_loads

log = logging.getLogger(__name__)

# Extent sources other than a file descriptor (fds are >= 0).
ZERO_FD = -1
COMPRESSED_FD = -2
BAD_FD = -3

DEFAULT_MAX_CHUNKS = 1 << 16
# A read of several extents is split over this many of the share's threads at most, each part
# at least PARALLEL_READ_BYTES of data, as QEMU's qcow2 driver reads the host extents of one
# request side by side (qcow2_co_preadv_part: an AioTaskPool of QCOW2_MAX_WORKERS = 8). On a
# network share each extent is a round trip; one after the other, a 1 MiB read of a chain
# spread over its images costs them all in a row.
PARALLEL_READS = 4
PARALLEL_READ_BYTES = 128 * 1024
# What one resolved extent costs in memory, roughly (four list slots and their int objects).
EXTENT_BYTES = 128

# Held while the chunks of a view are replaced, added or dropped, and while the memory budget
# counts them: writes answered on FUSE reader threads patch the chunks of their view there
# (`View.write_now`), while the loop resolves, patches and evicts (vfsnap/share/io.py rule 1).
# One lock for all views, since the budget evicts across views; reentrant, since it evicts
# while a chunk is being added. Reads of chunks take no lock: a chunk is never changed once
# in a view's map, only replaced.
MAP_LOCK = threading.RLock()


class MapBudget:
    """Bounds the resolved maps of every view of a mount, in bytes (counted per extent).

    With `tables` (the mount's `TableCache`), maps and tables share one budget (see
    vfsnap.format.cache). Views give back chunks least recently used view first, its oldest
    chunk first: a view in use keeps its map while idle ones give theirs up.
    """

    def __init__(self, capacity_bytes: int, tables=None):
        self.capacity = max(1024, capacity_bytes // EXTENT_BYTES)
        self.used = 0
        self._views: weakref.WeakSet = weakref.WeakSet()
        self._tables = tables
        self._keep: "View | None" = None
        if tables is not None:
            tables.share_with(self)

    @property
    def used_bytes(self) -> int:
        return self.used * EXTENT_BYTES

    def charge(self, view: "View", extents: int) -> None:
        """Count `extents` more for `view` (under MAP_LOCK), and give back chunks if over budget:
        on the loop only (a FUSE reader thread's write leaves that to the loop's next use, as
        the table cache does for worker threads)."""
        with MAP_LOCK:
            self.used += extents
            self._views.add(view)
            if threading.current_thread() is not threading.main_thread():
                return
            tables = self._tables
            if tables is None:
                if self.used > self.capacity:
                    self._keep = view
                    while self.used > self.capacity and self.evict_one():
                        pass
            elif tables.total_bytes > tables.capacity:
                self._keep = view
                tables._shrink(keep=0)
            self._keep = None

    def release(self, extents: int) -> None:
        with MAP_LOCK:
            self.used -= extents

    def evict_one(self) -> bool:
        """Give back one chunk: the oldest of the least recently used view; the view being
        charged keeps its newest. False when nothing can be given."""
        with MAP_LOCK:
            keep = self._keep
            candidates = [v for v in self._views if v is not keep and v._extents_total()]
            if candidates:
                return min(candidates, key=lambda v: v.last_used)._drop_oldest()
            return keep is not None and keep._drop_oldest(keep_newest=True)


UNBOUNDED = MapBudget(1 << 62)


class Chunk:
    """Resolved extents of one chunk of guest space, as parallel lists (fast to bisect)."""

    __slots__ = ("start", "end", "starts", "ends", "fds", "hosts")

    def __init__(self, start: int, end: int, extents: list[tuple[int, int, int, object]]):
        self.start = start
        self.end = end
        self.starts = [e[0] for e in extents]
        self.ends = [e[1] for e in extents]
        self.fds = [e[2] for e in extents]
        self.hosts = [e[3] for e in extents]

    def copy(self) -> "Chunk":
        chunk = Chunk.__new__(Chunk)
        chunk.start, chunk.end = self.start, self.end
        chunk.starts, chunk.ends, chunk.fds, chunk.hosts = self.starts[:], self.ends[:], self.fds[:], self.hosts[:]
        return chunk

    def patch(self, start: int, end: int, fd: int, host: object) -> int:
        """Guest [start, end) of this chunk now lives at `(fd, host)` (after a write).
        Returns by how many extents the chunk grew (for the memory budget)."""
        start = max(start, self.start)
        end = min(end, self.end)
        if start >= end:
            return 0
        before = len(self.starts)
        starts, ends, fds, hosts = self.starts, self.ends, self.fds, self.hosts
        i = bisect_right(starts, start) - 1
        j = bisect_left(starts, end)
        new_starts, new_ends, new_fds, new_hosts = [], [], [], []
        if starts[i] < start:  # the part of the first extent before the write survives
            new_starts.append(starts[i])
            new_ends.append(start)
            new_fds.append(fds[i])
            new_hosts.append(hosts[i])
        new_starts.append(start)
        new_ends.append(end)
        new_fds.append(fd)
        new_hosts.append(host)
        k = j - 1
        if ends[k] > end:  # and so does the part of the last one after it
            new_starts.append(end)
            new_ends.append(ends[k])
            new_fds.append(fds[k])
            new_hosts.append(hosts[k] + (end - starts[k]) if fds[k] >= 0 else hosts[k])
        starts[i:j] = new_starts
        ends[i:j] = new_ends
        fds[i:j] = new_fds
        hosts[i:j] = new_hosts
        self._merge_around(i + (1 if new_starts[0] < start else 0))
        return len(self.starts) - before

    def _merge_around(self, i: int) -> None:
        """Merge extent i with its neighbours when they continue each other (fewer extents)."""
        for left in (i, i - 1):
            right = left + 1
            if left < 0 or right >= len(self.starts):
                continue
            fd = self.fds[left]
            if fd != self.fds[right] or self.ends[left] != self.starts[right]:
                continue
            if fd == ZERO_FD or (fd >= 0 and self.hosts[left] + (self.ends[left] - self.starts[left]) == self.hosts[right]):
                self.ends[left] = self.ends[right]
                del self.starts[right], self.ends[right], self.fds[right], self.hosts[right]


def chunk_bits_for(images: list[Image]) -> int:
    """Chunks of about 256 clusters of the finest qcow2 image, 1 to 16 MiB, whole clusters.

    Raw images map as one extent whatever their size, so they do not make chunks smaller.
    """
    grains = [img.granularity for img in images if not isinstance(img, RawImage)] or [1 << 24]
    bits = max(20, min(24, min(grains).bit_length() - 1 + 8))
    return max(bits, max(grains).bit_length() - 1)


def _extent(start: int, end: int, kind: int, where: object, fd: int) -> tuple[int, int, int, object]:
    if kind == DATA:
        return (start, end, fd, where)
    if kind == ZERO:
        return (start, end, ZERO_FD, 0)
    if kind == COMPRESSED:
        return (start, end, COMPRESSED_FD, where)
    if kind == BAD:
        return (start, end, BAD_FD, where)
    raise CorruptImage(f"unknown extent kind {kind}")  # pragma: no cover - a format bug


class View:
    """The bytes a chain of images shows, bottom image first, as one raw disk."""

    clock = 0  # counts uses of views, for the least recently used view (MapBudget)

    def __init__(self, images: list[Image], *, name: str, budget: MapBudget | None = None,
                 split_top: bool = False, max_chunks: int = DEFAULT_MAX_CHUNKS, chunk_bits: int | None = None,
                 io=None):
        if not images:
            raise ValueError("a view needs at least one image")
        self.name = name
        # The share's I/O (vfsnap.share.io.ShareIO) for `read_async` and `write_async`.
        self.io = io
        # preadv(RWF_NOWAIT) answers from the page cache here; False once the filesystem said
        # EOPNOTSUPP (FUSE filesystems such as GlusterFS's client do).
        self.nowait = True
        self.budget = budget or UNBOUNDED
        self.max_chunks = max_chunks
        self.split_top = split_top
        self._chunks: dict[int, Chunk] = {}
        self._extents = 0
        # The chunk the loop last began to resolve, and whether a patch of its range came
        # since (under MAP_LOCK; see `_chunk`: only read at the end of that resolution).
        self._resolving: int | None = None
        self._resolving_patched = False
        self.last_used = 0  # View.clock when this view last resolved or read (MapBudget)
        # Called with (offset, length) after every write (a merge of the top image watches).
        self.observers: list = []
        self._setup(list(images), chunk_bits)

    def _setup(self, images: list[Image], chunk_bits: int | None = None) -> None:
        self.images = images
        self._size = images[-1].size
        self._chunk_bits = chunk_bits or chunk_bits_for(images)
        self._below = None
        if self.split_top and len(images) > 1:
            self._below = View(images[:-1], name=f"{self.name}/below", budget=self.budget,
                               max_chunks=self.max_chunks, chunk_bits=self._chunk_bits)

    @property
    def top(self) -> Image:
        return self.images[-1]

    @property
    def size(self) -> int:
        return self._size

    # -- cache management -----------------------------------------------------------------

    def invalidate(self) -> None:
        """Forget what this view resolved itself (the top image's map or size changed)."""
        with MAP_LOCK:
            self.budget.release(self._extents)
            self._extents = 0
            self._chunks = {}
        self._size = self.images[-1].size

    def invalidate_all(self) -> None:
        """Forget everything resolved, also below the top (an image below it changed its map)."""
        self.invalidate()
        if self._below is not None:
            self._below.invalidate_all()

    def set_images(self, images: list[Image]) -> None:
        """The chain changed (snapshot taken, merge done, image reopened): serve the new one.

        Keeps every resolved chunk that is still right: the below-map when only the top
        object changed, and the whole live map as the new below-map after a snapshot.
        """
        images = list(images)
        old = self.images
        same_below = len(images) == len(old) and all(a is b for a, b in zip(old[:-1], images[:-1]))
        snapshot = len(images) == len(old) + 1 and all(a is b for a, b in zip(old, images))
        if self.split_top and same_below:
            self.images = images
            self.invalidate()
        elif self.split_top and snapshot and chunk_bits_for(images) == self._chunk_bits:
            below = View(old, name=f"{self.name}/below", budget=self.budget,
                         max_chunks=self.max_chunks, chunk_bits=self._chunk_bits)
            below._chunks, below._extents = self._chunks, self._extents  # resolved flat: still exact
            self._chunks, self._extents = {}, 0
            if self._below is not None:
                self._below.invalidate()
            self.images, self._below, self._size = images, below, images[-1].size
        else:
            self.invalidate()
            if self._below is not None:
                self._below.invalidate()
            self._setup(images)

    def _extents_total(self) -> int:
        return self._extents + (self._below._extents_total() if self._below is not None else 0)

    def _drop_oldest(self, *, keep_newest: bool = False) -> bool:
        """Give back the oldest resolved chunk (MapBudget); False when there is none to give."""
        with MAP_LOCK:
            if len(self._chunks) <= (1 if keep_newest else 0):
                return bool(self._below is not None and self._below._drop_oldest())
            index = next(iter(self._chunks))
            extents = len(self._chunks.pop(index).starts)
            self._extents -= extents
            self.budget.release(extents)
            return True

    # -- resolution -----------------------------------------------------------------------

    def _chunk(self, index: int) -> Chunk:
        chunk = self._chunks.get(index)
        View.clock += 1
        self.last_used = View.clock
        while chunk is None:
            # A write on a FUSE reader thread may change the top's tables while they are read
            # here, and patch this view before the chunk is in it: a chunk resolved across
            # such a patch of its own range (`_patch` marks it) may be stale, and is resolved
            # again. (Patches elsewhere do not count: under a stream of writes, a resolution
            # would otherwise hardly ever finish.)
            with MAP_LOCK:
                self._resolving, self._resolving_patched = index, False
            resolved = self._resolve(index)
            with MAP_LOCK:
                if self._resolving_patched:
                    continue
                if len(self._chunks) >= self.max_chunks:
                    self._drop_oldest()
                self._chunks[index] = chunk = resolved
                self._extents += len(chunk.starts)
                self.budget.charge(self, len(chunk.starts))
        return chunk

    def _resolve(self, index: int) -> Chunk:
        start = index << self._chunk_bits
        end = min(self._size, start + (1 << self._chunk_bits))
        if self._below is None:
            return Chunk(start, end, resolve_extents(self.images, start, end))
        top = self.images[-1]
        extents: list[tuple[int, int, int, object]] = []
        for ms, me, kind, where in top.map_range(start, end):
            if kind == UNALLOCATED:
                extents += self._below.extents(ms, me)
            else:
                extents.append(_extent(ms, me, kind, where, top.fd))
        return Chunk(start, end, _merge_extents(extents))

    def extents(self, start: int, end: int, *, resolve: bool = True):
        """Resolved extents covering guest [start, end); zeros past this view's end. Without
        `resolve`, None when a chunk is not resolved already (and nothing changes)."""
        out: list[tuple[int, int, int, object]] = []
        size = self._size
        stop = min(end, size)
        pos = start
        while pos < stop:
            if resolve:
                chunk = self._chunk(pos >> self._chunk_bits)
            else:
                chunk = self._chunks.get(pos >> self._chunk_bits)
                if chunk is None:
                    return None
            i = bisect_right(chunk.starts, pos) - 1
            while pos < stop and i < len(chunk.starts):
                piece_end = min(stop, chunk.ends[i])
                fd, host = chunk.fds[i], chunk.hosts[i]
                out.append((pos, piece_end, fd, host + (pos - chunk.starts[i]) if fd >= 0 else host))
                pos = piece_end
                i += 1
        if end > max(start, size):
            out.append((max(start, size), end, ZERO_FD, 0))
        return out

    # -- reading --------------------------------------------------------------------------

    def read(self, offset: int, length: int, *, transient: bool = False):
        """Bytes [offset, offset+length) of the view, short only at the end of the disk.

        With `transient`, a read spanning several extents is assembled in a buffer shared by all
        views and returned as a view of it, valid only until the next transient read: for the
        FUSE read handler, which hands it to the kernel before anything else runs.
        """
        size = self._size
        if offset >= size or length <= 0:
            return b""
        end = offset + length
        if end > size:
            end = size
        chunk = self._chunks.get(offset >> self._chunk_bits)
        if chunk is None:
            chunk = self._chunk(offset >> self._chunk_bits)
        else:
            View.clock += 1
            self.last_used = View.clock
        if end <= chunk.end:
            i = bisect_right(chunk.starts, offset) - 1
            if end <= chunk.ends[i]:
                # Fast path: the whole read lies in one extent.
                fd = chunk.fds[i]
                if fd >= 0:
                    return pread_full(fd, end - offset, chunk.hosts[i] + offset - chunk.starts[i])
                if fd == ZERO_FD:
                    return bytes(end - offset)
        if transient:
            return self._read_extents(offset, end, _shared_buffer(end - offset))
        return self._read_extents(offset, end, memoryview(bytearray(end - offset)))

    def _read_extents(self, offset: int, end: int, view: memoryview):
        """A read that spans extents, assembled in one buffer (no join of pieces)."""
        return _fill(view, offset, self.extents(offset, end))

    # -- reading without waiting on the loop (vfsnap/share/io.py) --------------------------

    def read_cached(self, offset: int, length: int):
        """`read(transient=True)` if it can be answered without waiting for the share: from the
        resolved maps and the page cache (preadv with RWF_NOWAIT). None when it cannot: a
        table not in memory, data not in the page cache, a compressed cluster, a share that
        refuses RWF_NOWAIT (GlusterFS: then the page cache is never asked)."""
        if not self.nowait:
            return None
        size = self._size
        if offset >= size or length <= 0:
            return b""
        end = min(offset + length, size)
        one = self._one_extent(offset, end)
        if one is not None:  # the common case
            fd, host = one
            if fd >= 0:
                target = _shared_buffer(end - offset)
                if self._preadv_nowait(fd, target, host):
                    return target
                return None
            if fd == ZERO_FD:
                return bytes(end - offset)
        try:
            with deferred_loads():
                extents = self.extents(offset, end)
        except TableMissing:
            return None
        if len(extents) == 1 and extents[0][2] == ZERO_FD:
            return bytes(end - offset)
        target = _shared_buffer(end - offset)
        for start, stop, fd, host in extents:
            piece = target[start - offset : stop - offset]
            if fd >= 0:
                if not self._preadv_nowait(fd, piece, host):
                    return None
            elif fd == ZERO_FD:
                piece[:] = bytes(stop - start)
            elif fd == COMPRESSED_FD:
                return None
            else:
                raise CorruptImage(str(host))
        return target

    def read_now(self, offset: int, length: int):
        """`read` on a FUSE reader thread (vfsnap/fs/relay.py), or None when the loop must
        answer: a chunk not resolved yet, a compressed cluster. It changes nothing in the view
        and sees each chunk whole: the loop replaces a chunk it patches (`_patch`) and replaces
        or drops chunks only while no request is in flight (RequestGate rule 6)."""
        size = self._size
        if offset >= size or length <= 0:
            return b""
        end = min(offset + length, size)
        one = self._one_extent(offset, end)
        if one is not None:  # the common case
            fd, host = one
            if fd >= 0:
                return pread_full(fd, end - offset, host)
            return bytes(end - offset) if fd == ZERO_FD else None
        extents = self.extents(offset, end, resolve=False)
        if extents is None or any(fd < 0 and fd != ZERO_FD for _, _, fd, _ in extents):
            return None
        return _fill(memoryview(bytearray(end - offset)), offset, extents)

    def _one_extent(self, offset: int, end: int) -> tuple[int, object] | None:
        """(fd, host offset) of guest [offset, end) when it lies in one resolved extent (of a
        chunk resolved already), else None."""
        chunk = self._chunks.get(offset >> self._chunk_bits)
        if chunk is None or end > chunk.end:
            return None
        i = bisect_right(chunk.starts, offset) - 1
        if end > chunk.ends[i]:
            return None
        View.clock += 1
        self.last_used = View.clock
        fd = chunk.fds[i]
        return fd, chunk.hosts[i] + offset - chunk.starts[i] if fd >= 0 else chunk.hosts[i]

    def _preadv_nowait(self, fd: int, target: memoryview, offset: int) -> bool:
        done = 0
        while done < len(target):
            try:
                got = os.preadv(fd, [target[done:]], offset + done, os.RWF_NOWAIT)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                    self.nowait = False
                    return False
                raise
            if got <= 0:  # past the end of the file: zeros
                target[done:] = bytes(len(target) - done)
                return True
            done += got
        return True

    async def resolve_async(self, offset: int, end: int) -> list[tuple[int, int, int, object]]:
        """`extents`, reading the tables it needs on the share's threads."""
        loaded: dict = {}
        while True:
            try:
                with deferred_loads(loaded):
                    return self.extents(offset, end)
            except TableMissing as miss:
                data = await self.io.run("table load", miss.load)
                miss.insert(data, loaded)

    async def read_async(self, offset: int, length: int):
        """`read`, with every wait for the share on one of its threads: one hand-off per read,
        whatever the number of extents it spans."""
        size = self._size
        if offset >= size or length <= 0:
            return b""
        end = min(offset + length, size)
        one = self._one_extent(offset, end)
        if one is not None:  # the common case
            fd, host = one
            if fd >= 0:
                return await self.io.run("read", pread_full, fd, end - offset, host)
            if fd == ZERO_FD:
                return bytes(end - offset)
        extents = await self.resolve_async(offset, end)
        if len(extents) == 1:
            fd, host = extents[0][2], extents[0][3]
            if fd >= 0:
                return await self.io.run("read", pread_full, fd, end - offset, host)
            if fd == ZERO_FD:
                return bytes(end - offset)
        return await self._read_extents_async(offset, end, extents)

    async def _read_extents_async(self, offset: int, end: int, extents: list[tuple[int, int, int, object]]):
        """Read `extents` into one buffer, on up to PARALLEL_READS of the share's threads at
        once, each filling its own slice (`_fill` touches no view). A failed part fails the
        read, with its own error, once every part has returned."""
        view = memoryview(bytearray(end - offset))
        parts = _split_extents(extents, PARALLEL_READS, PARALLEL_READ_BYTES)
        if len(parts) == 1:
            return await self.io.run("read", _fill, view, offset, extents)
        failures: list[Exception] = []

        async def read_part(part):
            try:
                await self.io.run("read", _fill, view, offset, part)
            except Exception as exc:  # noqa: BLE001 - raised below, unwrapped
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for part in parts:
                nursery.start_soon(read_part, part)
        if failures:
            raise failures[0]
        return view

    # -- writing (live views only: the top image must be writable) ------------------------

    def write(self, offset: int, data) -> int:
        """Write at `offset` into the top image; returns the bytes written (short at the end)."""
        data = self._clip(offset, data)
        length = len(data)
        top = self.top
        if isinstance(top, RawImage):
            top.write(offset, data)
        else:
            host = top.in_place_offset(offset, length)
            if host is not None:
                # Fast path: a cluster this image owns; the map already points there.
                top.write_in_place(host, data)
            else:
                self._write_qcow2(top, offset, memoryview(data))
        if self.observers:
            self._tell_observers(offset, length)
        return length

    async def write_async(self, offset: int, data) -> int:
        """`write`, with the share's system calls on one of its threads. The caller holds the
        volume's write lock, which hands the top image's write state to that thread; this view's
        chunks change only here on the loop, after the data is on the share (io.py rule 5)."""
        data = self._clip(offset, data)
        length = len(data)
        self.apply_patches(await self.io.run("write", self.write_on_worker, offset, data))
        if self.observers:
            self._tell_observers(offset, length)
        return length

    def _clip(self, offset: int, data):
        """`data` as far as it fits on the disk from `offset` (a write is short at the end); a
        write past the end, or to a read-only view, fails."""
        size = self._size
        if offset >= size:
            raise NoSpace(f"{self.name}: write at {offset} is past the end of the disk ({size})")
        if not self.top.writable:
            raise ReadOnly(f"{self.name}: read-only view")
        return data if len(data) <= size - offset else memoryview(data)[: size - offset]

    def write_now(self, offset: int, data, trio_token) -> int:
        """`write` on a FUSE reader thread (vfsnap/fs/relay.py), which holds the volume's write
        lock (io.py rule 4): the writer's part as on a worker, then the new extents patched into
        the chunks here, after the data is on the share (rule 5), ordered with the loop's own
        resolution of the same chunk by MAP_LOCK (`_chunk`). A merge watching the view hears
        of the write on the loop, before the write is answered."""
        data = self._clip(offset, data)
        length = len(data)
        self.apply_patches(self.write_on_worker(offset, data))
        if self.observers:
            trio.from_thread.run_sync(self._tell_observers, offset, length, trio_token=trio_token)
        return length

    def _tell_observers(self, offset: int, length: int) -> None:
        for observer in self.observers:
            observer(offset, length)

    def write_on_worker(self, offset: int, data) -> list[tuple[int, int, int, int]]:
        """The body of `write` for a worker thread: touches the top image, never the chunks;
        returns the extents the loop patches in. Copy-on-write reads resolve the chain afresh."""
        top = self.top
        if isinstance(top, RawImage):
            top.write(offset, data)
            return []
        host = top.in_place_offset(offset, len(data))
        if host is not None:
            top.write_in_place(host, data)
            return []
        patches: list[tuple[int, int, int, int]] = []
        self._write_qcow2(top, offset, memoryview(data), patches)
        return patches

    def read_resolved(self, offset: int, length: int) -> memoryview:
        """Bytes of the view resolved from the images' tables, not from this view's chunks
        (for a worker thread; short only at the end of the disk)."""
        end = min(offset + length, self._size)
        buffer = memoryview(bytearray(max(0, end - offset)))
        if end > offset:
            _fill(buffer, offset, resolve_extents(self.images, offset, end))
        return buffer

    def _write_qcow2(self, top: Qcow2Image, offset: int, data: memoryview, patches: list | None = None) -> None:
        cb = top.cluster_bits
        cs = top.cluster_size
        end = offset + len(data)
        cluster = offset >> cb
        last = (end - 1) >> cb
        run_start = None  # first cluster of a run that needs new clusters
        # A run of clusters overwritten in place whose host clusters follow each other is one
        # write (as QEMU's qcow2 driver makes it): a 1 MiB overwrite is one round trip to the
        # share, not sixteen. (host, guest) offsets where the open run starts; it reaches `lo`.
        in_place = None

        def overwrite(stop: int) -> None:
            host, start = in_place
            top.write_in_place(host, data[start - offset : stop - offset])

        while cluster <= last:
            c_start = cluster << cb
            lo, hi = max(offset, c_start), min(end, c_start + cs)
            host = top.in_place_offset(lo, hi - lo)
            if in_place is not None and (host is None or in_place[0] + (lo - in_place[1]) != host):
                overwrite(lo)
                in_place = None
            if host is not None:
                if run_start is not None:
                    self._allocate_run(top, run_start, cluster, offset, data, patches)
                    run_start = None
                if in_place is None:
                    in_place = (host, lo)
            elif run_start is None:
                run_start = cluster
            cluster += 1
        if in_place is not None:
            overwrite(end)
        if run_start is not None:
            self._allocate_run(top, run_start, last + 1, offset, data, patches)

    def _allocate_run(self, top: Qcow2Image, first: int, stop: int, offset: int, data: memoryview,
                      patches: list | None = None) -> None:
        """Write clusters [first, stop) to new host clusters, completing partial ones from what
        the view shows now (copy-on-write from the resolved chain, QCOW2-NOTES checklist 18).
        With `patches` (on a worker thread) the new extents are appended there, not patched."""
        cb = top.cluster_bits
        run_start, run_end = first << cb, stop << cb
        end = offset + len(data)
        if offset <= run_start and end >= run_end:
            # Whole clusters: nothing to copy from below, no buffer to assemble.
            host = top.write_clusters(first, data[run_start - offset : run_end - offset])
            if patches is not None:
                patches.append((run_start, run_end, top.fd, host))
            else:
                self._patch(run_start, run_end, top.fd, host)
            return
        read = self.read if patches is None else self.read_resolved
        buffer = bytearray(run_end - run_start)
        if offset > run_start and end < run_end and end - offset < top.cluster_size:
            # A write inside one cluster: both ends in one read, as QEMU's copy-on-write does
            # (on a network share each read is a round trip; the few bytes read twice cost less).
            whole = read(run_start, run_end - run_start)
            buffer[: len(whole)] = whole
        else:
            if offset > run_start:
                head = read(run_start, offset - run_start)
                buffer[: len(head)] = head
            if end < run_end:
                tail = read(end, run_end - end)
                buffer[end - run_start : end - run_start + len(tail)] = tail
        lo, hi = max(offset, run_start), min(end, run_end)
        buffer[lo - run_start : hi - run_start] = data[lo - offset : hi - offset]
        host = top.write_clusters(first, buffer)
        if patches is not None:
            patches.append((run_start, run_end, top.fd, host))
        else:
            self._patch(run_start, run_end, top.fd, host)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros (discard, fallocate punch/zero range)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return
        if not self.top.writable:
            raise ReadOnly(f"{self.name}: read-only view")
        for observer in self.observers:
            observer(offset, end - offset)
        self._write_zeroes(offset, end)

    def write_zeroes_on_worker(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """`write_zeroes` for a worker thread, as `write_on_worker`: touches the top image, never
        the chunks, and returns the extents the loop patches in (`apply_patches`)."""
        patches: list[tuple[int, int, int, int]] = []
        end = min(offset + length, self._size)
        if offset < end:
            self._write_zeroes(offset, end, patches)
        return patches

    def _write_zeroes(self, offset: int, end: int, patches: list | None = None) -> None:
        top = self.top
        if isinstance(top, RawImage):
            top.write_zeroes(offset, end - offset)
            return

        def write_zeros(start: int, stop: int) -> None:
            if patches is None:
                self.write(start, bytes(stop - start))
            else:
                patches.extend(self.write_on_worker(start, bytes(stop - start)))

        cb = top.cluster_bits
        first_full = -(-offset >> cb)
        stop_full = end >> cb
        if top.header.version < 3 or first_full >= stop_full:
            # No zero flag (v2) or no whole cluster: write zeros.
            write_zeros(offset, end)
            return
        if offset < first_full << cb:
            write_zeros(offset, first_full << cb)
        top.zero_clusters(first_full, stop_full - first_full)
        if patches is None:
            self._patch(first_full << cb, stop_full << cb, ZERO_FD, 0)
        else:
            patches.append((first_full << cb, stop_full << cb, ZERO_FD, 0))
        if end > stop_full << cb:
            write_zeros(stop_full << cb, end)

    def apply_patches(self, patches: list[tuple[int, int, int, int]]) -> None:
        """Patch into the chunks what a worker wrote (`write_on_worker`): on the loop, or on the
        FUSE reader thread that wrote it (`write_now`)."""
        for start, end, fd, host in patches:
            self._patch(start, end, fd, host)

    def _patch(self, start: int, end: int, fd: int, host: int) -> None:
        bits = self._chunk_bits
        pos = start
        with MAP_LOCK:
            while pos < end:
                index = pos >> bits
                piece_end = min(end, (index + 1) << bits)
                chunk = self._chunks.get(index)
                if chunk is None:
                    if index == self._resolving:
                        self._resolving_patched = True
                else:
                    # Patched as a copy that replaces it: a FUSE reader thread may be reading
                    # the chunk right now (`read_now`), and must see it before or after, never
                    # between.
                    chunk = chunk.copy()
                    grown = chunk.patch(pos, piece_end, fd, host + (pos - start) if fd >= 0 else host)
                    self._chunks[index] = chunk
                    self._extents += grown
                    self.budget.charge(self, grown)
                pos = piece_end

    def flush(self) -> None:
        """Make every write durable (the top image is the only one written)."""
        self.top.flush()

    @property
    def dirty(self) -> bool:
        return bool(getattr(self.top, "dirty", False))

    def resize(self, new_size: int, *, thick: bool = False) -> None:
        """Grow the disk. The new area reads as zeros even where a backing file is longer
        than the old size (as QEMU's truncate does: it zero-writes that part)."""
        old_size = self.size
        self._resize_top(new_size, thick)
        self.invalidate()
        stale = self._stale_after_growth(old_size)
        if stale is not None:
            self.write_zeroes(*stale)

    async def resize_async(self, new_size: int, *, thick: bool = False) -> None:
        """`resize`, its calls on the share as data calls (on a thread on a network share:
        growing a thick raw file allocates all of it). The caller holds the volume's requests
        back and its write lock (vfsnap/share/io.py rules 4, 6)."""
        old_size = self.size
        await self.io.write("resize", self._resize_top, new_size, thick)
        self.invalidate()
        stale = self._stale_after_growth(old_size)
        if stale is not None:
            self.apply_patches(await self.io.write("resize", self.write_zeroes_on_worker, *stale))
            for observer in self.observers:
                observer(*stale)

    def _resize_top(self, new_size: int, thick: bool) -> None:
        top = self.top
        if isinstance(top, RawImage):
            top.resize(new_size, thick=thick)
        else:
            top.resize(new_size)

    def _stale_after_growth(self, old_size: int) -> tuple[int, int] | None:
        """(offset, length) of the grown area a longer backing file would show, to be zeroed."""
        longest_below = max((image.size for image in self.images[:-1]), default=0)
        if longest_below > old_size and self.size > old_size:
            return old_size, min(self.size, longest_below) - old_size
        return None


def resolve_extents(images: list[Image], start: int, end: int) -> list[tuple[int, int, int, object]]:
    """Resolve [start, end) through `images` (bottom first) into `(start, end, fd, host)` extents.

    Each image answers only for the ranges every image above it left unallocated. An image
    smaller than the one above reads as zeros past its own end; it does not fall through.
    """
    pending = [(start, end)]
    extents: list[tuple[int, int, int, object]] = []
    for image in reversed(images):
        if not pending:
            break
        below: list[tuple[int, int]] = []
        image_size = image.size
        for i, (s, e) in enumerate(pending):
            if e > image_size:
                extents.append((max(s, image_size), e, ZERO_FD, 0))
                e = image_size
                if s >= e:
                    continue
            try:
                mapped = image.map_range(s, e)
            except TableMissing as miss:  # on the loop: name every table this image still needs
                for rest_s, rest_e in pending[i + 1:]:
                    miss.add_range(rest_s, min(rest_e, image_size))
                raise
            for ms, me, kind, where in mapped:
                if kind == UNALLOCATED:
                    below.append((ms, me))
                else:
                    extents.append(_extent(ms, me, kind, where, image.fd))
        pending = below
    for s, e in pending:
        extents.append((s, e, ZERO_FD, 0))
    return _merge_extents(extents)


def _merge_extents(extents: list[tuple[int, int, int, object]]) -> list[tuple[int, int, int, object]]:
    """Sort and merge extents that continue each other (same file, contiguous, or both zero)."""
    extents.sort(key=lambda ext: ext[0])
    merged: list[tuple[int, int, int, object]] = []
    for ext in extents:
        if merged:
            p_start, p_end, p_fd, p_host = merged[-1]
            s, e, fd, host = ext
            if p_end == s and p_fd == fd and (fd == ZERO_FD or (fd >= 0 and p_host + (p_end - p_start) == host)):
                merged[-1] = (p_start, e, fd, p_host)
                continue
        merged.append(ext)
    return merged


def _split_extents(extents: list[tuple[int, int, int, object]], most: int,
                   least: int) -> list[list[tuple[int, int, int, object]]]:
    """`extents` in consecutive parts of about equal data to read (zeros cost no call): at most
    `most` parts, each but the last with at least `least` bytes of data; one part when the data
    is less than twice `least`."""
    data = sum(stop - start for start, stop, fd, _ in extents if fd >= 0)
    count = min(most, data // least)
    if count <= 1:
        return [extents]
    each = data / count
    parts: list[list] = []
    part: list = []
    filled = 0
    for extent in extents:
        part.append(extent)
        if extent[2] >= 0:
            filled += extent[1] - extent[0]
        if filled >= each and len(parts) < count - 1:
            parts.append(part)
            part, filled = [], 0
    if part:
        parts.append(part)
    return parts


def _fill(view: memoryview, offset: int, extents: list[tuple[int, int, int, object]]) -> memoryview:
    """Read resolved `extents` (guest offsets from `offset` on) into `view` (also on a share's
    worker thread: it touches no view, only descriptors and compressed clusters)."""
    for start, stop, fd, host in extents:
        target = view[start - offset : stop - offset]
        if fd >= 0:
            _preadv_full(fd, target, host)
        elif fd == ZERO_FD:
            target[:] = bytes(stop - start)
        elif fd == COMPRESSED_FD:
            cluster: CompressedCluster = host
            data = cluster.image.read_compressed(cluster)
            base = cluster.guest_cluster * len(data)
            target[:] = data[start - base : stop - base]
        else:
            # A fresh exception each time: re-raising one object would grow its traceback.
            raise CorruptImage(str(host))
    return view


def _preadv_full(fd: int, target: memoryview, offset: int) -> None:
    """Fill `target` from `fd` at `offset`; what lies past the end of the file reads as zeros."""
    done = 0
    while done < len(target):
        got = os.preadv(fd, [target[done:]], offset + done)
        if got <= 0:
            target[done:] = bytes(len(target) - done)
            return
        done += got


_shared = bytearray(0)


def _shared_buffer(size: int) -> memoryview:
    global _shared
    if len(_shared) < size:
        _shared = bytearray(max(size, 1 << 20))
    return memoryview(_shared)[:size]
