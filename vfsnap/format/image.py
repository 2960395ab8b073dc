"""What every image format offers the chain layer: a virtual size and a map of guest ranges.

An image answers `map_range(start, end)` with extents `(start, end, kind, where)`:

- `DATA`: the bytes live in this image's file at byte offset `where` (contiguous for the extent);
- `ZERO`: the range reads as zeros and nothing below it is read;
- `UNALLOCATED`: this image does not hold the range; the backing image answers for it;
- `COMPRESSED`: one whole cluster, `where` is a `CompressedCluster` for `read_compressed`.

The chain layer combines the maps of a backing chain into one resolved view and does the I/O.
"""

from __future__ import annotations

import os

import attrs

DATA = 0
ZERO = 1
UNALLOCATED = 2
COMPRESSED = 3

KIND_NAMES = {DATA: "data", ZERO: "zero", UNALLOCATED: "unallocated", COMPRESSED: "compressed"}


@attrs.frozen
class CompressedCluster:
    """A compressed cluster: where its bytes lie and which cluster of the image it decodes to."""

    image: "Image" = attrs.field(eq=False, repr=False)
    host_offset: int
    length: int
    guest_cluster: int


class Image:
    """Base class of raw and qcow2 images opened on a file descriptor."""

    format: str = ""

    def __init__(self, fd: int, name: str, *, writable: bool):
        self.fd = fd
        self.name = name
        self.writable = writable
        self.closed = False
        # Data written since the last sync, and the bytes written so far: a sync done off the
        # event loop (begin_data_sync / data_synced) clears the mark only if no write came in
        # while it ran. Every write of data sets both, inline (the hot path); the sync that
        # stored everything up to a count sets `_synced_generation` to it.
        self._data_dirty = False
        self._data_generation = 0
        self._synced_generation = 0

    @property
    def size(self) -> int:
        raise NotImplementedError

    @property
    def granularity(self) -> int:
        """The smallest unit in which this image's map can change (bytes)."""
        raise NotImplementedError

    def map_range(self, start: int, end: int) -> list[tuple[int, int, int, object]]:
        raise NotImplementedError

    def read_compressed(self, cluster: CompressedCluster) -> bytes:
        raise NotImplementedError

    def replace_fd(self, fd: int) -> None:
        """Go on with a new descriptor of the same file (the caller drops every extent that
        named the old one: its number may be reused)."""
        old, self.fd = self.fd, fd
        os.close(old)

    def reload(self) -> None:
        """Read the metadata again (another host may have changed the file)."""

    def flush(self) -> None:
        """Make writes durable (images that are written override this)."""

    def flush_keeping_frees(self) -> None:
        """`flush`, leaving freed clusters counted until `apply_pending_frees` (qcow2)."""
        self.flush()

    def apply_pending_frees(self) -> None:
        """Lower the counts of clusters freed before the last flush (qcow2)."""

    def begin_data_sync(self, min_bytes: int = 0) -> tuple[int, int] | None:
        """For an fdatasync of the data written so far on another thread: a duplicate of the
        descriptor (closing the image meanwhile cannot hit a reused number) and the write count
        it covers; None when no data waits for a sync, or less than `min_bytes`. Only data: metadata stays for `flush`,
        which must still run, and whose own data sync then has only what came in meanwhile.
        An extra fdatasync is always safe: nothing is ever written before what it depends on
        is durable, so syncing earlier can only make durable what was meant to become so."""
        if not self._data_dirty or self._data_generation - self._synced_generation < min_bytes:
            return None
        return os.dup(self.fd), self._data_generation

    def data_synced(self, generation: int) -> None:
        """The sync begun at `generation` returned without error."""
        self._synced_generation = max(self._synced_generation, generation)
        if generation == self._data_generation:
            self._data_dirty = False

    def close_writes(self) -> None:
        """Write everything back and mark the image consistent on disk."""
        self.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} size={self.size}>"


def pread_full(fd: int, size: int, offset: int) -> bytes:
    """pread that retries short reads and zero-fills past the end of the file.

    Reading past the physical end of an image is legal (sparse tails, clusters allocated by
    `preallocation=metadata`) and reads as zeros.
    """
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            parts.append(bytes(size - got))
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
