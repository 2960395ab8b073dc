"""O_DIRECT opens get FUSE's direct_io (no page cache, no getxattr round trip per write): the
durability of O_DSYNC and fsync must not depend on the kernel path a write took."""

from __future__ import annotations

import mmap
import os
import random

import pytest

from tests.conftest import requires_fuse
from tests.qemu import check, flat_bytes, make_chain, qemu_io

pytestmark = requires_fuse
MiB = 1 << 20


def aligned(data: bytes) -> mmap.mmap:
    buffer = mmap.mmap(-1, len(data))
    buffer.write(data)
    return buffer


@pytest.mark.parametrize("how", ["O_DSYNC", "O_SYNC", "fsync"])
@pytest.mark.parametrize("base", ["raw", "qcow2-overlay"])
def test_direct_writes_acknowledged_survive_kill_9(how, base, share, tmp_path, vfsnap_mount):
    depth = 0 if base == "raw" else 1
    names = make_chain(share, "vol", size=8 * MiB, depth=depth,
                       writes=lambda level, path, fmt: qemu_io(path, f"write -P {level + 7} 0 8M", fmt=fmt))
    mnt = vfsnap_mount()
    expected = bytearray(mnt.volume("vol").read_bytes())
    flags = os.O_WRONLY | os.O_DIRECT | {"O_DSYNC": os.O_DSYNC, "O_SYNC": os.O_SYNC}.get(how, 0)
    fd = os.open(mnt.volume("vol"), flags)
    rng = random.Random(how + base)
    for _ in range(16):
        length = rng.choice([4096, 65536, 3 * 4096, 1 << 20])
        offset = rng.randrange(0, (8 * MiB - length) // 4096) * 4096
        data = rng.randbytes(length)
        assert os.pwrite(fd, aligned(data), offset) == length
        expected[offset : offset + length] = data
    if how == "fsync":
        os.fsync(fd)
    mnt.kill()  # still open: no flush by close, no unmount
    try:
        os.close(fd)
    except OSError:
        pass
    top = share / names[-1]
    assert flat_bytes(top, tmp_path, fmt="raw" if base == "raw" else "qcow2") == bytes(expected)
    if base != "raw":
        assert check(top)["exit"] in (0, 3)
    mnt = vfsnap_mount()
    assert mnt.volume("vol").read_bytes() == bytes(expected)
    mnt.stop()
    if base != "raw":
        assert check(top)["exit"] == 0  # the mount repaired what the crash leaked


def test_buffered_and_direct_handles_see_each_others_writes(share, vfsnap_mount):
    make_chain(share, "vol", size=4 * MiB, depth=1)
    mnt = vfsnap_mount()
    direct = os.open(mnt.volume("vol"), os.O_RDWR | os.O_DIRECT)
    buffered = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        os.pwrite(direct, aligned(b"d" * 4096), 0)
        assert os.pread(buffered, 4096, 0) == b"d" * 4096
        os.pwrite(buffered, b"b" * 4096, 4096)
        os.fsync(buffered)
        out = mmap.mmap(-1, 8192)
        assert os.preadv(direct, [out], 0) == 8192
        assert out[:] == b"d" * 4096 + b"b" * 4096
    finally:
        os.close(direct)
        os.close(buffered)
