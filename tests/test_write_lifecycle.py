"""Volume lifecycle through the mount (issue #3, DESIGN.md section 2): create, extend, shrink,
remove, rename, and the errors of each; a read-only mount; snapshot files.

Every test checks the share as Cinder and QEMU see it (`qemu-img info` / `check`, the `.info`
file, vfsnap's sidecar `<vol>.vfsnap.json`), not only what the mount shows.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from tests.conftest import requires_fuse
from tests.qemu import check, create, flat_bytes, info, make_chain, qemu_io, write_info

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20


def files_of(share, volume: str) -> list[str]:
    """The share's files that belong to `volume` (its base, overlays, .info, sidecar)."""
    return sorted(n for n in os.listdir(share) if n == volume or n.startswith(volume + "."))


def sidecar(share, volume: str) -> dict:
    return json.loads((share / f"{volume}.vfsnap.json").read_text())


def errno_of(func, *args) -> int | None:
    try:
        func(*args)
    except OSError as exc:
        return exc.errno
    return None


def open_close(path, flags, mode=0o644) -> None:
    os.close(os.open(path, flags, mode))


def pattern(seed: int, length: int) -> bytes:
    import random

    return random.Random(seed).randbytes(length)


def _fill(level, path, fmt):
    qemu_io(path, f"write -P {0x10 + level} {level * 64}k 96k", fmt=fmt)


# -- creating volumes ----------------------------------------------------------------------------


def _create_truncate(mnt, name, size):
    subprocess.run(["truncate", "-s", str(size), str(mnt.volume(name))], check=True)


def _create_open(mnt, name, size):
    fd = os.open(mnt.volume(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        assert os.fstat(fd).st_size == 0
        os.ftruncate(fd, size)
        data = pattern(1, 3000)
        assert os.pwrite(fd, data, 4096 - 7) == len(data)
        assert os.pread(fd, len(data), 4096 - 7) == data
    finally:
        os.close(fd)


def _create_qemu_img(mnt, name, size):
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(mnt.volume(name)), str(size)], check=True)


CREATORS = {"truncate": _create_truncate, "open-creat": _create_open, "qemu-img-create": _create_qemu_img}


@pytest.mark.parametrize("volume_format", ["raw", "qcow2"])
@pytest.mark.parametrize("how", list(CREATORS))
def test_create_volume(how, volume_format, share, tmp_path, vfsnap_mount):
    """A new volume: base file on the share in the mount's format, format recorded in the sidecar."""
    mnt = vfsnap_mount("volume_format=qcow2" if volume_format == "qcow2" else "")
    size = 10 * MiB
    CREATORS[how](mnt, "new", size)
    assert os.listdir(mnt.path / "volumes") == ["new"]
    assert os.listdir(mnt.path / "snapshots") == ["new"]
    assert os.stat(mnt.volume("new")).st_size == size
    assert files_of(share, "new") == ["new", "new.vfsnap.json"]
    assert sidecar(share, "new")["format"] == volume_format
    image = info(share / "new")
    assert image["format"] == volume_format
    assert image["virtual-size"] == size
    if volume_format == "raw":
        assert os.path.getsize(share / "new") == size
    else:
        assert check(share / "new")["exit"] == 0
    # The new volume is writable, and QEMU reads what was written.
    data = pattern(2, 70000)
    with open(mnt.volume("new"), "r+b") as f:
        f.seek(size - len(data))
        f.write(data)
    expected = bytearray(size)
    if how == "open-creat":
        expected[4096 - 7:4096 - 7 + 3000] = pattern(1, 3000)
    expected[size - len(data):] = data
    assert mnt.volume("new").read_bytes() == expected
    mnt.stop()
    assert flat_bytes(share / "new", tmp_path, fmt=volume_format) == expected
    if volume_format == "qcow2":
        assert check(share / "new")["exit"] == 0


def test_created_volume_format_survives_remount(share, vfsnap_mount, tmp_path):
    """The format comes from the record made at creation, not from a later probe (invariant 4):
    a raw volume whose guest writes a qcow2 header stays raw."""
    mnt = vfsnap_mount()
    _create_truncate(mnt, "guest", 1 * MiB)
    header = tmp_path / "evil.qcow2"
    create(header, 1 * MiB, backing="/etc/passwd", backing_fmt="raw")
    data = header.read_bytes()
    with open(mnt.volume("guest"), "r+b") as f:
        f.write(data)
    mnt.stop()
    mnt = vfsnap_mount()
    assert os.stat(mnt.volume("guest")).st_size == 1 * MiB
    with open(mnt.volume("guest"), "rb") as f:
        assert f.read(len(data)) == data
    assert sidecar(share, "guest")["format"] == "raw"


