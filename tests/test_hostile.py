"""Hostile input never breaks out or takes the daemon down (issue #6, docs/security.md).

Who is hostile here: a guest (it controls every byte of its own volume's data), whoever can
write the share (image metadata, `.info`, sidecars, file types, names) and the local users of a
mount made with `-o allow_other`. Every test builds one concrete hostile image, file or request
and checks the errno it gets AND that no byte from outside the chain shows up in any read
(`MARKER` fills every file the hostile input points at). Accesses run under a watchdog that
kills the daemon if it hangs (the blocked read then fails, and so does the test).

Not repeated here (see tests/test_read_malformed.py): malformed header fields, bad L2/L1
entries, backing names with paths, loops, the depth limit and symlinked overlays.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import random
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import Mount, requires_commands, requires_fuse, wait_for
from tests.qemu import (
    create,
    flat_bytes,
    info,
    l2_entry_offset,
    qcow2_header,
    qemu_img,
    qemu_io,
    read_u64,
    set_header_field,
    write_info,
    write_u64,
)

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20
CS = 64 * KiB
SIZE = 4 * MiB
MARKER = b"HOSTILE-OUTSIDE-BYTES!"
OFFSET_MASK = 0x00FFFFFFFFFFFE00


# -- helpers -------------------------------------------------------------------------------------


def marker_file(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.write((MARKER * (size // len(MARKER) + 1))[:size])
    return path


@contextmanager
def watchdog(mnt: Mount, seconds: float = 10.0):
    """Kill the daemon if the block takes longer than `seconds` (a hang), and fail the test.

    Killing the daemon aborts the FUSE connection, so a read blocked in this process returns.
    """
    fired = threading.Event()

    def fire():
        fired.set()
        if mnt.process is not None:
            mnt.process.kill()

    timer = threading.Timer(seconds, fire)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        assert not fired.is_set(), f"vfsnap did not answer within {seconds} s and was killed"


def attempt(path: Path | str, offset: int = 0, length: int = 64 * KiB) -> tuple[int | None, bytes]:
    """(errno of the first failing step or None, bytes read): open, then one O_DIRECT pread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return exc.errno, b""
    try:
        return None, os.pread(fd, length, offset)
    except OSError as exc:
        return exc.errno, b""
    finally:
        os.close(fd)


def read_everything(path: Path | str, chunk: int = MiB) -> tuple[bytes, set[int]]:
    """All readable bytes of a file (O_DIRECT, chunk by chunk) and the errnos of what failed."""
    errors: set[int] = set()
    out = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return b"", {exc.errno}
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, chunk):
            try:
                out.append(os.pread(fd, chunk, offset))
            except OSError as exc:
                errors.add(exc.errno)
    finally:
        os.close(fd)
    return b"".join(out), errors


def name_of(code: int | None) -> str:
    return "success" if code is None else errno.errorcode.get(code, str(code))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def guest_write(path: Path, offset: int, data: bytes) -> None:
    """What a guest does: write through the mounted volume, and flush."""
    fd = os.open(path, os.O_RDWR)
    try:
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(fd, view, pos)
            view, pos = view[n:], pos + n
        os.fsync(fd)
    finally:
        os.close(fd)


def new_volume(mnt: Mount, name: str, data: bytes) -> None:
    """Create a volume through the mount (O_CREAT, then grow it: writes past the end are refused)."""
    with open(mnt.volume(name), "xb") as f:
        f.truncate(len(data))
        f.write(data)


def sidecar(share: Path, volume: str) -> dict:
    return json.loads((share / f"{volume}.vfsnap.json").read_bytes())


def expect_errno(code: int | tuple[int, ...], func, *args):
    codes = code if isinstance(code, tuple) else (code,)
    with pytest.raises(OSError) as exc:
        func(*args)
    assert exc.value.errno in codes, (
        f"{getattr(func, '__name__', func)}{args}: {name_of(exc.value.errno)}, not {'/'.join(map(name_of, codes))}")


def make_good(share: Path) -> bytes:
    """A healthy control volume `good` (a qcow2 chain with data); returns what it must read as."""
    create(share / "good", 2 * MiB)
    qemu_io(share / "good", "write -P 0x61 0 300k")
    create(share / "good.s1", 2 * MiB, backing="good", backing_fmt="qcow2")
    qemu_io(share / "good.s1", "write -P 0x62 1M 100k")
    write_info(share, "good", "good.s1", {"s1": "good.s1"})
    data = bytearray(b"\x61" * (300 * KiB) + bytes(2 * MiB - 300 * KiB))
    data[MiB:MiB + 100 * KiB] = b"\x62" * (100 * KiB)
    return bytes(data)


def assert_good(mnt: Mount, good: bytes) -> None:
    assert mnt.volume("good").read_bytes() == good, "the healthy volume no longer reads as before"
    err, data = attempt(mnt.volume("good"), 12345, 100000)
    assert err is None and data == good[12345:112345]
    assert mnt.process.poll() is None, "the daemon died"


# -- 1. formats are never probed after vfsnap's first record (invariant 4) -------------------------


def evil_qcow2(tmp_path: Path, backing: str, *, size: int = SIZE, dirty: bool = False) -> bytes:
    """A complete, valid qcow2 image of `size` bytes naming `backing` (raw) as its backing file, with
    one 64 KiB data cluster of 0x5a at 1 MiB: what a guest writes to make its disk look like qcow2."""
    path = tmp_path / f"evil-{os.urandom(4).hex()}.qcow2"
    create(path, size, options="lazy_refcounts=on" if dirty else None)
    qemu_io(path, f"write -P 0x5a {MiB} {CS}")
    qemu_img("rebase", "-u", "-b", backing, "-F", "raw", str(path))
    if dirty:
        set_header_field(path, "incompatible_features", qcow2_header(path)["incompatible_features"] | 1)
    data = path.read_bytes()
    assert data[:4] == b"QFI\xfb" and backing.encode() in data[:CS]
    return data


def backing_target(kind: str, share: Path, tmp_path: Path) -> str:
    if kind == "absolute-host-file":
        return str(marker_file(tmp_path / "host-secret"))
    marker_file(share / "victim")  # another volume on the same share
    return "victim"


def check_raw_views(mnt: Mount, share: Path, expected: bytes, views: list[Path]) -> None:
    for path in views:
        data, errors = read_everything(path)
        assert not errors, f"{path}: reads failed with {sorted(map(name_of, errors))}"
        assert MARKER not in data, f"{path}: shows the bytes of the file the guest's header names"
        assert data == expected, f"{path}: does not read as the raw bytes the guest wrote"


