"""Decompression of compressed qcow2 clusters (deflate and zstd), bounded by one cluster.

QEMU (block/qcow2-threads.c) inflates raw deflate with window bits -12 and tolerates trailing
input, because the compressed length is only known to the 512-byte sector; zstd data is a
sequence of frames read until a full cluster has come out. Both stop at `cluster_size` output
bytes, so a hostile cluster can never inflate beyond its cluster.
"""

from __future__ import annotations

import zlib

from vfsnap.errors import CorruptImage, UnsupportedImage
from vfsnap.format.header import COMPRESSION_DEFLATE, COMPRESSION_ZSTD

try:  # Python 3.14 has compression.zstd; older ones use its backport.
    from compression import zstd as _zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the interpreter
    try:
        from backports import zstd as _zstd  # type: ignore[import-not-found,no-redef]
    except ImportError:
        _zstd = None

DEFLATE_WINDOW_BITS = -12


def decompress_cluster(data: bytes, cluster_size: int, compression_type: int, *, where: str) -> bytes:
    """Return exactly `cluster_size` bytes decoded from `data`, or raise CorruptImage."""
    if compression_type == COMPRESSION_DEFLATE:
        out = _inflate(data, cluster_size)
    elif compression_type == COMPRESSION_ZSTD:
        out = _unzstd(data, cluster_size, where)
    else:
        raise UnsupportedImage(f"{where}: unknown compression type {compression_type}")
    if len(out) != cluster_size:
        raise CorruptImage(f"{where}: compressed cluster decodes to {len(out)} bytes, not {cluster_size}")
    return out


def _inflate(data: bytes, cluster_size: int) -> bytes:
    inflater = zlib.decompressobj(DEFLATE_WINDOW_BITS)
    try:
        return inflater.decompress(data, cluster_size)
    except zlib.error:
        return b""


def _unzstd(data: bytes, cluster_size: int, where: str) -> bytes:
    if _zstd is None:
        raise UnsupportedImage(f"{where}: zstd-compressed cluster, but no zstd module is installed")
    out = bytearray()
    remaining = data
    try:
        while remaining and len(out) < cluster_size:
            decompressor = _zstd.ZstdDecompressor()
            out += decompressor.decompress(remaining, cluster_size - len(out))
            if not decompressor.eof:
                break  # ran out of input inside a frame, or the output is full
            remaining = decompressor.unused_data
    except _zstd.ZstdError:
        return b""
    return bytes(out)


def zstd_available() -> bool:
    return _zstd is not None
