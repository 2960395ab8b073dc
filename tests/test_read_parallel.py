"""A read spanning several extents is read on several of the share's threads at once (issue 12).

`View._read_extents_async` splits the extents of one request into consecutive parts
(`_split_extents`) that threads fill side by side in one buffer, as QEMU's qcow2 driver reads the
host extents of a request in parallel. The split is checked as a property; the bytes through a
mount with `share_io=threads`, against `qemu-img convert`.
"""

from __future__ import annotations

import mmap
import os

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import requires_fuse
from tests.qemu import flat_bytes, make_chain, qemu_io
from vfsnap.chain.view import COMPRESSED_FD, ZERO_FD, _split_extents

KiB = 1 << 10
MiB = 1 << 20


@st.composite
def extent_lists(draw):
    lengths = draw(st.lists(st.integers(1, 256 * KiB), min_size=1, max_size=40))
    kinds = draw(st.lists(st.sampled_from([3, 4, ZERO_FD, COMPRESSED_FD]), min_size=len(lengths),
                          max_size=len(lengths)))
    extents, start = [], draw(st.integers(0, 1 << 30))
    for length, fd in zip(lengths, kinds):
        extents.append((start, start + length, fd, 0))
        start += length
    return extents


@given(extent_lists(), st.integers(1, 8), st.integers(1, 512 * KiB))
def test_split_keeps_every_extent_in_order_and_bounds_the_parts(extents, most, least):
    parts = _split_extents(extents, most, least)
    assert [e for part in parts for e in part] == extents
    assert all(parts)
    data = sum(stop - start for start, stop, fd, _ in extents if fd >= 0)
    assert len(parts) <= max(1, min(most, data // least))
    for part in parts[:-1]:  # each part but the last reads at least `least` bytes
        assert sum(stop - start for start, stop, fd, _ in part if fd >= 0) >= least


def _scattered(level, path, fmt):
    """Every image owns some 64 KiB clusters of each MiB: a 1 MiB read spans all five files."""
    if level == 0:
        qemu_io(path, "write -P 0x10 0 8M", fmt=fmt)
        return
    commands = [f"write -P {0x20 + level * 16 + (mib % 16)} {mib * MiB + ((level * 3 + k * 5) % 16) * 64 * KiB} 64k"
                for mib in range(8) for k in range(3)]
    qemu_io(path, *commands, fmt=fmt)


@requires_fuse
def test_reads_across_many_extents_equal_qemu(share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=8 * MiB, depth=4, base_fmt="raw", cluster_size=64 * KiB,
                       writes=_scattered)
    expected = flat_bytes(share / names[-1], tmp_path)
    mnt = vfsnap_mount("share_io=threads")
    fd = os.open(mnt.volume("vol"), os.O_RDONLY | os.O_DIRECT)
    try:
        for offset, length in ((0, MiB), (3 * MiB, MiB), (5 * MiB - 64 * KiB, MiB), (7 * MiB, 512 * KiB),
                               (0, 8 * MiB)):
            buf = mmap.mmap(-1, length)
            got = os.preadv(fd, [buf], offset)
            assert got == length
            assert buf[:] == expected[offset : offset + length], f"read at {offset}+{length}"
    finally:
        os.close(fd)
