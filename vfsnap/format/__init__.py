"""Image formats: raw and qcow2. Parse, map, and (for the active image) allocate and write."""

from __future__ import annotations

from vfsnap.errors import UnsupportedImage
from vfsnap.format.cache import TableCache
from vfsnap.format.header import MAGIC
from vfsnap.format.image import COMPRESSED, DATA, UNALLOCATED, ZERO, CompressedCluster, Image
from vfsnap.format.qcow2 import BAD, Qcow2Image
from vfsnap.format.raw import RawImage

FORMATS = ("raw", "qcow2")

__all__ = [
    "BAD",
    "COMPRESSED",
    "DATA",
    "FORMATS",
    "UNALLOCATED",
    "ZERO",
    "CompressedCluster",
    "Image",
    "Qcow2Image",
    "RawImage",
    "TableCache",
    "open_image",
    "probe_format",
]


def open_image(fd: int, name: str, image_format: str, *, writable: bool, table_cache: TableCache) -> Image:
    """Wrap an open file in the reader for `image_format` (never guessed here: invariant 4)."""
    if image_format == "raw":
        return RawImage(fd, name, writable=writable)
    if image_format == "qcow2":
        return Qcow2Image(fd, name, writable=writable, table_cache=table_cache)
    raise UnsupportedImage(f"{name}: unsupported image format {image_format!r}")


def probe_format(fd: int) -> str:
    """Guess a file's format from its magic. Used once per volume, when vfsnap first meets it."""
    import os

    return "qcow2" if os.pread(fd, 4, 0) == MAGIC else "raw"