@pytest.mark.parametrize("origin", ["met", "created"])
@pytest.mark.parametrize("backing", ["absolute-host-file", "other-volume"])
def test_guest_written_qcow2_header_stays_raw(backing, origin, share, tmp_path, vfsnap_mount):
    """A raw volume whose guest writes a valid qcow2 image (backing: a host file, or another volume
    of the share) into its first clusters stays raw: live view, snapshot view, after remounts."""
    target = backing_target(backing, share, tmp_path)
    if origin == "met":
        create(share / "vol", SIZE, fmt="raw")
    mnt = vfsnap_mount()
    if origin == "created":
        with open(mnt.volume("vol"), "xb") as f:  # O_CREAT through the mount: recorded at creation
            f.truncate(SIZE)
    assert mnt.volume("vol").read_bytes() == bytes(SIZE)
    assert sidecar(share, "vol")["format"] == "raw", "vfsnap's first record of the volume"

    evil = evil_qcow2(tmp_path, target)
    guest_write(mnt.volume("vol"), 0, evil)
    expected = evil + bytes(SIZE - len(evil))
    with watchdog(mnt):
        check_raw_views(mnt, share, expected, [mnt.volume("vol")])
        assert os.stat(mnt.volume("vol")).st_size == SIZE
        assert os.getxattr(mnt.volume("vol"), "user.vfsnap.format") == b"raw"

        os.mkdir(mnt.snapshot_dir("vol", "s1"))
        check_raw_views(mnt, share, expected, [mnt.volume("vol"), mnt.snapshot("vol", "s1")])
    overlay = info(share / "vol.s1")
    assert overlay["backing-filename"] == "vol"
    assert overlay["backing-filename-format"] == "raw", "the snapshot overlay must record the base as raw"
    assert flat_bytes(share / "vol.s1", tmp_path) == expected, "qemu-img reads the chain as raw too"
    assert (share / "vol").read_bytes() == expected, "the base file on the share was changed"

    for _ in range(2):  # remounts: the record, not the bytes, decides
        mnt.stop()
        mnt = vfsnap_mount()
        with watchdog(mnt):
            check_raw_views(mnt, share, expected, [mnt.volume("vol"), mnt.snapshot("vol", "s1")])
        assert sidecar(share, "vol")["format"] == "raw"
    assert (share / "vol").read_bytes() == expected
    assert MARKER not in (share / "vol.s1").read_bytes()


@pytest.mark.parametrize("options", ["", "ro"])
@pytest.mark.parametrize("backing", ["absolute-host-file", "other-volume"])
def test_unrecorded_raw_volume_with_a_qcow2_header_stays_confined(backing, options, share, tmp_path, vfsnap_mount):
    """A volume vfsnap meets for the first time after its guest wrote a qcow2 header (the hypervisor
    writes the share file directly, as Cinder attaches volumes): the probe at the first meeting
    takes it for qcow2, but a base may have no backing file, so nothing outside it is ever served."""
    good = make_good(share)
    target = backing_target(backing, share, tmp_path)
    evil = evil_qcow2(tmp_path, target)
    (share / "vol").write_bytes(evil + bytes(SIZE - len(evil)))
    mnt = vfsnap_mount(options)
    with watchdog(mnt):
        for _ in range(2):
            err, data = attempt(mnt.volume("vol"))
            assert err in (None, errno.EIO), name_of(err)
            assert MARKER not in data
        assert MARKER not in read_everything(mnt.volume("vol"))[0]
        assert_good(mnt, good)
    assert (share / "vol").read_bytes()[:len(evil)] == evil


def test_guest_written_dirty_qcow2_header_is_not_repaired_at_mount(share, tmp_path, vfsnap_mount):
    """A guest that writes a qcow2 v3 header with the dirty bit set into its raw disk: the next mount
    must not take the raw base for a crashed qcow2 image and "repair" (rewrite) the guest's data."""
    create(share / "vol", SIZE, fmt="raw")
    marker_file(share / "victim")
    mnt = vfsnap_mount()
    assert mnt.volume("vol").read_bytes() == bytes(SIZE)
    evil = evil_qcow2(tmp_path, "victim", dirty=True)
    guest_write(mnt.volume("vol"), 0, evil)
    expected = evil + bytes(SIZE - len(evil))
    mnt.stop()
    assert (share / "vol").read_bytes() == expected
    mnt = vfsnap_mount()
    with watchdog(mnt):
        assert os.stat(mnt.volume("vol")).st_size == SIZE, "the raw volume changed size"
        check_raw_views(mnt, share, expected, [mnt.volume("vol")])
    assert "refcounts rebuilt" not in mnt.log(), "vfsnap treated the raw base as a qcow2 image"
    assert (share / "vol").read_bytes() == expected, "vfsnap rewrote the guest's raw disk on the share"


def test_overlay_claiming_qcow2_for_a_raw_recorded_base_is_eio(share, tmp_path, vfsnap_mount):
    """The record wins over an overlay's backing-format field: a raw base (holding a qcow2 header its
    guest wrote) recorded as raw, under an overlay that declares it qcow2 → EIO, no qcow2 reading."""
    good = make_good(share)
    create(share / "vol", SIZE, fmt="raw")
    marker_file(share / "victim")
    mnt = vfsnap_mount()
    assert mnt.volume("vol").read_bytes() == bytes(SIZE)
    guest_write(mnt.volume("vol"), 0, evil_qcow2(tmp_path, "victim"))
    mnt.stop()
    assert sidecar(share, "vol")["format"] == "raw"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "vol", "-F", "qcow2", str(share / "vol.s1"), str(SIZE))
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})

    mnt = vfsnap_mount()
    with watchdog(mnt):
        for path in (mnt.volume("vol"), mnt.snapshot("vol", "s1")):
            for attempt_no in (1, 2):
                err, data = attempt(path)
                assert err == errno.EIO, f"{path} (try {attempt_no}): {name_of(err)}, not EIO"
            data, _ = read_everything(path)
            assert MARKER not in data
        assert_good(mnt, good)
    assert sidecar(share, "vol")["format"] == "raw"
    assert any(" ERROR " in line and "vol" in line and "raw" in line for line in mnt.log().splitlines()), \
        "the conflict between the overlay and the record is logged"


# -- 2. names (DESIGN.md section 2, vfsnap/names.py) -----------------------------------------------


@pytest.fixture
def names_mnt(share, vfsnap_mount):
    create(share / "vol", MiB, fmt="raw")
    qemu_io(share / "vol", "write -P 0x71 0 1M", fmt="raw")
    return vfsnap_mount()


CONTROL_AND_UNICODE = [
    "a\tb", "a\nb", "\x01", "x\x7f", "esc\x1b[31m", "tail\r", "é", "ｓｎａｐ", "zero\u200bwidth", "a\u202eb",
    "ü-umlaut", "...", "a b",
]


def _share_listing(share: Path) -> set[str]:
    return set(os.listdir(share))


@pytest.mark.parametrize("name", CONTROL_AND_UNICODE + [b"\xff\xfe", b"ok\x80"], ids=repr)
def test_snapshot_names_with_control_or_unicode_characters_are_einval(names_mnt, share, name):
    before = _share_listing(share)
    path = os.fsencode(names_mnt.snapshot_dir("vol")) + b"/" + (name if isinstance(name, bytes) else name.encode())
    expect_errno(errno.EINVAL, os.mkdir, path)
    assert _share_listing(share) == before, "a refused snapshot left files on the share"
    assert os.listdir(names_mnt.snapshot_dir("vol")) == []


@pytest.mark.parametrize("name", CONTROL_AND_UNICODE + [b"\xff", b"vol\x80"], ids=repr)
def test_volume_names_with_control_or_unicode_characters_are_einval(names_mnt, share, name):
    before = _share_listing(share)
    path = os.fsencode(names_mnt.path / "volumes") + b"/" + (name if isinstance(name, bytes) else name.encode())
    expect_errno(errno.EINVAL, os.open, path, os.O_CREAT | os.O_WRONLY | os.O_EXCL)
    assert _share_listing(share) == before
    assert os.listdir(names_mnt.path / "volumes") == ["vol"]


def test_dot_and_dotdot_never_name_a_volume_or_snapshot(names_mnt, share):
    before = _share_listing(share)
    expect_errno(errno.EEXIST, os.mkdir, names_mnt.snapshot_dir("vol") / "..")
    expect_errno(errno.EEXIST, os.mkdir, names_mnt.snapshot_dir("vol") / ".")
    expect_errno(errno.EINVAL, os.mkdir, names_mnt.snapshot_dir("vol") / "..x")
    expect_errno(errno.EINVAL, os.open, names_mnt.path / "volumes" / "..x", os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.EINVAL, os.open, names_mnt.path / "volumes" / ".vfsnap-tmp-0123456789abcdef",
                 os.O_CREAT | os.O_WRONLY)
    # `..` inside the tree stays inside the tree.
    assert os.path.samestat(os.stat(names_mnt.snapshot_dir("vol") / ".." / ".." / "volumes"),
                            os.stat(names_mnt.path / "volumes"))
    assert _share_listing(share) == before