@pytest.mark.parametrize("how", ["truncate", "open-creat"])
def test_thick_volumes_are_fully_allocated(how, share, vfsnap_mount):
    mnt = vfsnap_mount("thick")
    size = 10 * MiB
    CREATORS[how](mnt, "thick", size)
    st = os.stat(share / "thick")
    assert st.st_size == size
    assert st.st_blocks * 512 >= size
    # Extending a thick volume allocates the new area too.
    os.truncate(mnt.volume("thick"), 2 * size)
    st = os.stat(share / "thick")
    assert st.st_size == 2 * size
    assert st.st_blocks * 512 >= 2 * size


def test_sparse_volumes_are_sparse(share, vfsnap_mount):
    mnt = vfsnap_mount()
    _create_truncate(mnt, "sparse", 64 * MiB)
    assert os.stat(share / "sparse").st_blocks * 512 < 1 * MiB


def test_write_into_empty_new_volume_is_enospc(share, vfsnap_mount):
    """A new volume made by open(O_CREAT) is a disk of size 0: like a block device, it cannot be
    written past its end (the size is set with truncate), and a write does not grow it."""
    mnt = vfsnap_mount()
    fd = os.open(mnt.volume("empty"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        assert errno_of(os.pwrite, fd, b"x" * 512, 0) == errno.ENOSPC
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    assert os.path.getsize(share / "empty") == 0


def test_create_existing_name_is_eexist(share, vfsnap_mount):
    make_chain(share, "vol", size=1 * MiB, depth=1, writes=_fill)
    mnt = vfsnap_mount()
    assert errno_of(open_close, mnt.volume("vol"), os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    # Without O_EXCL the existing volume is opened, untouched.
    open_close(mnt.volume("vol"), os.O_CREAT | os.O_WRONLY)
    assert os.stat(mnt.volume("vol")).st_size == 1 * MiB
    # A name whose file on the share belongs to another volume (overlay vol.s1 of vol): EEXIST.
    assert errno_of(open_close, mnt.volume("vol.s1"), os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert files_of(share, "vol") == ["vol", "vol.info", "vol.s1", "vol.vfsnap.json"]


@pytest.mark.parametrize("name", ["with space", "x.info", "x.vfsnap.json", "x.vfsnap", ".hidden", "caf\u00e9",
                                  "tab\tname", "a:b", "star*"])
def test_create_bad_name_is_einval(name, share, vfsnap_mount):
    mnt = vfsnap_mount()
    assert errno_of(open_close, mnt.volume(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EINVAL
    result = subprocess.run(["truncate", "-s", "1M", str(mnt.volume(name))],
                            check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "Invalid argument" in result.stderr
    assert os.listdir(share) == []


def test_volume_name_length_limits(share, vfsnap_mount):
    """Volume names: at most 255 - len(".vfsnap.json") = 243 bytes (the sidecar must fit NAME_MAX)."""
    mnt = vfsnap_mount()
    longest = "v" * 243
    _create_truncate(mnt, longest, 1 * MiB)
    assert os.stat(mnt.volume(longest)).st_size == 1 * MiB
    assert files_of(share, longest) == [longest, longest + ".vfsnap.json"]
    for length in (244, 255):
        assert errno_of(open_close, mnt.volume("w" * length), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    # Longer than NAME_MAX: the kernel's (or vfsnap's) ENAMETOOLONG, never a crash.
    assert errno_of(open_close, mnt.volume("w" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert sorted(os.listdir(share)) == [longest, longest + ".vfsnap.json"]


# -- extending and shrinking ---------------------------------------------------------------------


@pytest.mark.parametrize("base_fmt,depth,cluster", [("raw", 0, None), ("qcow2", 0, 4096), ("raw", 2, 512),
                                                    ("qcow2", 2, 65536)],
                         ids=["raw", "qcow2", "raw+2overlays-512", "qcow2+2overlays"])
def test_extend(base_fmt, depth, cluster, share, tmp_path, vfsnap_mount):
    """truncate to a larger size: the active image grows; the new area reads zeros; old data and
    every snapshot view are unchanged; the backing files keep their sizes."""
    size = 3 * MiB
    names = make_chain(share, "vol", size=size, depth=depth, base_fmt=base_fmt, cluster_size=cluster, writes=_fill)
    top_fmt = base_fmt if depth == 0 else "qcow2"
    mnt = vfsnap_mount()
    data = pattern(3, 5000)
    with open(mnt.volume("vol"), "r+b") as f:
        f.seek(size - 1000)
        f.write(data[:1000])
    before = mnt.volume("vol").read_bytes()
    snapshots_before = {f"s{i}": mnt.snapshot("vol", f"s{i}").read_bytes() for i in range(1, depth + 1)}
    new_size = 7 * MiB + 512
    os.truncate(mnt.volume("vol"), new_size)
    assert os.stat(mnt.volume("vol")).st_size == new_size
    with open(mnt.volume("vol"), "r+b") as f:
        assert f.read() == before + bytes(new_size - size)
        f.seek(size - 1000)
        f.write(data)  # across the old end
    expected = before[:size - 1000] + data + bytes(new_size - size - 4000)
    assert mnt.volume("vol").read_bytes() == expected
    for snap, content in snapshots_before.items():
        assert os.stat(mnt.snapshot("vol", snap)).st_size == size
        assert mnt.snapshot("vol", snap).read_bytes() == content
    mnt.stop()
    assert info(share / names[-1])["virtual-size"] == new_size
    for name in names[:-1]:
        assert info(share / name)["virtual-size"] == size, name
    for image in info(share / names[-1], chain=True) if top_fmt == "qcow2" else []:
        if image["format"] == "qcow2":
            assert check(image["filename"])["exit"] == 0, image["filename"]
    assert flat_bytes(share / names[-1], tmp_path, fmt=top_fmt) == expected


def test_extend_qcow2_past_l1_table_cluster(share, tmp_path, vfsnap_mount):
    """With 512-byte clusters one L1 cluster maps 2 MiB: growing past it moves the L1 table."""
    names = make_chain(share, "vol", size=1 * MiB, depth=1, cluster_size=512, writes=_fill)
    mnt = vfsnap_mount()
    before = mnt.volume("vol").read_bytes()
    new_size = 5 * MiB
    os.truncate(mnt.volume("vol"), new_size)
    data = pattern(4, 10000)
    with open(mnt.volume("vol"), "r+b") as f:
        f.seek(new_size - 5000)
        f.write(data[:5000])
        f.seek(1 * MiB - 5000)
        f.write(data[5000:])
    expected = bytearray(before + bytes(new_size - len(before)))
    expected[new_size - 5000:] = data[:5000]
    expected[1 * MiB - 5000:1 * MiB] = data[5000:]
    assert mnt.volume("vol").read_bytes() == expected
    mnt.stop()
    assert check(share / names[-1])["exit"] == 0
    assert info(share / names[-1])["virtual-size"] == new_size
    assert flat_bytes(share / names[-1], tmp_path) == expected


def test_extend_while_open_and_written(share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=1 * MiB, depth=1, cluster_size=4096, writes=_fill)
    mnt = vfsnap_mount()
    fd = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        before = os.pread(fd, 1 * MiB, 0)
        os.ftruncate(fd, 3 * MiB)
        assert os.fstat(fd).st_size == 3 * MiB
        assert os.pwrite(fd, b"\xee" * 8192, 3 * MiB - 4096) == 4096  # clipped at the new end
        os.fsync(fd)
    finally:
        os.close(fd)
    mnt.stop()
    assert flat_bytes(share / names[-1], tmp_path) == before + bytes(2 * MiB - 4096) + b"\xee" * 4096


def test_extend_over_longer_backing_reads_zeros(share, tmp_path, vfsnap_mount):
    """An overlay shorter than its backing file hides the backing's tail; growing the overlay must
    keep hiding it (QEMU's bdrv_co_truncate zero-writes the new area when the backing is longer)."""
    create(share / "vol", 1 * MiB, fmt="raw")
    qemu_io(share / "vol", "write -P 0xaa 900k 64k", fmt="raw")
    create(share / "vol.s1", 512 * KiB, backing="vol", backing_fmt="raw", options="cluster_size=4096")
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    mnt = vfsnap_mount()
    os.truncate(mnt.volume("vol"), 1 * MiB)
    got = mnt.volume("vol").read_bytes()
    assert got[512 * KiB:] == bytes(512 * KiB), "the backing file's old tail shows through the extended area"
    mnt.stop()
    assert flat_bytes(share / "vol.s1", tmp_path)[512 * KiB:] == bytes(512 * KiB)
    assert check(share / "vol.s1")["exit"] == 0


@pytest.mark.parametrize("kind,huge", [
    ("raw", 1 << 50),  # 1 PiB: more than ext4, xfs or tmpfs take in one file
    ("qcow2-512", 1 << 40),  # 256 MiB of L1
    ("qcow2-4k", 10 << 40),  # 40 MiB of L1
], ids=["raw", "qcow2-512", "qcow2-4k"])
def test_extend_beyond_the_format_limit_is_efbig(kind, huge, share, tmp_path, vfsnap_mount):
    """A size the share's filesystem (raw) or a qcow2 L1 table (QEMU's limit: 32 MiB) cannot hold:
    EFBIG, as `qemu-img resize` says ("Failed to grow the L1 table: File too large"); nothing
    changes and nothing leaks."""
    if kind == "raw":
        names = make_chain(share, "vol", size=1 * MiB, depth=0, writes=_fill)
    else:
        names = make_chain(share, "vol", size=1 * MiB, depth=1, cluster_size=512 if kind == "qcow2-512" else 4096,
                           writes=_fill)
    top_fmt = "raw" if kind == "raw" else "qcow2"
    mnt = vfsnap_mount()
    before = mnt.volume("vol").read_bytes()
    assert errno_of(os.truncate, mnt.volume("vol"), huge) == errno.EFBIG
    assert os.stat(mnt.volume("vol")).st_size == 1 * MiB
    with open(mnt.volume("vol"), "r+b") as f:
        f.write(b"still writable")
    mnt.stop()
    assert info(share / names[-1])["virtual-size"] == 1 * MiB
    assert flat_bytes(share / names[-1], tmp_path, fmt=top_fmt) == b"still writable" + before[14:]
    if top_fmt == "qcow2":
        result = check(share / names[-1])
        assert result["exit"] == 0, {k: v for k, v in result.items() if k != "stderr"}


@pytest.mark.parametrize("base_fmt,depth", [("raw", 0), ("qcow2", 0), ("raw", 1)])
def test_shrink_is_eperm(base_fmt, depth, share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=2 * MiB, depth=depth, base_fmt=base_fmt, writes=_fill)
    mnt = vfsnap_mount()
    before = mnt.volume("vol").read_bytes()
    assert errno_of(os.truncate, mnt.volume("vol"), 1 * MiB) == errno.EPERM
    assert errno_of(os.truncate, mnt.volume("vol"), 0) == errno.EPERM
    fd = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        assert errno_of(os.ftruncate, fd, 2 * MiB - 512) == errno.EPERM
    finally:
        os.close(fd)
    # O_TRUNC would truncate the disk to zero: refused too (cp over a volume, dd without notrunc).
    assert errno_of(open_close, mnt.volume("vol"), os.O_WRONLY | os.O_TRUNC) == errno.EPERM
    result = subprocess.run(["truncate", "-s", "1M", str(mnt.volume("vol"))],
                            check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "Operation not permitted" in result.stderr
    # Truncating to the same size is no change, and allowed.
    os.truncate(mnt.volume("vol"), 2 * MiB)
    assert os.stat(mnt.volume("vol")).st_size == 2 * MiB
    assert mnt.volume("vol").read_bytes() == before
    mnt.stop()
    top_fmt = base_fmt if depth == 0 else "qcow2"
    assert info(share / names[-1])["virtual-size"] == 2 * MiB
    assert flat_bytes(share / names[-1], tmp_path, fmt=top_fmt) == before


# -- removing volumes ----------------------------------------------------------------------------


def test_rm_removes_every_file_of_the_volume(share, vfsnap_mount):
    make_chain(share, "keep", size=1 * MiB, depth=1, writes=_fill)
    mnt = vfsnap_mount()
    os.stat(mnt.volume("keep"))
    keep_files = files_of(share, "keep")  # now with the sidecar the mount recorded
    _create_truncate(mnt, "gone", 1 * MiB)
    with open(mnt.volume("gone"), "r+b") as f:
        f.write(b"data")
    assert files_of(share, "gone") == ["gone", "gone.vfsnap.json"]
    os.unlink(mnt.volume("gone"))
    assert files_of(share, "gone") == []
    assert not mnt.volume("gone").exists()
    assert os.listdir(mnt.path / "volumes") == ["keep"]
    assert os.listdir(mnt.path / "snapshots") == ["keep"]
    assert files_of(share, "keep") == keep_files
    # The name can be used again, for a fresh volume.
    _create_truncate(mnt, "gone", 2 * MiB)
    assert mnt.volume("gone").read_bytes() == bytes(2 * MiB)


def test_rm_volume_whose_snapshots_were_deleted(share, vfsnap_mount):
    """A volume without snapshots may still have an overlay (`.info` holds only "active"): rm
    deletes it too, and leaves no file of the volume on the share."""
    make_chain(share, "vol", size=1 * MiB, depth=1, writes=_fill)
    write_info(share, "vol", "vol.s1", {})
    mnt = vfsnap_mount()
    assert os.listdir(mnt.snapshot_dir("vol")) == []
    os.unlink(mnt.volume("vol"))
    assert files_of(share, "vol") == []
    assert os.listdir(share) == []


def test_rm_with_snapshots_is_ebusy(share, vfsnap_mount):
    make_chain(share, "vol", size=1 * MiB, depth=2, writes=_fill)
    mnt = vfsnap_mount()
    with open(mnt.volume("vol"), "rb") as f:  # the first open records the volume (a stat does not)
        f.read(1)
    before = files_of(share, "vol")
    assert "vol.vfsnap.json" in before
    assert errno_of(os.unlink, mnt.volume("vol")) == errno.EBUSY
    assert files_of(share, "vol") == before
    assert os.stat(mnt.volume("vol")).st_size == 1 * MiB


def test_rm_while_open_is_ebusy(share, vfsnap_mount):
    mnt = vfsnap_mount()
    _create_truncate(mnt, "vol", 1 * MiB)
    fd = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        os.pwrite(fd, b"still here", 0)
        assert errno_of(os.unlink, mnt.volume("vol")) == errno.EBUSY
        assert os.pread(fd, 10, 0) == b"still here"
    finally:
        os.close(fd)
    assert files_of(share, "vol") == ["vol", "vol.vfsnap.json"]
    # Open read-only (a backup reading it) counts as open too.
    fd = os.open(mnt.volume("vol"), os.O_RDONLY)
    try:
        assert errno_of(os.unlink, mnt.volume("vol")) == errno.EBUSY
    finally:
        os.close(fd)
    os.unlink(mnt.volume("vol"))
    assert files_of(share, "vol") == []


def test_rm_snapshot_file_is_refused(share, vfsnap_mount):
    make_chain(share, "vol", size=1 * MiB, depth=1, writes=_fill)
    mnt = vfsnap_mount()
    os.stat(mnt.snapshot("vol", "s1"))
    before = files_of(share, "vol")
    assert errno_of(os.unlink, mnt.snapshot("vol", "s1")) in (errno.EROFS, errno.EPERM)
    assert files_of(share, "vol") == before


# -- read-only mounts and snapshot files -----------------------------------------------------------


def test_read_only_mount_refuses_every_change(share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=1 * MiB, depth=1, writes=_fill)
    create(share / "plain", 1 * MiB, fmt="raw")
    listing = sorted(os.listdir(share))
    stamps = {n: os.stat(share / n).st_mtime_ns for n in listing}
    mnt = vfsnap_mount("ro")
    before = mnt.volume("vol").read_bytes()
    for name in ("vol", "plain"):
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            assert errno_of(open_close, mnt.volume(name), flags) == errno.EROFS, (name, flags)
        assert errno_of(os.truncate, mnt.volume(name), 2 * MiB) == errno.EROFS
        assert errno_of(os.unlink, mnt.volume(name)) == errno.EROFS
    assert errno_of(open_close, mnt.volume("new"), os.O_CREAT | os.O_WRONLY) == errno.EROFS
    result = subprocess.run(["truncate", "-s", "1M", str(mnt.volume("new2"))],
                            check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    assert mnt.volume("vol").read_bytes() == before
    mnt.stop()
    assert sorted(os.listdir(share)) == listing
    assert {n: os.stat(share / n).st_mtime_ns for n in listing} == stamps
    assert flat_bytes(share / names[-1], tmp_path) == before


def test_snapshot_files_refuse_writes(share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=1 * MiB, depth=2, writes=_fill)
    mnt = vfsnap_mount()
    contents = {}
    for snap in ("s1", "s2"):
        path = mnt.snapshot("vol", snap)
        before = contents[snap] = path.read_bytes()
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            assert errno_of(open_close, path, flags) == errno.EROFS, (snap, flags)
        assert errno_of(os.truncate, path, 2 * MiB) == errno.EROFS
        assert path.read_bytes() == before
    # Creating files under snapshots/: EPERM (DESIGN.md section 2).
    assert errno_of(open_close, mnt.snapshot_dir("vol", "s1") / "other", os.O_CREAT | os.O_WRONLY) == errno.EPERM
    mnt.stop()
    assert (share / names[0]).read_bytes() == contents["s1"]
    assert flat_bytes(share / names[1], tmp_path) == contents["s2"]
    for name in names[1:]:
        assert check(share / name)["exit"] == 0


# -- renaming volumes ----------------------------------------------------------------------------


def test_mv_renames_every_file_of_the_chain(share, tmp_path, vfsnap_mount):
    make_chain(share, "a", size=1 * MiB, depth=2, writes=_fill)
    mnt = vfsnap_mount()
    live = mnt.volume("a").read_bytes()
    snaps = {s: mnt.snapshot("a", s).read_bytes() for s in ("s1", "s2")}
    os.rename(mnt.volume("a"), mnt.volume("b"))
    assert os.listdir(mnt.path / "volumes") == ["b"]
    assert mnt.volume("b").read_bytes() == live
    assert {s: mnt.snapshot("b", s).read_bytes() for s in ("s1", "s2")} == snaps
    mnt.stop()
    assert files_of(share, "a") == []
    assert files_of(share, "b") == ["b", "b.info", "b.s1", "b.s2", "b.vfsnap.json"]
    assert json.loads((share / "b.info").read_text()) == {"active": "b.s2", "s1": "b.s1", "s2": "b.s2"}
    chain = info(share / "b.s2", chain=True)
    assert [os.path.basename(i["filename"]) for i in chain] == ["b.s2", "b.s1", "b"]
    assert [i.get("backing-filename") for i in chain] == ["b.s1", "b", None]
    assert flat_bytes(share / "b.s2", tmp_path) == live
    for name in ("b.s1", "b.s2"):
        assert check(share / name)["exit"] == 0
    assert sidecar(share, "b")["format"] == "raw"


def test_mv_new_name_works_at_once(share, vfsnap_mount):
    """`mv a b && qemu-img info b`: the kernel keeps the inode it looked up as `a` under the name
    `b`, so that inode must stay valid (as on any filesystem), not only a fresh lookup of `b`."""
    mnt = vfsnap_mount()
    _create_truncate(mnt, "a", 1 * MiB)
    with open(mnt.volume("a"), "r+b") as f:
        f.write(b"payload")
    os.rename(mnt.volume("a"), mnt.volume("b"))
    assert os.stat(mnt.volume("b")).st_size == 1 * MiB
    assert mnt.volume("b").read_bytes()[:7] == b"payload"
    assert not mnt.volume("a").exists()
    assert sorted(os.listdir(share)) == ["b", "b.vfsnap.json"]


def test_mv_volume_without_snapshots(share, vfsnap_mount):
    mnt = vfsnap_mount()
    _create_truncate(mnt, "a", 1 * MiB)
    with open(mnt.volume("a"), "r+b") as f:
        f.write(b"payload")
    os.rename(mnt.volume("a"), mnt.volume("b"))
    assert os.listdir(mnt.path / "volumes") == ["b"]  # readdirplus refreshes the entry of b
    assert mnt.volume("b").read_bytes()[:7] == b"payload"
    assert sorted(os.listdir(share)) == ["b", "b.vfsnap.json"]


def test_mv_while_open_is_ebusy(share, vfsnap_mount):
    make_chain(share, "a", size=1 * MiB, depth=1, writes=_fill)
    mnt = vfsnap_mount()
    fd = os.open(mnt.volume("a"), os.O_RDONLY)
    before = files_of(share, "a")
    try:
        assert errno_of(os.rename, mnt.volume("a"), mnt.volume("b")) == errno.EBUSY
    finally:
        os.close(fd)
    assert files_of(share, "a") == before
    os.rename(mnt.volume("a"), mnt.volume("b"))  # once closed, it works
