"""Raw images: the guest offset is the file offset, and the file size is the virtual size."""

from __future__ import annotations

import os

from vfsnap.format.image import DATA, Image


class RawImage(Image):
    format = "raw"

    def __init__(self, fd: int, name: str, *, writable: bool):
        super().__init__(fd, name, writable=writable)
        self._size = os.fstat(fd).st_size

    @property
    def size(self) -> int:
        return self._size

    @property
    def granularity(self) -> int:
        return 512

    def refresh_size(self) -> None:
        self._size = os.fstat(self.fd).st_size

    def map_range(self, start: int, end: int) -> list[tuple[int, int, int, object]]:
        end = min(end, self._size)
        if start >= end:
            return []
        return [(start, end, DATA, start)]