def test_hostile_names_planted_on_the_share_are_not_served(share, tmp_path, vfsnap_mount):
    good = make_good(share)
    planted = ["a\nb", "é", "sp ace", ".hidden", "x.info", "y.vfsnap.json", "z.vfsnap", "q?", "v" * 250,
               ".vfsnap-tmp-0123456789abcdef"]
    for name in planted:
        marker_file(share / name, 4096)
    os.close(os.open(os.fsencode(share) + b"/raw\xff", os.O_CREAT | os.O_WRONLY, 0o644))
    mnt = vfsnap_mount()
    with watchdog(mnt):
        listed = os.listdir(mnt.path / "volumes")
        assert sorted(listed) == ["good"], f"planted names listed as volumes: {listed}"
        assert sorted(os.listdir(mnt.path / "snapshots")) == ["good"]
        for name in planted:
            err, _ = attempt(mnt.path / "volumes" / name)
            assert err in (errno.ENOENT, errno.EINVAL), f"{name!r}: {name_of(err)}"
        assert_good(mnt, good)


def test_volume_names_at_the_limits(names_mnt, share):
    mnt = names_mnt
    longest = "v" * 243  # NAME_MAX minus ".vfsnap.json": the sidecar must fit in NAME_MAX
    with open(mnt.volume(longest), "xb") as f:
        f.truncate(MiB)
    assert longest in os.listdir(mnt.path / "volumes")
    assert (share / f"{longest}.vfsnap.json").exists()
    before = _share_listing(share)
    for length in (244, 250, 255):
        expect_errno(errno.ENAMETOOLONG, os.open, mnt.volume("v" * length), os.O_CREAT | os.O_WRONLY)
    expect_errno(errno.ENAMETOOLONG, os.open, mnt.volume("v" * 256), os.O_CREAT | os.O_WRONLY)
    assert _share_listing(share) == before
    # `<vol>.<snap>` must fit in NAME_MAX: 243 + 1 + 11 = 255 bytes.
    os.mkdir(mnt.snapshot_dir(longest, "s" * 11))
    assert (share / f"{longest}.{'s' * 11}").exists()
    before = _share_listing(share)
    expect_errno(errno.ENAMETOOLONG, os.mkdir, mnt.snapshot_dir(longest, "t" * 12))
    assert _share_listing(share) == before
    assert sorted(os.listdir(mnt.snapshot_dir(longest))) == ["latest", "s" * 11]
    assert mnt.snapshot(longest, "s" * 11).read_bytes() == bytes(MiB)


def test_snapshot_names_at_the_limits(names_mnt, share):
    mnt = names_mnt
    for name in ("x", "-", "_", "0", "S" * 64):
        os.mkdir(mnt.snapshot_dir("vol", name))
        assert mnt.snapshot("vol", name).read_bytes() == b"\x71" * MiB
    # A volume of 190 bytes takes a 64-byte snapshot (190 + 1 + 64 = 255), one of 191 does not.
    for length, ok in ((190, True), (191, False)):
        volume = "w" * length
        with open(mnt.volume(volume), "xb") as f:
            f.truncate(MiB)
        if ok:
            os.mkdir(mnt.snapshot_dir(volume, "k" * 64))
            assert os.listdir(mnt.snapshot_dir(volume, "k" * 64)) == [volume]
        else:
            before = _share_listing(share)
            expect_errno(errno.ENAMETOOLONG, os.mkdir, mnt.snapshot_dir(volume, "k" * 64))
            assert _share_listing(share) == before


@pytest.mark.parametrize("volume,snapshot", [("a", "b"), ("a.", "b"), ("x.y", "z")])
def test_volume_and_snapshot_file_collisions_both_orders(volume, snapshot, share, vfsnap_mount):
    """Volume `<vol>.<snap>` against snapshot `<snap>` of `<vol>`: whichever comes second is EEXIST,
    and the first keeps its data."""
    mnt = vfsnap_mount()
    other = f"{volume}.{snapshot}"

    # Order 1: the volume `<vol>.<snap>` exists, then the snapshot is asked for.
    for name, byte in ((volume, 0x41), (other, 0x42)):
        new_volume(mnt, name, bytes([byte]) * MiB)
    expect_errno(errno.EEXIST, os.mkdir, mnt.snapshot_dir(volume, snapshot))
    assert os.listdir(mnt.snapshot_dir(volume)) == []
    assert mnt.volume(other).read_bytes() == b"\x42" * MiB
    assert mnt.volume(volume).read_bytes() == b"\x41" * MiB
    os.unlink(mnt.volume(other))

    # Order 2: the snapshot exists, then a volume of that name is created or renamed to it.
    os.mkdir(mnt.snapshot_dir(volume, snapshot))
    with open(mnt.volume(volume), "r+b") as f:
        f.write(b"\x43" * 4096)
    expect_errno(errno.EEXIST, os.open, mnt.volume(other), os.O_CREAT | os.O_WRONLY)
    new_volume(mnt, "spare", b"\x44" * MiB)
    expect_errno(errno.EEXIST, os.rename, mnt.volume("spare"), mnt.volume(other))
    assert other not in os.listdir(mnt.path / "volumes")
    assert mnt.snapshot(volume, snapshot).read_bytes() == b"\x41" * MiB
    assert mnt.volume(volume).read_bytes()[:8192] == b"\x43" * 4096 + b"\x41" * 4096
    assert mnt.volume("spare").read_bytes() == b"\x44" * MiB


def test_volume_colliding_with_planted_info_or_sidecar_is_eexist(share, tmp_path, vfsnap_mount):
    """Files left on the share under a new volume's `.info`/sidecar names are not adopted: a planted
    `.info` naming another file as active would otherwise serve that file as the new volume."""
    marker_file(share / "victim")
    (share / "new.info").write_text(json.dumps({"active": "victim"}))
    (share / "new2.vfsnap.json").write_text(json.dumps({"format": "qcow2", "version": 1, "snapshots": {}}))
    mnt = vfsnap_mount()
    for name in ("new", "new2"):
        expect_errno(errno.EEXIST, os.open, mnt.volume(name), os.O_CREAT | os.O_WRONLY)
        assert name not in os.listdir(mnt.path / "volumes")
    assert json.loads((share / "new.info").read_text()) == {"active": "victim"}


def test_snapshot_named_info_cannot_clobber_the_info_file(share, vfsnap_mount):
    create(share / "a", MiB, fmt="raw")
    qemu_io(share / "a", "write -P 0x61 0 1M", fmt="raw")
    mnt = vfsnap_mount()
    expect_errno((errno.EINVAL, errno.EEXIST), os.mkdir, mnt.snapshot_dir("a", "info"))
    mnt.stop()
    mnt = vfsnap_mount()
    assert mnt.volume("a").read_bytes() == b"\x61" * MiB
    if (share / "a.info").exists():
        assert json.loads((share / "a.info").read_text())["active"] == "a"


