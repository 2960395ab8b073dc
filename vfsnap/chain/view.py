"""Views: a backing chain resolved into one map of where every guest byte lives.

A read must not cost more with a deeper chain, so a view resolves its chain once per *chunk*
(a few MiB of guest space) into sorted extents `[start, end) -> (fd, host offset)` and keeps the
chunks it has resolved. A read is then a bisect and one `pread` per extent it touches, whatever
the depth. Chunks are dropped when the chain changes (`invalidate`).
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right

from vfsnap.errors import CorruptImage, NoSpace, ReadOnly
from vfsnap.format import BAD, COMPRESSED, DATA, UNALLOCATED, ZERO, CompressedCluster, Image, Qcow2Image, RawImage
from vfsnap.format.image import pread_full

log = logging.getLogger(__name__)

# Extent sources other than a file descriptor (fds are >= 0).
ZERO_FD = -1
COMPRESSED_FD = -2
BAD_FD = -3

DEFAULT_MAX_CHUNKS = 1024


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

    def patch(self, start: int, end: int, fd: int, host: object) -> None:
        """Guest [start, end) of this chunk now lives at `(fd, host)` (after a write)."""
        start = max(start, self.start)
        end = min(end, self.end)
        if start >= end:
            return
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
    """Chunks of about 256 clusters of the finest image, between 1 and 16 MiB, whole clusters."""
    finest = min(img.granularity for img in images)
    coarsest = max(img.granularity for img in images)
    bits = max(20, min(24, finest.bit_length() - 1 + 8))
    return max(bits, coarsest.bit_length() - 1)


class View:
    """The bytes a chain of images shows, bottom image first, as one read-only raw disk."""

    def __init__(self, images: list[Image], *, name: str, max_chunks: int = DEFAULT_MAX_CHUNKS):
        if not images:
            raise ValueError("a view needs at least one image")
        self.name = name
        self.images = list(images)
        self.max_chunks = max_chunks
        self._chunk_bits = chunk_bits_for(self.images)
        self._chunks: dict[int, Chunk] = {}
        # Called with (offset, length) after every write (a merge of the top image watches).
        self.observers: list = []

    @property
    def top(self) -> Image:
        return self.images[-1]

    @property
    def size(self) -> int:
        return self.images[-1].size

    def invalidate(self) -> None:
        """Forget every resolved chunk (the chain or an image's map changed)."""
        self._chunks.clear()
        self._chunk_bits = chunk_bits_for(self.images)

    def set_images(self, images: list[Image]) -> None:
        """The chain changed (snapshot taken or merged): serve the new one from now on."""
        self.images = list(images)
        self.invalidate()

    def allocated_bytes(self) -> int:
        return sum(img.allocated_bytes() for img in self.images)

    # -- resolution -----------------------------------------------------------------------

    def _chunk(self, index: int) -> Chunk:
        chunk = self._chunks.get(index)
        if chunk is None:
            chunk = self._resolve(index)
            if len(self._chunks) >= self.max_chunks:
                # Drop the oldest resolved chunk; dict order is insertion order.
                del self._chunks[next(iter(self._chunks))]
            self._chunks[index] = chunk
        return chunk

    def _resolve(self, index: int) -> Chunk:
        start = index << self._chunk_bits
        end = min(self.size, start + (1 << self._chunk_bits))
        extents = resolve_extents(self.images, start, end)
        return Chunk(start, end, extents)

    # -- reading --------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the view, short only at the end of the disk."""
        size = self.size
        if offset >= size or length <= 0:
            return b""
        end = offset + length
        if end > size:
            end = size
        chunk = self._chunks.get(offset >> self._chunk_bits)
        if chunk is None:
            chunk = self._chunk(offset >> self._chunk_bits)
        if end <= chunk.end:
            i = bisect_right(chunk.starts, offset) - 1
            if end <= chunk.ends[i]:
                # Fast path: the whole read lies in one extent.
                fd = chunk.fds[i]
                if fd >= 0:
                    return pread_full(fd, end - offset, chunk.hosts[i] + offset - chunk.starts[i])
                if fd == ZERO_FD:
                    return bytes(end - offset)
        return self._read_extents(offset, end)

    def _read_extents(self, offset: int, end: int) -> bytes:
        parts = []
        pos = offset
        while pos < end:
            chunk = self._chunk(pos >> self._chunk_bits)
            i = bisect_right(chunk.starts, pos) - 1
            while pos < end and i < len(chunk.starts):
                ext_end = min(end, chunk.ends[i])
                parts.append(self._read_extent(chunk, i, pos, ext_end))
                pos = ext_end
                i += 1
        return b"".join(parts)

    def _read_extent(self, chunk: Chunk, i: int, pos: int, end: int) -> bytes:
        fd = chunk.fds[i]
        if fd >= 0:
            return pread_full(fd, end - pos, chunk.hosts[i] + pos - chunk.starts[i])
        if fd == ZERO_FD:
            return bytes(end - pos)
        if fd == COMPRESSED_FD:
            cluster: CompressedCluster = chunk.hosts[i]
            data = cluster.image.read_compressed(cluster)
            base = cluster.guest_cluster * len(data)
            return data[pos - base : end - base]
        # A fresh exception each time: re-raising one object would grow its traceback forever.
        raise CorruptImage(str(chunk.hosts[i]))


    # -- writing (live views only: the top image must be writable) ------------------------

    def write(self, offset: int, data) -> int:
        """Write at `offset` into the top image; returns the bytes written (short at the end)."""
        size = self.size
        if offset >= size:
            raise NoSpace(f"{self.name}: write at {offset} is past the end of the disk ({size})")
        length = min(len(data), size - offset)
        if length < len(data):
            data = memoryview(data)[:length]
        top = self.top
        if not top.writable:
            raise ReadOnly(f"{self.name}: read-only view")
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
            for observer in self.observers:
                observer(offset, length)
        return length

    def _write_qcow2(self, top: Qcow2Image, offset: int, data: memoryview) -> None:
        cb = top.cluster_bits
        cs = top.cluster_size
        end = offset + len(data)
        cluster = offset >> cb
        last = (end - 1) >> cb
        run_start = None  # first cluster of a run that needs new clusters
        while cluster <= last:
            c_start = cluster << cb
            lo, hi = max(offset, c_start), min(end, c_start + cs)
            host = top.in_place_offset(lo, hi - lo)
            if host is not None:
                if run_start is not None:
                    self._allocate_run(top, run_start, cluster, offset, data)
                    run_start = None
                top.write_in_place(host, data[lo - offset : hi - offset])
            elif run_start is None:
                run_start = cluster
            cluster += 1
        if run_start is not None:
            self._allocate_run(top, run_start, last + 1, offset, data)

    def _allocate_run(self, top: Qcow2Image, first: int, stop: int, offset: int, data: memoryview) -> None:
        """Write clusters [first, stop) to new host clusters, completing partial ones from what
        the view shows now (copy-on-write from the resolved chain, QCOW2-NOTES checklist 18)."""
        cb = top.cluster_bits
        run_start, run_end = first << cb, stop << cb
        end = offset + len(data)
        buffer = bytearray(run_end - run_start)
        if offset > run_start:
            head = self.read(run_start, offset - run_start)
            buffer[: len(head)] = head
        if end < run_end:
            tail = self.read(end, run_end - end)
            buffer[end - run_start : end - run_start + len(tail)] = tail
        lo, hi = max(offset, run_start), min(end, run_end)
        buffer[lo - run_start : hi - run_start] = data[lo - offset : hi - offset]
        host = top.write_clusters(first, buffer)
        self._patch(run_start, run_end, top.fd, host)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros (discard, fallocate punch/zero range)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return
        top = self.top
        if not top.writable:
            raise ReadOnly(f"{self.name}: read-only view")
        for observer in self.observers:
            observer(offset, end - offset)
        if isinstance(top, RawImage):
            top.write_zeroes(offset, end - offset)
            return
        cb = top.cluster_bits
        first_full = -(-offset >> cb)
        stop_full = end >> cb
        if top.header.version < 3 or first_full >= stop_full:
            # No zero flag (v2) or no whole cluster: write zeros.
            self.write(offset, bytes(end - offset))
            return
        if offset < first_full << cb:
            self.write(offset, bytes((first_full << cb) - offset))
        top.zero_clusters(first_full, stop_full - first_full)
        self._patch(first_full << cb, stop_full << cb, ZERO_FD, 0)
        if end > stop_full << cb:
            self.write(stop_full << cb, bytes(end - (stop_full << cb)))

    def _patch(self, start: int, end: int, fd: int, host: int) -> None:
        bits = self._chunk_bits
        pos = start
        while pos < end:
            index = pos >> bits
            piece_end = min(end, (index + 1) << bits)
            chunk = self._chunks.get(index)
            if chunk is not None:
                chunk.patch(pos, piece_end, fd, host + (pos - start) if fd >= 0 else host)
            pos = piece_end

    def flush(self) -> None:
        """Make every write durable (the top image is the only one written)."""
        self.top.flush()

    @property
    def dirty(self) -> bool:
        return bool(getattr(self.top, "dirty", False))

    def resize(self, new_size: int, *, thick: bool = False) -> None:
        top = self.top
        if isinstance(top, RawImage):
            top.resize(new_size, thick=thick)
        else:
            top.resize(new_size)
        self.invalidate()


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
        for s, e in pending:
            if e > image_size:
                extents.append((max(s, image_size), e, ZERO_FD, 0))
                e = image_size
                if s >= e:
                    continue
            for ms, me, kind, where in image.map_range(s, e):
                if kind == UNALLOCATED:
                    below.append((ms, me))
                elif kind == DATA:
                    extents.append((ms, me, image.fd, where))
                elif kind == ZERO:
                    extents.append((ms, me, ZERO_FD, 0))
                elif kind == COMPRESSED:
                    extents.append((ms, me, COMPRESSED_FD, where))
                elif kind == BAD:
                    extents.append((ms, me, BAD_FD, where))
                else:  # pragma: no cover - a format bug, not an image problem
                    raise CorruptImage(f"{image.name}: unknown extent kind {kind}")
        pending = below
    for s, e in pending:
        extents.append((s, e, ZERO_FD, 0))
    extents.sort(key=lambda ext: ext[0])
    merged: list[tuple[int, int, int, object]] = []
    for ext in extents:
        if merged:
            p_start, p_end, p_fd, p_host = merged[-1]
            s, e, fd, host = ext
            if p_end == s and p_fd == fd and (
                fd == ZERO_FD or (fd >= 0 and p_host + (p_end - p_start) == host)
            ):
                merged[-1] = (p_start, e, fd, p_host)
                continue
        merged.append(ext)
    return merged
