"""Views: a backing chain resolved into one map of where every guest byte lives.

A read must not cost more with a deeper chain, so a view resolves its chain once per *chunk*
(a few MiB of guest space) into sorted extents `[start, end) -> (fd, host offset)` and keeps the
chunks it has resolved. A read is then a bisect and one `pread` per extent it touches, whatever
the depth. Chunks are dropped when the chain changes (`invalidate`).
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_right

from vfsnap.errors import CorruptImage
from vfsnap.format import BAD, COMPRESSED, DATA, UNALLOCATED, ZERO, CompressedCluster, Image
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
