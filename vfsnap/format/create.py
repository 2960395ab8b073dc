"""Creating qcow2 images: new volumes (`-o volume_format=qcow2`) and snapshot overlays.

The layout is the one `qemu-img create -f qcow2` makes (QCOW2-NOTES 1.6): version 3, 64 KiB
clusters, 16-bit refcounts, cluster 0 the header (backing-format extension, then the backing
name), cluster 1 the refcount table, cluster 2 its only block, cluster 3 on the L1 table.
"""

from __future__ import annotations

import os

from vfsnap.errors import VfsnapError, share_error
from vfsnap.format.header import (
    COMPRESSION_DEFLATE,
    Qcow2Header,
    serialize_header_area,
    with_backing,
)
from vfsnap.format.tables import table_to_bytes

DEFAULT_CLUSTER_BITS = 16
REFCOUNT_ORDER = 4


def round_size(size: int) -> int:
    """qcow2 sizes are whole 512-byte sectors (qemu-img rounds up; readers round down)."""
    return -(-size // 512) * 512


def qcow2_image_bytes(
    size: int,
    *,
    cluster_bits: int = DEFAULT_CLUSTER_BITS,
    backing_file: str | None = None,
    backing_format: str | None = None,
) -> bytes:
    """The bytes of an empty qcow2 image of virtual size `size`."""
    from array import array

    cs = 1 << cluster_bits
    size = round_size(size)
    l2_entries = cs // 8
    l1_size = -(-size // (cs * l2_entries))
    l1_clusters = -(-(l1_size * 8) // cs)
    used_clusters = 3 + l1_clusters
    entries_per_block = cs * 8 // (1 << REFCOUNT_ORDER)
    if used_clusters > entries_per_block:
        raise VfsnapError(f"a qcow2 image of {size} bytes needs more than one refcount block to create")
    header = Qcow2Header(
        version=3,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=3 * cs,
        refcount_table_offset=cs,
        refcount_table_clusters=1,
        nb_snapshots=0,
        snapshots_offset=0,
        refcount_order=REFCOUNT_ORDER,
        header_length=112,
        compression_type=COMPRESSION_DEFLATE,
    )
    if backing_file is not None:
        header = with_backing(header, backing_file, backing_format)
    image = bytearray(cs * 3)
    area = serialize_header_area(header, cs)
    image[: len(area)] = area
    refcount_table = array("Q", [0] * (cs // 8))
    refcount_table[0] = 2 * cs
    image[cs : 2 * cs] = table_to_bytes(refcount_table)
    for cluster in range(used_clusters):  # 16-bit big-endian counts of 1
        image[2 * cs + cluster * 2 + 1] = 1
    # The L1 table is all zeros; like qemu-img, end the file right after it.
    image += bytes(l1_size * 8)
    return bytes(image)


def create_qcow2(fd: int, size: int, **kwargs) -> None:
    """Write an empty qcow2 image to the (empty) file `fd` and make it durable."""
    data = qcow2_image_bytes(size, **kwargs)
    try:
        view = memoryview(data)
        offset = 0
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
        os.fsync(fd)
    except OSError as exc:
        raise share_error(exc, "writing a new image") from None
