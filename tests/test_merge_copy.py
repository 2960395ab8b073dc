"""Merging into a raw base moves the data inside the kernel (copy_file_range), and falls back
to reading and writing where the share cannot (`Merge._copy_in_kernel`, `RawImage.copy_from`).

Either way the base must end up holding exactly what the chain showed (QEMU's `convert` of the
chain before the merge is the oracle), including zero clusters and data past the end of an
overlay's file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.qemu import create, flat_bytes, qemu_io
from vfsnap.chain.merge import Merge
from vfsnap.chain.view import View
from vfsnap.format.cache import TableCache
from vfsnap.format.qcow2 import Qcow2Image
from vfsnap.format.raw import RawImage

MiB = 1 << 20
SIZE = 8 * MiB


def _chain(tmp_path: Path) -> tuple[Path, Path, bytes]:
    base, overlay = tmp_path / "vol", tmp_path / "vol.s1"
    create(base, SIZE, fmt="raw")
    qemu_io(base, "write -P 0x11 0 8M", fmt="raw")
    create(overlay, SIZE, backing="vol", backing_fmt="raw")
    qemu_io(overlay, "write -P 0x22 64k 192k", "write -P 0x33 3M 1M", "write -z 5M 128k",
            "write -P 0x44 7M 4k", "write -c -P 0x55 6M 64k")
    return base, overlay, flat_bytes(overlay, tmp_path)


def _merge(base: Path, overlay: Path) -> Merge:
    target = RawImage(os.open(base, os.O_RDWR), "vol", writable=True)
    top = Qcow2Image(os.open(overlay, os.O_RDONLY), "vol.s1", writable=False, table_cache=TableCache())
    merge = Merge(top, View([target, top], name="source"), View([target], name="target"))
    try:
        merge.grow_target()
        while merge.step(1 * MiB):
            pass
        merge.finish()
    finally:
        target.close()
        top.close()
    return merge


def test_a_merge_into_a_raw_base_copies_in_the_kernel(tmp_path: Path, monkeypatch):
    base, overlay, expected = _chain(tmp_path)
    calls = []
    real = os.copy_file_range

    def counting(*args):
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", counting)
    merge = _merge(base, overlay)
    assert merge.kernel_copy and calls, "the data did not go through copy_file_range"
    assert base.read_bytes() == expected


@pytest.mark.parametrize("error", [errno.EXDEV, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_share_without_kernel_copy_falls_back_to_reading_and_writing(tmp_path: Path, monkeypatch, error):
    base, overlay, expected = _chain(tmp_path)

    def refusing(*args):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "copy_file_range", refusing)
    merge = _merge(base, overlay)
    assert not merge.kernel_copy
    assert base.read_bytes() == expected


def test_a_failing_share_is_an_error_not_a_fallback(tmp_path: Path, monkeypatch):
    from vfsnap.errors import NoSpace

    base, overlay, _ = _chain(tmp_path)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(NoSpace):
        _merge(base, overlay)


def test_data_past_the_end_of_the_source_file_reads_as_zeros(tmp_path: Path):
    """An extent may name host bytes past the physical end of the overlay's file (QEMU's
    preallocation=metadata, a truncated copy): copy_file_range returns 0 there, and the target
    must get zeros, as a read would."""
    target_path, source_path = tmp_path / "target", tmp_path / "source"
    target_path.write_bytes(b"\xff" * (2 * MiB))
    source_path.write_bytes(b"\x01" * 4096)
    target = RawImage(os.open(target_path, os.O_RDWR), "target", writable=True)
    fd = os.open(source_path, os.O_RDONLY)
    try:
        assert target.copy_from(fd, 0, 65536, MiB)
    finally:
        os.close(fd)
        target.close()
    data = target_path.read_bytes()
    assert data[65536 : 65536 + 4096] == b"\x01" * 4096
    assert data[65536 + 4096 : 65536 + MiB] == bytes(MiB - 4096)
    assert data[:65536] == b"\xff" * 65536 and data[65536 + MiB :] == b"\xff" * (MiB - 65536)
