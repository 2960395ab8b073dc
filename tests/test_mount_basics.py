"""The mounted tree of DESIGN.md section 2 over a small Cinder-layout share."""

from __future__ import annotations

import errno
import os

import pytest

from tests.conftest import requires_fuse
from tests.qemu import flat_bytes, make_chain, qemu_io

pytestmark = requires_fuse


def _fill(level, path, fmt):
    qemu_io(path, f"write -P {0x10 + level} {level * 64}k 96k", fmt=fmt)


def test_tree_lists_volumes_snapshots_and_latest(share, vfsnap_mount):
    make_chain(share, "vol1", size=4 << 20, depth=2, writes=_fill)
    make_chain(share, "vol2", size=1 << 20, depth=0)
    mnt = vfsnap_mount()
    assert sorted(os.listdir(mnt.path)) == ["snapshots", "volumes"]
    assert sorted(os.listdir(mnt.path / "volumes")) == ["vol1", "vol2"]
    assert sorted(os.listdir(mnt.path / "snapshots")) == ["vol1", "vol2"]
    assert sorted(os.listdir(mnt.snapshot_dir("vol1"))) == ["latest", "s1", "s2"]
    assert os.readlink(mnt.snapshot_dir("vol1") / "latest") == "s2"
    assert os.listdir(mnt.snapshot_dir("vol2")) == []
    assert os.listdir(mnt.snapshot_dir("vol1", "s1")) == ["vol1"]
    # The control file is found by name but never listed.
    assert os.path.isfile(mnt.path / ".vfsnap")


def test_views_equal_qemu_convert(share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=4 << 20, depth=2, writes=_fill)
    mnt = vfsnap_mount()
    assert mnt.volume("vol").read_bytes() == flat_bytes(share / names[2], tmp_path)
    # Snapshot s<i> holds the chain below overlay vol.s<i>.
    assert mnt.snapshot("vol", "s1").read_bytes() == (share / "vol").read_bytes()
    assert mnt.snapshot("vol", "s2").read_bytes() == flat_bytes(share / names[1], tmp_path)


def test_sizes_and_du(share, vfsnap_mount):
    make_chain(share, "vol", size=8 << 20, depth=1, writes=_fill)
    mnt = vfsnap_mount()
    st = os.stat(mnt.volume("vol"))
    assert st.st_size == 8 << 20
    assert 0 < st.st_blocks * 512 < 8 << 20  # sparse: du is meaningful
    assert os.stat(mnt.snapshot("vol", "s1")).st_size == 8 << 20


def test_statfs_reports_share_capacity(share, vfsnap_mount):
    mnt = vfsnap_mount()
    ours, theirs = os.statvfs(mnt.path), os.statvfs(share)
    assert ours.f_bsize == ours.f_frsize
    assert abs(ours.f_blocks * ours.f_frsize - theirs.f_blocks * theirs.f_frsize) < 1 << 20


def test_snapshot_files_are_read_only(share, vfsnap_mount):
    make_chain(share, "vol", size=1 << 20, depth=1)
    mnt = vfsnap_mount()
    with pytest.raises(OSError) as exc:
        os.open(mnt.snapshot("vol", "s1"), os.O_WRONLY)
    assert exc.value.errno == errno.EROFS


def test_unknown_names_are_enoent(share, vfsnap_mount):
    make_chain(share, "vol", size=1 << 20, depth=1)
    mnt = vfsnap_mount()
    for path in (mnt.volume("nope"), mnt.snapshot_dir("nope"), mnt.snapshot_dir("vol", "nope"),
                 mnt.path / "nope", mnt.volume("vol.s1")):
        assert not path.exists(), path


def test_unmount_by_sigterm(share, vfsnap_mount):
    mnt = vfsnap_mount()
    mnt.process.terminate()
    assert mnt.process.wait(20) == 0
    assert not os.path.ismount(mnt.path)