@pytest.mark.parametrize("document", [
    {"active": "/ABS"},
    {"active": "../outside"},
    {"active": "victim"},
    {"active": "vol.s1/../../outside"},
    {"active": "vol", "s1": "victim"},
    {"active": "vol", "s1": "/ABS"},
    {"active": "vol", "..": "vol"},
    {"active": "vol", "s1": "vol", "s\n2": "vol"},
    "huge",
], ids=lambda d: d if isinstance(d, str) else json.dumps(d))
def test_hostile_info_names_fail_only_that_volume(document, share, tmp_path, vfsnap_mount):
    """`.info` names outside the volume's own files (paths, other volumes, bad snapshot ids, a huge
    document) → EIO for that volume's views; nothing from the named files is served."""
    good = make_good(share)
    outside = marker_file(tmp_path / "outside")
    marker_file(share / "victim")
    create(share / "vol", SIZE, fmt="raw")
    if document == "huge":
        text = json.dumps({"active": "vol", **{f"s{i}": "vol" for i in range(200000)}})
        assert len(text) > 2 * MiB
    else:
        text = json.dumps(document).replace("/ABS", str(outside))
    (share / "vol.info").write_text(text)
    mnt = vfsnap_mount()
    with watchdog(mnt, 30):
        live_broken = document == "huge" or document.get("active") != "vol" or any(
            not k.isalnum() for k in document if k != "active")
        err, data = attempt(mnt.volume("vol"))
        if live_broken:
            assert err in (errno.EIO, errno.ENOENT), f"live view: {name_of(err)}"
        else:
            assert err is None and data == bytes(64 * KiB)
        snapdir = mnt.snapshot_dir("vol")
        try:
            snaps = [s for s in os.listdir(snapdir) if s != "latest"]
        except OSError as exc:
            assert exc.errno in (errno.EIO, errno.ENOENT)
            snaps = []
        for snap in snaps:
            err, _ = attempt(mnt.snapshot("vol", snap))
            assert err in (errno.EIO, errno.ENOENT), f"snapshot {snap!r}: {name_of(err)}"
            assert MARKER not in read_everything(mnt.snapshot("vol", snap))[0]
        assert MARKER not in read_everything(mnt.volume("vol"))[0]
        assert_good(mnt, good)
        if "victim" not in text:  # (an `.info` naming a file makes it an image of that volume, not a volume)
            assert mnt.volume("victim").read_bytes()[:len(MARKER)] == MARKER


# -- 3. files on the share that are not regular files -----------------------------------------------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.mkdir()


def _socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # the socket file stays


def _symlink_out(path: Path) -> None:
    os.symlink(path.parent.parent / "outside" / path.name, path)


NON_REGULAR = {"fifo": _fifo, "directory": _directory, "socket": _socket, "symlink-outside": _symlink_out}
ROLES = ["volume", "sidecar", "info", "overlay"]

# Known product bugs, with the cases they block (see the report in docs/security.md).
_SIDECAR_BUG = ("product bug: a non-regular `<vol>.vfsnap.json` makes Share.volumes_with_journal raise outside "
                "any per-volume try, so the whole mount fails (vfsnap/share/share.py volumes_with_journal)")
_OPEN_BUG = ("product bug: ShareDir.open_regular re-raises OSErrors other than ELOOP/ENOENT (EISDIR, ENXIO) "
             "unconverted: EISDIR to the reader, or a traceback that stops the mount (vfsnap/share/files.py)")
KNOWN_BUGS = {
    ("fifo", "sidecar"): _SIDECAR_BUG,
    ("directory", "sidecar"): _SIDECAR_BUG,
    ("socket", "sidecar"): _SIDECAR_BUG,
    ("symlink-outside", "sidecar"): _SIDECAR_BUG,
    ("directory", "overlay"): _OPEN_BUG,
    ("socket", "overlay"): _OPEN_BUG,
    ("socket", "info"): _OPEN_BUG + "; here Share._overlays_named_by lets the ENXIO out of volume_names",
}


def _non_regular_params():
    for kind in NON_REGULAR:
        for role in ROLES:
            yield pytest.param(kind, role, id=f"{kind}-as-{role}")


@pytest.mark.parametrize("kind,role", list(_non_regular_params()))
def test_non_regular_files_on_the_share(kind, role, share, tmp_path, vfsnap_mount):
    """A FIFO, directory, socket or symlink (to a file outside the share) named like a volume, a
    sidecar, a `.info` or an overlay: never opened as a file, never followed, never a hang; the
    volume it belongs to fails with EIO (or is not a volume at all), the others keep working."""
    good = make_good(share)
    outside = tmp_path / "outside"
    outside.mkdir()
    # What a followed symlink would find: marker bytes, a sidecar saying qcow2, an `.info` naming the
    # marker file as the active image.
    for name in ("ghost", "vol", "vol.s1"):
        marker_file(outside / name)
    (outside / "vol.vfsnap.json").write_text(json.dumps({"format": "qcow2", "version": 1, "snapshots": {}}))
    (outside / "vol.info").write_text(json.dumps({"active": str(outside / "ghost")}))

    if role == "volume":
        NON_REGULAR[kind](share / "ghost")
        volume = None
    else:
        create(share / "vol", SIZE, fmt="raw")
        qemu_io(share / "vol", f"write -P 0x33 0 {SIZE}", fmt="raw")
        if role == "overlay":
            write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
        NON_REGULAR[kind](share / {"sidecar": "vol.vfsnap.json", "info": "vol.info", "overlay": "vol.s1"}[role])
        volume = "vol"

    mnt = vfsnap_mount()
    with watchdog(mnt):
        listed = os.listdir(mnt.path / "volumes")
        if volume is None:
            assert sorted(listed) == ["good"], f"a {kind} was listed as a volume: {listed}"
            err, _ = attempt(mnt.path / "volumes" / "ghost")
            assert err == errno.ENOENT, f"lookup of the {kind}: {name_of(err)}"
        else:
            views = [mnt.volume(volume)] + ([mnt.snapshot(volume, "s1")] if role == "overlay" else [])
            for path in views:
                for attempt_no in (1, 2):
                    err, _ = attempt(path)
                    assert err == errno.EIO, f"{path} (try {attempt_no}) with a {kind} as its {role}: {name_of(err)}"
                assert MARKER not in read_everything(path)[0]
        assert_good(mnt, good)
    for name in ("ghost", "vol", "vol.s1"):
        assert (outside / name).read_bytes()[:len(MARKER)] == MARKER, "a file outside the share was written"
    assert sorted(os.listdir(outside)) == ["ghost", "vol", "vol.info", "vol.s1", "vol.vfsnap.json"]
    assert not mnt.unexpected_errors(), mnt.unexpected_errors()


@pytest.mark.allow_daemon_errors
def test_fifo_sidecar_on_a_read_only_mount(share, vfsnap_mount):
    good = make_good(share)
    create(share / "vol", SIZE, fmt="raw")
    os.mkfifo(share / "vol.vfsnap.json")
    mnt = vfsnap_mount("ro")
    wait_for(lambda: "background tasks running" in mnt.log() or mnt.process.poll() is not None,
             "the daemon's background tasks to start")
    with watchdog(mnt):
        assert mnt.process.poll() is None, "the daemon died"
        assert attempt(mnt.volume("vol"))[0] == errno.EIO
        assert_good(mnt, good)
    assert not mnt.unexpected_errors(), mnt.unexpected_errors()


# -- 4. isolation and bounds --------------------------------------------------------------------------


