"""Snapshots of a volume that is being written (issue 4): crash-consistent, and the writer never
notices. Also deletion in every position while the writer keeps going."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest

from tests.conftest import requires_fuse
from tests.qemu import check, make_chain

pytestmark = requires_fuse

BLOCK = 4096


def block(number: int) -> bytes:
    """A block that says which number it is, all through (a torn block can't pass)."""
    return struct.pack(">Q", number + 1) * (BLOCK // 8)


def block_number(data: bytes) -> int | None:
    """The number written in a block, None for a never-written (zero) block; torn -> error."""
    if data == bytes(BLOCK):
        return None
    first = data[:8]
    assert data == first * (BLOCK // 8), "torn block"
    return struct.unpack(">Q", first)[0] - 1


class Writer(threading.Thread):
    """Writes blocks 0, 1, 2, ... with O_DSYNC, each acknowledged before the next."""

    def __init__(self, path, count: int, *, stride: int = 1):
        super().__init__(daemon=True)
        self.path = path
        self.count = count
        self.stride = stride
        self.written = 0
        self.error: BaseException | None = None

    def run(self):
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_DSYNC)
            try:
                for n in range(self.count):
                    assert os.pwrite(fd, block(n), n * self.stride * BLOCK) == BLOCK
                    self.written = n + 1
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def assert_prefix(data: bytes, *, stride: int = 1, at_least: int = 0, total: int) -> int:
    """The view holds blocks 0..k-1 and nothing after: return k."""
    numbers = [block_number(data[i * stride * BLOCK : i * stride * BLOCK + BLOCK]) for i in range(total)]
    k = 0
    while k < total and numbers[k] is not None:
        assert numbers[k] == k
        k += 1
    assert all(n is None for n in numbers[k:]), f"not a prefix: written after a gap at {k}"
    assert k >= at_least
    return k


def test_snapshots_of_a_volume_being_written_are_prefixes(share, vfsnap_mount):
    total = 1500
    make_chain(share, "vol", size=total * BLOCK, depth=0)
    mnt = vfsnap_mount()
    writer = Writer(mnt.volume("vol"), total)
    writer.start()
    taken = []
    while writer.is_alive() and len(taken) < 12:
        time.sleep(0.05)
        before = writer.written
        name = f"t{len(taken)}"
        os.mkdir(mnt.snapshot_dir("vol", name))
        taken.append((name, before))
    writer.join(120)
    assert writer.error is None, writer.error
    assert writer.written == total
    assert len(taken) >= 3, "the writer finished before snapshots could be taken"
    previous = 0
    for name, before in taken:
        k = assert_prefix(mnt.snapshot("vol", name).read_bytes(), at_least=before, total=total)
        assert k >= previous  # later snapshots hold at least as much
        previous = k
    assert assert_prefix(mnt.volume("vol").read_bytes(), total=total) == total


@pytest.mark.parametrize("share_io", ["inline", "threads"])
@pytest.mark.parametrize("position", ["only", "oldest", "middle", "newest"])
def test_deleting_a_snapshot_while_writing_keeps_every_other_view(share, vfsnap_mount, position, share_io):
    """`share_io=threads`: the writes and the merge's copy run on the share's threads, side by
    side (as on a network share)."""
    total = 1200
    make_chain(share, "vol", size=total * BLOCK, depth=0)
    mnt = vfsnap_mount(f"share_io={share_io}")
    names = ["only"] if position == "only" else ["a", "b", "c"]
    contents = {}
    writer = Writer(mnt.volume("vol"), total)
    writer.start()
    for name in names:
        while writer.written < 50 * (len(contents) + 1) and writer.is_alive():
            time.sleep(0.01)
        os.mkdir(mnt.snapshot_dir("vol", name))
        contents[name] = mnt.snapshot("vol", name).read_bytes()
    victim = {"only": "only", "oldest": "a", "middle": "b", "newest": "c"}[position]
    os.rmdir(mnt.snapshot_dir("vol", victim))
    del contents[victim]
    # While the merge runs and the writer goes on, the other snapshots never change.
    deadline = time.monotonic() + 60
    while writer.is_alive() and time.monotonic() < deadline:
        for name, data in contents.items():
            assert mnt.snapshot("vol", name).read_bytes() == data, name
        time.sleep(0.02)
    writer.join(120)
    assert writer.error is None, writer.error
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "vfsnap", "sync", str(mnt.path), "--timeout", "120"], check=True)
    for name, data in contents.items():
        assert mnt.snapshot("vol", name).read_bytes() == data, name
    assert sorted(os.listdir(mnt.snapshot_dir("vol"))) == sorted(list(contents) + (["latest"] if contents else []))
    assert assert_prefix(mnt.volume("vol").read_bytes(), total=total) == total
    mnt_path = mnt.path
    mnt.stop()
    assert not os.path.ismount(mnt_path)
    assert not (share / f"vol.{victim}").exists()
    for name in os.listdir(share):
        if name.startswith("vol.") and not name.endswith((".info", ".json")):
            assert check(share / name)["exit"] == 0, name


def test_deleting_oldest_snapshot_keeps_newer_snapshot_data(share, vfsnap_mount):
    """The 2014 remotefs algorithm committed the newer overlay into the deleted one and lost the
    newer snapshot's data; vfsnap merges the deleted overlay down instead (invariant 2)."""
    make_chain(share, "vol", size=1 << 20, depth=0)
    mnt = vfsnap_mount()
    vol = mnt.volume("vol")
    with open(vol, "r+b") as f:
        f.write(b"A" * 65536)
    os.mkdir(mnt.snapshot_dir("vol", "older"))
    with open(vol, "r+b") as f:
        f.write(b"B" * 65536)
        f.seek(131072)
        f.write(b"b" * 4096)
    os.mkdir(mnt.snapshot_dir("vol", "newer"))
    with open(vol, "r+b") as f:
        f.write(b"C" * 65536)
    newer = mnt.snapshot("vol", "newer").read_bytes()
    assert newer[:65536] == b"B" * 65536 and newer[131072:135168] == b"b" * 4096
    os.rmdir(mnt.snapshot_dir("vol", "older"))
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "vfsnap", "sync", str(mnt.path), "--timeout", "60"], check=True)
    assert mnt.snapshot("vol", "newer").read_bytes() == newer
    assert vol.read_bytes()[:65536] == b"C" * 65536
    assert os.listdir(mnt.snapshot_dir("vol")) == ["newer", "latest"] or sorted(os.listdir(mnt.snapshot_dir("vol"))) == ["latest", "newer"]
