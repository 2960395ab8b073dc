"""Every errno of DESIGN.md section 2, one misuse at a time, on a real mount."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from tests.conftest import requires_fuse
from tests.qemu import make_chain, qemu_io

pytestmark = requires_fuse


def expect_errno(code: int, func, *args):
    with pytest.raises(OSError) as exc:
        func(*args)
    assert exc.value.errno == code, f"{func.__name__}{args}: {os.strerror(exc.value.errno)}, not {os.strerror(code)}"


@pytest.fixture
def mnt(share, vfsnap_mount):
    make_chain(share, "vol", size=1 << 20, depth=2,
               writes=lambda level, path, fmt: qemu_io(path, f"write -P {level + 1} 0 4k", fmt=fmt))
    make_chain(share, "other", size=1 << 20, depth=0)
    return vfsnap_mount()


# -- mkdir snapshots/<vol>/<snap> ----------------------------------------------------------------


def test_mkdir_existing_snapshot_is_eexist(mnt):
    expect_errno(errno.EEXIST, os.mkdir, mnt.snapshot_dir("vol", "s1"))


def test_mkdir_for_missing_volume_is_enoent(mnt):
    expect_errno(errno.ENOENT, os.mkdir, mnt.snapshot_dir("novol", "x"))


@pytest.mark.parametrize("name", ["active", "has.dot", "sp ace", "star*", "é"])
def test_mkdir_bad_snapshot_name_is_einval(mnt, name):
    expect_errno(errno.EINVAL, os.mkdir, mnt.snapshot_dir("vol", name))


def test_mkdir_latest_is_refused(mnt, share, vfsnap_mount):
    # With snapshots, `latest` is the symlink (EEXIST); without, the name is reserved (EINVAL).
    expect_errno(errno.EEXIST, os.mkdir, mnt.snapshot_dir("vol", "latest"))
    expect_errno(errno.EINVAL, os.mkdir, mnt.snapshot_dir("other", "latest"))


@pytest.mark.parametrize("length", [65, 255, 256, 1000])
def test_mkdir_too_long_snapshot_name_is_enametoolong(mnt, length):
    expect_errno(errno.ENAMETOOLONG, os.mkdir, mnt.snapshot_dir("vol", "x" * length))


def test_snapshot_name_of_64_bytes_works(mnt):
    os.mkdir(mnt.snapshot_dir("vol", "x" * 64))
    assert "x" * 64 in os.listdir(mnt.snapshot_dir("vol"))


def test_mkdir_colliding_with_another_volume_file_is_eexist(share, vfsnap_mount):
    make_chain(share, "a", size=1 << 20, depth=0)
    make_chain(share, "a.b", size=1 << 20, depth=0)  # the file snapshot b of a would need
    mnt = vfsnap_mount()
    expect_errno(errno.EEXIST, os.mkdir, mnt.snapshot_dir("a", "b"))
    assert (mnt.volume("a.b")).stat().st_size == 1 << 20


def test_mkdir_on_full_share_is_enospc(tmp_path, vfsnap_mount):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        make_chain(small, "vol", size=1 << 20, depth=0)
        with open(small / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\xff" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        mnt = vfsnap_mount(share_path=small)
        expect_errno(errno.ENOSPC, os.mkdir, mnt.snapshot_dir("vol", "s"))
        assert os.listdir(mnt.snapshot_dir("vol")) == []
        os.unlink(small / "filler")
        os.mkdir(mnt.snapshot_dir("vol", "s"))
        assert os.listdir(mnt.snapshot_dir("vol")) == ["s", "latest"] or sorted(os.listdir(mnt.snapshot_dir("vol"))) == ["latest", "s"]
        mnt.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


# -- rmdir ----------------------------------------------------------------------------------------


def test_rmdir_of_open_snapshot_is_ebusy(mnt):
    with open(mnt.snapshot("vol", "s1"), "rb"):
        expect_errno(errno.EBUSY, os.rmdir, mnt.snapshot_dir("vol", "s1"))
    os.rmdir(mnt.snapshot_dir("vol", "s1"))


def test_rmdir_of_missing_snapshot_is_enoent(mnt):
    expect_errno(errno.ENOENT, os.rmdir, mnt.snapshot_dir("vol", "nope"))


def test_rmdir_of_volume_dir_and_top_dirs_is_eperm(mnt):
    expect_errno(errno.EPERM, os.rmdir, mnt.snapshot_dir("vol"))
    expect_errno(errno.EPERM, os.rmdir, mnt.path / "volumes")
    expect_errno(errno.EPERM, os.rmdir, mnt.path / "snapshots")


# -- writing under snapshots/ ---------------------------------------------------------------------


def test_writing_a_snapshot_file_is_erofs(mnt):
    expect_errno(errno.EROFS, os.open, mnt.snapshot("vol", "s1"), os.O_WRONLY)
    expect_errno(errno.EROFS, os.open, mnt.snapshot("vol", "s1"), os.O_RDWR)
    expect_errno(errno.EROFS, os.truncate, mnt.snapshot("vol", "s1"), 4096)


def test_creating_files_or_volume_dirs_under_snapshots_is_eperm(mnt):
    expect_errno(errno.EPERM, os.open, mnt.snapshot_dir("vol", "s1") / "new", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.EPERM, os.open, mnt.snapshot_dir("vol") / "file", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.EPERM, os.mkdir, mnt.path / "snapshots" / "newvol")
    expect_errno(errno.EPERM, os.mkdir, mnt.snapshot_dir("vol", "s1") / "sub")


# -- namespace operations: EPERM, never ENOSYS -----------------------------------------------------


def test_moving_a_snapshot_is_eperm(mnt):
    expect_errno(errno.EPERM, os.rename, mnt.snapshot_dir("vol", "s1"), mnt.snapshot_dir("vol", "renamed"))
    expect_errno(errno.EPERM, os.rename, mnt.snapshot("vol", "s1"), mnt.volume("copy"))


def test_links_symlinks_and_nodes_are_eperm(mnt):
    expect_errno(errno.EPERM, os.link, mnt.volume("vol"), mnt.volume("hard"))
    expect_errno(errno.EPERM, os.symlink, "vol", mnt.volume("soft"))
    expect_errno(errno.EPERM, os.mknod, mnt.volume("node"))
    expect_errno(errno.EPERM, os.mkfifo, mnt.snapshot_dir("vol", "s1") / "fifo")
    expect_errno(errno.EPERM, os.mkdir, mnt.path / "volumes" / "dir")
    expect_errno(errno.EPERM, os.mkdir, mnt.path / "newtop")


# -- volumes --------------------------------------------------------------------------------------


def test_shrinking_a_volume_is_eperm(mnt):
    expect_errno(errno.EPERM, os.truncate, mnt.volume("vol"), 4096)
    assert mnt.volume("vol").stat().st_size == 1 << 20


def test_rm_volume_with_snapshots_or_open_is_ebusy(mnt):
    expect_errno(errno.EBUSY, os.unlink, mnt.volume("vol"))
    with open(mnt.volume("other"), "rb"):
        expect_errno(errno.EBUSY, os.unlink, mnt.volume("other"))
    os.unlink(mnt.volume("other"))
    assert "other" not in os.listdir(mnt.path / "volumes")


def test_creating_an_existing_volume_is_eexist(mnt):
    expect_errno(errno.EEXIST, os.open, mnt.volume("vol"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)


@pytest.mark.parametrize("name", [".hidden", "x.info", "x.vfsnap.json", "x.vfsnap", "sp ace", "q?"])
def test_bad_volume_names_are_einval(mnt, name):
    expect_errno(errno.EINVAL, os.open, mnt.volume(name), os.O_CREAT | os.O_WRONLY)


def test_too_long_volume_names_are_enametoolong(mnt):
    expect_errno(errno.ENAMETOOLONG, os.open, mnt.volume("v" * 256), os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.open, mnt.volume("v" * 1000), os.O_CREAT | os.O_WRONLY)


def test_volume_colliding_with_a_snapshot_file_is_eexist(mnt):
    # vol.s1 is the overlay of snapshot s1 of vol: not a name a new volume can take.
    expect_errno(errno.EEXIST, os.open, mnt.volume("vol.s1"), os.O_CREAT | os.O_WRONLY)


def test_read_only_mount_is_erofs(share, vfsnap_mount):
    make_chain(share, "vol", size=1 << 20, depth=1)
    mnt = vfsnap_mount("ro")
    expect_errno(errno.EROFS, os.open, mnt.volume("vol"), os.O_WRONLY)
    expect_errno(errno.EROFS, os.open, mnt.volume("new"), os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.EROFS, os.truncate, mnt.volume("vol"), 2 << 20)
    expect_errno(errno.EROFS, os.mkdir, mnt.snapshot_dir("vol", "x"))
    expect_errno(errno.EROFS, os.rmdir, mnt.snapshot_dir("vol", "s1"))
    expect_errno(errno.EROFS, os.unlink, mnt.volume("vol"))


def test_unknown_xattr_is_enodata(mnt):
    expect_errno(errno.ENODATA, os.getxattr, mnt.volume("vol"), "user.vfsnap.nope")
    expect_errno(errno.ENODATA, os.getxattr, mnt.volume("vol"), "user.other")
    assert os.getxattr(mnt.volume("vol"), "user.vfsnap.format") == b"raw"
    assert b"vol <- vol.s1 <- vol.s2" == os.getxattr(mnt.volume("vol"), "user.vfsnap.chain")


def test_other_xattr_namespaces_are_not_supported(mnt):
    """vfsnap keeps no security., system. or trusted. attributes: EOPNOTSUPP (so `ls -l` stops
    asking after the first file), while unknown `user.` names are ENODATA (above)."""
    for path in (mnt.volume("vol"), mnt.path / "volumes", mnt.path / "snapshots" / "vol"):
        for name in ("security.selinux", "system.posix_acl_access", "trusted.x"):
            expect_errno(errno.EOPNOTSUPP, os.getxattr, path, name)