def _big_l1_image(path: Path, l1_bytes: int) -> None:
    """A valid qcow2 with 512-byte clusters whose L1 table is `l1_bytes` long (each L1 entry maps
    64 * 512 bytes), with data at its start."""
    create(path, l1_bytes // 8 * 64 * 512, options="cluster_size=512")
    qemu_io(path, "write -P 0x77 0 64k")
    assert qcow2_header(path)["l1_size"] * 8 == l1_bytes


def test_l1_larger_than_table_cache_fails_alone(share, tmp_path, vfsnap_mount):
    """Images whose L1 tables (4 MiB each, virtual size 16 GiB) exceed `table_cache_size=1M`: EIO for
    those volumes only, as the base of a chain too; smaller images and other volumes still read."""
    good = make_good(share)
    _big_l1_image(share / "big", 4 * MiB)
    _big_l1_image(share / "bigbase", 4 * MiB)
    create(share / "bigbase.s1", 16 * 1024 * MiB, backing="bigbase", backing_fmt="qcow2", options="cluster_size=64k")
    write_info(share, "bigbase", "bigbase.s1", {"s1": "bigbase.s1"})
    create(share / "small", 8 * MiB, options="cluster_size=512")  # 2 KiB of L1: fits
    qemu_io(share / "small", "write -P 0x78 0 1M")
    rss_before = None
    mnt = vfsnap_mount("table_cache_size=1M")
    with watchdog(mnt, 30):
        rss_before = rss_bytes(mnt.process.pid)
        for path in (mnt.volume("big"), mnt.volume("bigbase"), mnt.snapshot("bigbase", "s1")):
            for _ in range(2):
                err, _ = attempt(path)
                assert err == errno.EIO, f"{path}: {name_of(err)}, not EIO"
        assert mnt.volume("small").read_bytes() == b"\x78" * MiB + bytes(7 * MiB)
        assert_good(mnt, good)
    assert rss_bytes(mnt.process.pid) - rss_before < 32 * MiB
    log = mnt.log()
    assert "table_cache_size" in log and "big" in log


def _many_l2_image(src_raw: Path, out: Path) -> None:
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", str(src_raw), str(out))


def test_memory_stays_bounded_reading_many_l2_tables(share, tmp_path, vfsnap_mount):
    """30 images of 64 MiB with 512-byte clusters and a data cluster in every L2 table's range: 2048
    L2 tables (1 MiB) per image, 30 MiB of L2 tables in all, every one of them loaded (one read per
    MiB resolves the 32 tables of that MiB) under `table_cache_size=4M`; two images are read whole.

    Bound: the daemon's RSS may grow by at most 48 MiB. Expected: the 4 MiB table budget (about 1.7x
    that as Python objects for 512-byte tables), each image's pinned 16 KiB L1, each view's resolved
    map (64 extents per MiB of guest here: about 0.5 MiB per volume, 15 MiB in all), the volumes' own
    objects, and allocator slack: about 25 MiB measured. A cache that kept every table would add the
    30 MiB of L2 tables as Python objects (about 50 MiB) on top."""
    virtual = 64 * MiB
    count = 30
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(virtual)
        for i, offset in enumerate(range(0, virtual, 32 * KiB)):
            f.seek(offset + 512 * (i % 64))
            f.write(struct.pack(">Q", i) * 64)
    expected = src.read_bytes()
    _many_l2_image(src, share / "img00")
    assert info(share / "img00")["cluster-size"] == 512
    for i in range(1, count):
        shutil.copyfile(share / "img00", share / f"img{i:02d}")
    mnt = vfsnap_mount("table_cache_size=4M")
    with watchdog(mnt, 240):
        baseline = rss_bytes(mnt.process.pid)  # before anything is opened (a listing opens every volume)
        peak = baseline
        for i in range(count):
            fd = os.open(mnt.volume(f"img{i:02d}"), os.O_RDONLY | os.O_DIRECT)
            try:
                for mib in range(virtual // MiB):
                    block = mib * MiB + (mib % 256) * 4096
                    assert os.pread(fd, 4096, block) == expected[block:block + 4096], (i, block)
            finally:
                os.close(fd)
            peak = max(peak, rss_bytes(mnt.process.pid))
        for i in (0, count - 1):
            data, errors = read_everything(mnt.volume(f"img{i:02d}"))
            assert not errors and data == expected, f"img{i:02d} does not read as its source"
        peak = max(peak, rss_bytes(mnt.process.pid))
    growth = peak - baseline
    assert growth < 48 * MiB, f"RSS grew by {growth / MiB:.1f} MiB reading 30 MiB of L2 tables with a 4 MiB cache"


def _fragmented_image(path: Path, virtual: int) -> None:
    """A tiny qcow2 (512-byte clusters) whose every L1 entry names the same L2 table and every L2
    entry the same data cluster: each 512 bytes of the disk is its own extent."""
    create(path, virtual, options="cluster_size=512")
    h = qcow2_header(path)
    l2 = (os.path.getsize(path) + 511) // 512 * 512
    data = l2 + 512
    with open(path, "r+b") as f:
        f.seek(l2)
        f.write(struct.pack(">Q", (1 << 63) | data) * 64)
        f.write(b"\x5c" * 512)
        f.seek(h["l1_table_offset"])
        f.write(struct.pack(">Q", (1 << 63) | l2) * h["l1_size"])


def test_memory_stays_bounded_with_fragmented_maps(share, tmp_path, vfsnap_mount):
    """Two 130 KiB images of 512 MiB virtual size whose every 512 bytes is a separate extent: reading
    them must not grow the daemon by more than 48 MiB under `table_cache_size=4M` (same bound as above)."""
    virtual = 512 * MiB
    for name in ("frag1", "frag2"):
        _fragmented_image(share / name, virtual)
    expected_chunk = b"\x5c" * MiB
    mnt = vfsnap_mount("table_cache_size=4M")
    with watchdog(mnt, 240):
        baseline = rss_bytes(mnt.process.pid)  # before anything is opened (a listing opens every volume)
        os.listdir(mnt.path / "volumes")
        for name in ("frag1", "frag2"):
            fd = os.open(mnt.volume(name), os.O_RDONLY | os.O_DIRECT)
            try:
                for offset in range(0, virtual, MiB):
                    assert os.pread(fd, MiB, offset) == expected_chunk
            finally:
                os.close(fd)
        growth = rss_bytes(mnt.process.pid) - baseline
    assert growth < 48 * MiB, f"RSS grew by {growth / MiB:.1f} MiB for two 130 KiB images"


def _hostile_refcount_table(path: Path) -> None:
    """A valid small qcow2 whose refcount table is made the largest QEMU allows (8 MiB, 128 clusters)
    and filled with a million distinct (bogus) refcount block offsets."""
    create(path, MiB)
    qemu_io(path, "write -P 0x66 0 64k")
    size = os.path.getsize(path)
    offset = (size + CS - 1) // CS * CS
    entries = 1 << 20
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"".join(struct.pack(">Q", (i + 64) << 16) for i in range(entries)))
    set_header_field(path, "refcount_table_offset", offset)
    set_header_field(path, "refcount_table_clusters", entries * 8 // CS)


def test_memory_stays_bounded_with_huge_refcount_tables(share, tmp_path, vfsnap_mount):
    """Four 9 MiB images, each with an 8 MiB refcount table of distinct entries (reads need no
    refcounts at all): opening and reading them under `table_cache_size=4M` grows RSS by < 48 MiB."""
    for i in range(4):
        _hostile_refcount_table(share / f"rt{i}")
    mnt = vfsnap_mount("table_cache_size=4M")
    with watchdog(mnt, 60):
        baseline = rss_bytes(mnt.process.pid)  # before anything is opened (a listing opens every volume)
        os.listdir(mnt.path / "volumes")
        for i in range(4):
            err, data = attempt(mnt.volume(f"rt{i}"), 0, CS)
            assert err in (None, errno.EIO)
            if err is None:
                assert data == b"\x66" * CS
        growth = rss_bytes(mnt.process.pid) - baseline
    assert growth < 48 * MiB, f"RSS grew by {growth / MiB:.1f} MiB opening four small images"


def _compressed_chain(share: Path) -> tuple[Path, int, int]:
    """`cz` (qcow2, 64 KiB clusters) with compressed clusters 1-3; returns the image, the file offset
    of cluster 2's L2 entry and that entry."""
    create(share / "cz", 2 * MiB)
    qemu_io(share / "cz", *(f"write -c -P {0x40 + i} {i * CS} {CS}" for i in (1, 2, 3)))
    where = l2_entry_offset(share / "cz", 2 * CS)
    entry = read_u64(share / "cz", where)
    assert entry & (1 << 62)
    return share / "cz", where, entry


@pytest.mark.parametrize("variant", ["max-sectors", "into-eof", "deflate-bomb"])
def test_compressed_cluster_claiming_a_large_size(variant, share, tmp_path, vfsnap_mount):
    """A compressed descriptor patched to claim the largest length the format allows, to run past the
    end of the file, or to point at a deflate stream of 64 MiB of zeros: the read returns the right
    cluster (QEMU decodes one cluster and ignores the rest) or EIO, never more than one cluster of
    output, and the daemon's memory does not move."""
    good = make_good(share)
    path, where, entry = _compressed_chain(share)
    cb = 16
    offset_bits = 62 - (cb - 8)
    host = entry & ((1 << offset_bits) - 1)
    sector_mask = ((1 << (cb - 8)) - 1) << offset_bits
    expected = {b"\x42" * CS}
    if variant == "max-sectors":
        write_u64(path, where, entry | sector_mask)
    elif variant == "into-eof":
        with open(path, "r+b") as f:
            f.seek(host)
            stream = zlib.decompressobj(-12)
            stream.decompress(f.read(4096), CS)
            f.seek(host)
            whole = f.read(4096 - len(stream.unused_data))  # exactly cluster 2's deflate stream
            new_host = f.seek(0, os.SEEK_END) + 3
            f.write(b"\0" * 3 + whole[: len(whole) // 2])  # the stream is cut by the end of the file
        write_u64(path, where, (entry & ~((1 << offset_bits) - 1)) | sector_mask | new_host)
    else:
        bomb = zlib.compressobj(9, zlib.DEFLATED, -12)
        stream = bomb.compress(bytes(64 * MiB)) + bomb.flush()
        new_host = (os.path.getsize(path) + 511) // 512 * 512
        with open(path, "r+b") as f:
            f.seek(new_host)
            f.write(stream)
        write_u64(path, where, (1 << 62) | sector_mask | new_host)
        expected = {bytes(CS)}
    mnt = vfsnap_mount()
    with watchdog(mnt):
        baseline = rss_bytes(mnt.process.pid)
        for _ in range(3):
            err, data = attempt(mnt.volume("cz"), 2 * CS, CS)
            assert err == errno.EIO or (err is None and data in expected), f"{variant}: {name_of(err)}"
        assert attempt(mnt.volume("cz"), CS, CS) == (None, b"\x41" * CS)
        assert attempt(mnt.volume("cz"), 3 * CS, CS) == (None, b"\x43" * CS)
        assert rss_bytes(mnt.process.pid) - baseline < 16 * MiB
        assert_good(mnt, good)


def test_hostile_images_never_hang_the_daemon(share, tmp_path, vfsnap_mount):
    """Metadata that points at itself (every L1 entry at the same L2, L2 entries at the L2 table or
    the header, one compressed cluster shared by every entry) is read to the end within the watchdog;
    every read gives data or EIO while another volume is read concurrently."""
    good = make_good(share)
    virtual = 64 * MiB
    # Every L1 entry names one L2 table; its entries alternate between the L2 table itself, the
    # header cluster, a compressed cluster and zero.
    create(share / "selfref", virtual, options="cluster_size=512")
    h = qcow2_header(share / "selfref")
    l2 = (os.path.getsize(share / "selfref") + 511) // 512 * 512
    comp = zlib.compressobj(9, zlib.DEFLATED, -12)
    stream = comp.compress(b"\x99" * 512) + comp.flush()
    zhost = l2 + 512
    compressed = (1 << 62) | zhost  # 0 extra sectors: 512 bytes from zhost
    entries = [(1 << 63) | l2, (1 << 63) | h["l1_table_offset"] // 512 * 512, compressed, 1] * 16
    with open(share / "selfref", "r+b") as f:
        f.seek(l2)
        f.write(b"".join(struct.pack(">Q", e) for e in entries))
        f.write(stream.ljust(512, b"\0"))
        f.seek(h["l1_table_offset"])
        f.write(struct.pack(">Q", (1 << 63) | l2) * h["l1_size"])
    mnt = vfsnap_mount()
    results: dict[str, object] = {}

    def read_good():
        try:
            for _ in range(20):
                assert mnt.volume("good").read_bytes() == good
            results["good"] = True
        except BaseException as exc:  # noqa: BLE001 - reported below
            results["good"] = exc

    with watchdog(mnt, 60):
        reader = threading.Thread(target=read_good)
        reader.start()
        fd = os.open(mnt.volume("selfref"), os.O_RDONLY | os.O_DIRECT)
        outcomes = set()
        try:
            for offset in range(0, virtual, 256 * KiB):
                try:
                    data = os.pread(fd, 256 * KiB, offset)
                    outcomes.add("data")
                    assert len(data) == 256 * KiB
                except OSError as exc:
                    assert exc.errno == errno.EIO, name_of(exc.errno)
                    outcomes.add("EIO")
            # Cluster by cluster: the compressed and zero entries read, the others fail.
            assert attempt(mnt.volume("selfref"), 2 * 512, 512) == (None, b"\x99" * 512)
            assert attempt(mnt.volume("selfref"), 3 * 512, 512) == (None, bytes(512))
            assert attempt(mnt.volume("selfref"), 0, 512)[0] == errno.EIO
            assert attempt(mnt.volume("selfref"), 512, 512)[0] == errno.EIO
        finally:
            os.close(fd)
        reader.join()
    assert results["good"] is True, results["good"]
    assert outcomes == {"EIO"}
    assert mnt.process.poll() is None


class QuickMount(Mount):
    """A mount whose stop gives up quickly (for a daemon that is expected to be stuck)."""

    def stop(self, timeout: float = 3.0) -> int | None:
        return super().stop(timeout)


def test_dirty_overlay_with_a_lying_snapshot_table_does_not_stop_the_mount(share, tmp_path):
    """A dirty overlay (the mount repairs dirty images) whose header claims 2^32-1 internal snapshots:
    the mount must come up within 15 s, the other volumes must read."""
    good = make_good(share)
    create(share / "vol", SIZE, fmt="raw")
    create(share / "vol.s1", SIZE, backing="vol", backing_fmt="raw", options="lazy_refcounts=on")
    qemu_io(share / "vol.s1", "write -P 0x21 0 64k")
    qemu_img("snapshot", "-c", "internal", str(share / "vol.s1"))
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    set_header_field(share / "vol.s1", "nb_snapshots", 0xFFFFFFFF)
    set_header_field(share / "vol.s1", "incompatible_features", qcow2_header(share / "vol.s1")["incompatible_features"] | 1)
    mnt = QuickMount(share, tmp_path / "mnt")
    try:
        mnt.start(timeout=15)
        with watchdog(mnt, 20):
            err, data = attempt(mnt.volume("vol"))
            assert err == errno.EIO or (err is None and data == b"\x21" * CS), name_of(err)
            assert_good(mnt, good)
        assert not mnt.unexpected_errors(), mnt.unexpected_errors()
    finally:
        mnt.stop()


# -- 5. permissions with -o allow_other (the kernel checks them: default_permissions) -------------------


def _unprivileged() -> tuple[int, int]:
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        pytest.fail("no user `nobody` (Debian's base-passwd always has it)", pytrace=False)
    return user.pw_uid, user.pw_gid


_CHILD = r"""
import errno, json, os, sys
def run(op, path, arg):
    try:
        if op == "read":
            with open(path, "rb") as f:
                return "ok:" + f.read(arg).hex()
        if op == "write":
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\x55" * arg, 0)
            finally:
                os.close(fd)
        elif op == "create":
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        elif op == "getxattr":
            return "ok:" + os.getxattr(path, arg).hex()
        elif op == "listdir":
            return "ok:" + ",".join(sorted(os.listdir(path)))
        elif op == "chmod":
            os.chmod(path, arg)
        else:
            getattr(os, op)(path)
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
print(json.dumps([run(*step) for step in json.loads(sys.argv[1])]))
"""


def as_user(uid: int, gid: int, *steps: tuple) -> list[str]:
    """Run file operations as an unprivileged user (setpriv, no supplementary groups)."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(sys.executable)
    args = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", python, "-c", _CHILD,
            json.dumps([[op, str(path), arg] for op, path, arg in steps])]
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture
def open_mountpoint():
    """A mountpoint an unprivileged user can reach (pytest's tmp_path is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="vfsnap-perm-", dir="/tmp"))
    os.chmod(base, 0o755)
    (base / "mnt").mkdir(mode=0o755)
    yield base / "mnt"
    shutil.rmtree(base, ignore_errors=True)


@requires_commands("setpriv")
def test_permissions_with_allow_other(share, open_mountpoint, vfsnap_mount):
    uid, gid = _unprivileged()
    volumes = {  # name: (mode, owner, fill byte)
        "secret": (0o600, (0, 0), 0x11),
        "public": (0o644, (0, 0), 0x22),
        "shared": (0o666, (0, 0), 0x33),
        "mine": (0o640, (uid, gid), 0x44),
    }
    for name, (mode, owner, byte) in volumes.items():
        create(share / name, MiB, fmt="raw")
        qemu_io(share / name, f"write -P {byte} 0 1M", fmt="raw")
        os.chmod(share / name, mode)
        os.chown(share / name, *owner)
    mnt = vfsnap_mount("allow_other", path=open_mountpoint)

    # Volume files keep owner and mode from the share; snapshots/<vol> takes them too (r→r-x, w→w).
    for name, (mode, owner, _) in volumes.items():
        st = os.stat(mnt.volume(name))
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, *owner), name
        st = os.stat(mnt.snapshot_dir(name))
        expected_dir = mode | (0o111 & ((mode & 0o444) >> 2))
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == expected_dir, (name, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == owner

    v, s = mnt.volume, mnt.snapshot_dir
    results = as_user(uid, gid,
                      ("read", v("secret"), 16), ("write", v("secret"), 16), ("getxattr", v("secret"),
                                                                                 "user.vfsnap.format"),
                      ("read", v("public"), 4), ("write", v("public"), 16), ("mkdir", s("public", "mine"), None),
                      ("listdir", s("public"), None), ("listdir", s("secret"), None),
                      ("mkdir", s("secret", "x"), None),
                      ("mkdir", s("mine", "snap1"), None), ("listdir", s("mine"), None),
                      ("read", mnt.snapshot("mine", "snap1"), 4), ("write", mnt.snapshot("mine", "snap1"), 4),
                      ("write", v("mine"), 16), ("read", v("mine"), 4),
                      ("mkdir", s("shared", "theirs"), None),
                      ("chmod", v("mine"), 0o666), ("create", mnt.path / "volumes" / "newvol", None),
                      ("unlink", v("public"), None), ("unlink", v("mine"), None),
                      ("rmdir", s("mine", "snap1"), None), ("rmdir", s("shared", "theirs"), None))
    expected = [
        "EACCES", "EACCES", "EACCES",
        "ok:" + "22" * 4, "EACCES", "EACCES",
        "ok:", "EACCES",
        "EACCES",
        "ok", "ok:latest,snap1",
        "ok:" + "44" * 4, "EACCES",
        "ok", "ok:" + "55" * 4,
        "ok",
        "EPERM", "EACCES",
        "EACCES", "EACCES",
        "ok", "ok",
    ]
    assert results == expected, "\n".join(f"{i}: got {g} expected {e}" for i, (g, e) in
                                          enumerate(zip(results, expected)) if g != e)
    assert (share / "secret").read_bytes() == b"\x11" * MiB
    assert (share / "public").read_bytes() == b"\x22" * MiB
    assert not (share / "public.mine").exists() and not (share / "secret.x").exists()

    # A chmod on the share takes effect through the mount (after the 1 s attribute timeout).
    os.chmod(share / "public", 0o600)
    wait_for(lambda: stat.S_IMODE(os.stat(mnt.volume("public")).st_mode) == 0o600, "the chmod to show", 10)
    assert as_user(uid, gid, ("read", v("public"), 4), ("listdir", s("public"), None)) == ["EACCES", "EACCES"]
    os.chown(share / "public", uid, gid)
    wait_for(lambda: os.stat(mnt.volume("public")).st_uid == uid, "the chown to show", 10)
    assert as_user(uid, gid, ("read", v("public"), 4), ("mkdir", s("public", "now"), None)) == [
        "ok:" + "22" * 4, "ok"]


# -- 5. vfsnap's own records on the share: sidecars, journals, rename plans ---------------------------

RECORDS_SEED = 20261203
RECORD_VOLUMES = 32
RENAME_PLANS = 6
# Strings a damaged or planted record may hold: the volume's own files, another volume's, paths.
RECORD_STRINGS = ["good", "good.s1", "victim", "{v}", "{v}.s1", "{v}.s2", "s1", "s2", "clone-1", "raw", "qcow2",
                  "delete", "snapshot", "revert", "clone", "created", "started", "", ".", "..", "../victim",
                  "/etc/passwd", "a\nb", "x" * 300, "\udc80"]


def _record_value(rng, volume: str, depth: int = 0):
    kind = rng.randrange(9 if depth < 2 else 6)
    if kind <= 2:
        return rng.choice(RECORD_STRINGS).replace("{v}", volume)
    if kind == 3:
        return rng.choice([0, -1, 1 << 64, 1.5, 1e300, True, None])
    if kind == 4:
        return rng.choice([float("nan"), float("inf"), ""])
    if kind == 5:
        return rng.randrange(1 << 31)
    if kind == 6:
        return [_record_value(rng, volume, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 7:
        return {rng.choice(["op", "snapshot", "overlay", "files", "from", "to"]): _record_value(rng, volume, depth + 1)}
    return {}


def _mutate_record(rng, document, volume: str):
    """A valid record with 1-3 values replaced or keys dropped (anywhere in it)."""
    for _ in range(rng.choice([1, 1, 2, 3])):
        places = []

        def walk(node):
            if isinstance(node, dict):
                for key, value in node.items():
                    places.append((node, key))
                    walk(value)
            elif isinstance(node, list):
                for i, value in enumerate(node):
                    places.append((node, i))
                    walk(value)

        walk(document)
        if not places:
            break
        parent, key = rng.choice(places)
        if isinstance(parent, dict) and rng.random() < 0.4:
            del parent[key]
        else:
            parent[key] = _record_value(rng, volume)
    return document


def _valid_sidecars(v: str, rng) -> list[dict]:
    """Sidecars vfsnap writes for a raw volume `v` with snapshot s1 (overlay `v.s1`, active)."""
    base = {"format": "raw", "version": 1, "snapshots": {"s1": {"created": 1764770000.5}}}
    revert = {"op": "revert", "snapshot": "s1", "target": f"{v}.s1", "overlay": ".vfsnap-revert-" + "0" * 24,
              "backing": v, "backing_format": "raw", "size": SIZE, "drop": {}, "files": [],
              "state": rng.choice(["started", "created"])}
    return [
        {**base, "journal": [{"op": "delete", "snapshot": "s1", "overlay": f"{v}.s1"}]},
        {**base, "journal": [{"op": "snapshot", "snapshot": "s2", "overlay": f"{v}.s2", "backing": f"{v}.s1"}]},
        {**base, "journal": [{"op": "snapshot", "snapshot": "s2", "overlay": f"{v}.s2", "backing": f"{v}.s1",
                              "hidden_for": "copy"}]},
        {**base, "journal": [revert]},
        {**base, "journal": [{"op": "delete", "snapshot": "s1", "overlay": f"{v}.s1", "held_for": "good"}]},
        {**base, "journal": [{"op": "clone", "source": "good", "snapshot": "s1", "source_overlay": "good.s1",
                              "top": "good", "linked": [["good", "qcow2"]], "pins": ["good"]}]},
        base,
    ]


def _inconsistent_sidecars(v: str) -> list[dict]:
    """Records that parse but do not fit the files: what a crash on another host, an admin's
    hand or an old backup can leave."""
    base = {"format": "raw", "version": 1, "snapshots": {}}
    revert = {"op": "revert", "snapshot": "s1", "target": f"{v}.s1", "overlay": ".vfsnap-revert-" + "1" * 24,
              "backing": v, "backing_format": "qcow2", "size": 1 << 62, "drop": {"s9": f"{v}.s9"},
              "files": [f"{v}.s9", v], "state": "created"}
    return [
        {**base, "journal": [{"op": "delete", "snapshot": "s9", "overlay": f"{v}.s9"}]},  # no such snapshot
        {**base, "journal": [{"op": "delete", "snapshot": "s1", "overlay": f"{v}.s1"}] * 2},
        {**base, "journal": [{"op": "snapshot", "snapshot": "s1", "overlay": f"{v}.s1", "backing": v}]},
        {**base, "journal": [revert]},
        {**base, "journal": [{**revert, "state": "started", "target": f"{v}.s9"}]},
        # a clone entry on a raw base that has no backing file, linked to a volume that is not there
        {**base, "journal": [{"op": "clone", "source": "gone", "snapshot": "s1", "source_overlay": "gone.s1",
                              "top": "gone", "linked": [["gone", "raw"], ["good", "qcow2"]],
                              "pins": ["gone", "victim"]}]},
        {**base, "format": "qcow2"},  # a raw base recorded as qcow2
        {**base, "journal": [{"op": "delete", "snapshot": "s1", "overlay": f"{v}.s1", "held_for": v}]},
        {**base, "journal": [{"op": "frobnicate", "overlay": "victim"}]},  # a newer vfsnap's operation
    ]


def _rename_plan(old: str, new: str) -> dict:
    return {"op": "rename", "from": old, "to": new, "files": {old: new, f"{old}.s1": f"{new}.s1"},
            "chain": [old, f"{old}.s1"], "formats": {old: "raw", f"{old}.s1": "qcow2"}}


@pytest.mark.allow_daemon_errors  # checked below: errors logged cleanly, no traceback
def test_hostile_records_fail_only_their_volume(share, tmp_path, vfsnap_mount):
    """Damaged or planted sidecars, journal entries and rename plans (valid records mutated,
    seeded: values replaced by other types, paths, other volumes' names, huge numbers; keys
    dropped): every access to their volume answers data or a clear errno (EIO for a record that
    does not parse), never a traceback or "unexpected error"; nothing hangs; the other volumes
    (`good`, `victim`) keep their data, also across a remount that runs the recovery."""
    from vfsnap.share.rename import journal_file

    rng = random.Random(RECORDS_SEED)
    good = make_good(share)
    marker_file(share / "victim")
    documents = {}
    for i in range(RECORD_VOLUMES):
        v = f"v{i:02d}"
        create(share / v, SIZE, fmt="raw")
        qemu_io(share / v, f"write -P 0x{0x40 + i:02x} 0 {SIZE}", fmt="raw")
        create(share / f"{v}.s1", SIZE, backing=v, backing_fmt="raw")
        write_info(share, v, f"{v}.s1", {"s1": f"{v}.s1"})
        inconsistent = _inconsistent_sidecars(v)
        if i < len(inconsistent):
            document = inconsistent[i]
        else:
            document = _mutate_record(rng, rng.choice(_valid_sidecars(v, rng)), v)
        documents[v] = document
        (share / f"{v}.vfsnap.json").write_text(json.dumps(document, indent=1, sort_keys=True))
    for i in range(RENAME_PLANS):
        old, new = f"r{i}", f"t{i}"
        create(share / old, SIZE, fmt="raw")
        create(share / f"{old}.s1", SIZE, backing=old, backing_fmt="raw")
        write_info(share, old, f"{old}.s1", {"s1": f"{old}.s1"})
        plan = _mutate_record(rng, _rename_plan(old, new), old) if i else _rename_plan(old, new)
        (share / journal_file(new)).write_text(json.dumps(plan, indent=1, sort_keys=True))

    clear = {errno.EIO, errno.ENOENT, errno.EBUSY, errno.EEXIST}
    outcomes: dict[str, set[str]] = {}

    def exercise(mnt: Mount) -> None:
        with watchdog(mnt, 60):
            listed = os.listdir(mnt.path / "volumes")
            assert {"good", "victim"} <= set(listed)
            renames = [f"{prefix}{i}" for prefix in "rt" for i in range(RENAME_PLANS)]
            for v in sorted(documents) + renames:
                seen = outcomes.setdefault(v, set())
                err, _ = attempt(mnt.volume(v))
                seen.add(f"read:{name_of(err)}")
                assert err in clear | {None}, f"{v}: read: {name_of(err)}"
                steps = [("ls", os.listdir, mnt.snapshot_dir(v)), ("mkdir", os.mkdir, mnt.snapshot_dir(v, "n1")),
                         ("rmdir", os.rmdir, mnt.snapshot_dir(v, "s1"))]
                for what, call, path in steps:
                    try:
                        call(path)
                        seen.add(f"{what}:ok")
                    except OSError as exc:
                        seen.add(f"{what}:{name_of(exc.errno)}")
                        assert exc.errno in clear, f"{v}: {what}: {name_of(exc.errno)}"
            assert_good(mnt, good)
            assert mnt.volume("victim").read_bytes()[:len(MARKER)] == MARKER

    mnt = vfsnap_mount()
    exercise(mnt)
    assert not mnt.unexpected_errors(), "\n".join(mnt.unexpected_errors()[:20])
    mnt.stop()
    mnt = vfsnap_mount()  # the mount's recovery runs over what the first one left
    exercise(mnt)
    assert not mnt.unexpected_errors(), "\n".join(mnt.unexpected_errors()[:20])
    mnt.stop()
    for args in (["check", str(share)], ["check", "--repair", str(share)]):
        result = subprocess.run([sys.executable, "-m", "vfsnap", *args], capture_output=True, text=True,
                                cwd=Path(__file__).parent.parent, timeout=120)
        assert result.returncode in (0, 2) and "Traceback" not in result.stderr, (args, result.stderr[-3000:])
    assert (share / "victim").read_bytes()[:len(MARKER)] == MARKER
    for name in ("good", "good.s1"):
        assert (share / name).exists(), f"{name} was removed"
    assert_good(vfsnap_mount(), good)
    print(json.dumps({v: sorted(s) for v, s in outcomes.items()}, sort_keys=True))
