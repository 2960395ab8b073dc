"""A full share (issue #3, DESIGN.md section 2: "ENOSPC when the share is full").

The share lives on a small tmpfs (8 MiB) next to a filler file. A volume bigger than the
filesystem is written through the mount until a write fails; then:

* the write fails with ENOSPC (not EIO, not a dead mount);
* everything written and fsynced before reads back unchanged, through the mount and, after
  unmount, through QEMU;
* once space is freed (the filler deleted) the volume is writable again, fsync succeeds, and
  after unmount every qcow2 file passes `qemu-img check` with exit 0.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.conftest import mount_tmpfs, requires_fuse
from tests.qemu import check, create, flat_bytes, qemu_io, write_info

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20
FS_SIZE = 8 * MiB
VOLUME_SIZE = 24 * MiB  # three times the filesystem
FILLER_SIZE = 2 * MiB


@pytest.fixture
def small_fs(tmp_path: Path):
    """An 8 MiB tmpfs, unmounted at teardown (after the vfsnap mounts of the test stopped)."""
    path = tmp_path / "small"
    path.mkdir()
    mount_tmpfs(path, FS_SIZE)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def make_filler(small_fs: Path) -> Path:
    filler = small_fs / "filler.bin"
    with open(filler, "wb") as f:
        f.write(os.urandom(FILLER_SIZE))
        os.fsync(f.fileno())
    return filler


def build_volume(share: Path, kind: str) -> tuple[list[str], str]:
    """`vol`: a sparse raw base with a little data, and for qcow2 kinds an overlay over it."""
    create(share / "vol", VOLUME_SIZE, fmt="raw")
    qemu_io(share / "vol", "write -P 0x5b 1M 64k", "write -P 0x5c 20M 64k", fmt="raw")
    if kind == "raw":
        return ["vol"], "raw"
    cluster = {"qcow2-64k": 65536, "qcow2-4k": 4096, "qcow2-512": 512}[kind]
    create(share / "vol.s1", VOLUME_SIZE, backing="vol", backing_fmt="raw", options=f"cluster_size={cluster}")
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    return ["vol", "vol.s1"], "qcow2"


def pread_all(fd: int, length: int, offset: int = 0) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(fd, min(length, 4 * MiB), offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def assert_equal_except(got: bytes, want: bytes | bytearray, holes: list[tuple[int, int]], what: str) -> None:
    """`got == want` outside `holes` (ranges of failed writes, whose content is undefined)."""
    assert len(got) == len(want), f"{what}: {len(got)} bytes, expected {len(want)}"
    want = bytearray(want)
    for start, end in holes:
        want[start:end] = got[start:end]
    if got != want:
        n = next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)
        pytest.fail(f"{what}: first difference at {n:#x}: got {got[n:n + 16].hex()} expected {want[n:n + 16].hex()}")


def fill_until_enospc(fd: int, model: bytearray, rng: random.Random, start: int, chunk: int) -> tuple[int, int]:
    """Write `chunk`-byte pieces from `start` on until a write fails; return the failed range."""
    offset = start
    while offset < len(model):
        length = min(chunk, len(model) - offset)
        data = rng.randbytes(length)
        try:
            written = os.pwrite(fd, data, offset)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, f"write at {offset:#x} failed with {errno.errorcode.get(exc.errno)}"
            return offset, offset + length
        assert 0 < written <= length
        model[offset:offset + written] = data[:written]
        offset += written
    pytest.fail(f"the whole {len(model)}-byte volume fitted on an {FS_SIZE}-byte filesystem")


@pytest.mark.parametrize("kind", ["raw", "qcow2-64k", "qcow2-4k", "qcow2-512"])
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "odirect"])
def test_full_share_gives_enospc_keeps_data_and_recovers(kind, direct, small_fs, tmp_path, vfsnap_mount):
    share = small_fs / "share"
    share.mkdir()
    filler = make_filler(small_fs)
    names, top_fmt = build_volume(share, kind)
    mnt = vfsnap_mount(share_path=share)
    vol = mnt.volume("vol")
    rng = random.Random(f"{kind}-{direct}")
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    read_fd = os.open(vol, os.O_RDONLY | os.O_DIRECT)
    fd = os.open(vol, flags)
    try:
        model = bytearray(pread_all(read_fd, VOLUME_SIZE))
        # Acknowledged and fsynced before the share fills up.
        for _ in range(8):
            length = rng.choice([4096, 65536, 192 * KiB])
            offset = rng.randrange(0, (VOLUME_SIZE - length) // 4096) * 4096
            data = rng.randbytes(length)
            assert os.pwrite(fd, data, offset) == length
            model[offset:offset + length] = data
        os.fsync(fd)
        durable = bytes(model)
        # Fill the share through the mount.
        assert pread_all(read_fd, VOLUME_SIZE) == durable
        failed = fill_until_enospc(fd, model, rng, 2 * MiB, 256 * KiB)
        holes = [failed]
        # The mount still works; everything but the failed write reads back as written.
        assert_equal_except(pread_all(read_fd, VOLUME_SIZE), model, holes, "after ENOSPC, through the mount")
        # fsync may need space for metadata too: then it says ENOSPC, it does not lie.
        try:
            os.fsync(fd)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, f"fsync on a full share: {exc!r}"
        # Writes into space the image already owns may still work; new allocations fail.
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, rng.randbytes(256 * KiB), failed[0])
        assert exc.value.errno == errno.ENOSPC
        # Free space: the volume is writable again.
        filler.unlink()
        for offset in range(failed[0], failed[0] + 512 * KiB, 128 * KiB):
            data = rng.randbytes(128 * KiB)
            assert os.pwrite(fd, data, offset) == len(data)
            model[offset:offset + len(data)] = data
        holes = [(s, e) for s, e in holes if not (failed[0] <= s and e <= failed[0] + 512 * KiB)]
        os.fsync(fd)
        assert_equal_except(pread_all(read_fd, VOLUME_SIZE), model, holes, "after freeing space, through the mount")
    finally:
        os.close(fd)
        os.close(read_fd)
    assert mnt.stop() == 0
    assert not mnt.unexpected_errors(), mnt.unexpected_errors()
    for name in names:
        if (share / name).read_bytes()[:4] == b"QFI\xfb":
            result = check(share / name)
            assert result["exit"] == 0, f"qemu-img check {name} after ENOSPC: {result}"
    got = flat_bytes(share / names[-1], tmp_path, fmt=top_fmt)
    # The model holds the writes fsynced before the share filled, and everything written since.
    assert_equal_except(got, model, holes, "after unmount, QEMU's view")


@pytest.mark.parametrize("kind", ["raw", "qcow2-64k"])
def test_fsynced_data_survives_enospc_and_a_crash(kind, small_fs, tmp_path, vfsnap_mount):
    """Fill the share, then kill the daemon without freeing space: what was fsynced before is on
    the share, and the images are at worst leaking (QEMU's check exits 0 or 3, never 2)."""
    share = small_fs / "share"
    share.mkdir()
    make_filler(small_fs)
    names, top_fmt = build_volume(share, kind)
    mnt = vfsnap_mount(share_path=share)
    rng = random.Random(kind)
    fd = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        model = bytearray(pread_all(fd, VOLUME_SIZE))
        for _ in range(6):
            offset = rng.randrange(0, VOLUME_SIZE // 4096 - 16) * 4096
            data = rng.randbytes(64 * KiB)
            assert os.pwrite(fd, data, offset) == len(data)
            model[offset:offset + len(data)] = data
        os.fsync(fd)
        durable = bytes(model)
        unsynced_start = 2 * MiB
        failed = fill_until_enospc(fd, model, rng, unsynced_start, 256 * KiB)
        mnt.kill()
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    for name in names:
        if (share / name).read_bytes()[:4] == b"QFI\xfb":
            result = check(share / name)
            assert result["exit"] in (0, 3), f"qemu-img check {name} after ENOSPC and a crash: {result}"
    got = flat_bytes(share / names[-1], tmp_path, fmt=top_fmt)
    # Writes after the fsync may or may not have survived; the fsynced ones must have.
    assert_equal_except(got, durable, [(unsynced_start, failed[1])], "after ENOSPC and a crash")


def test_thick_create_and_extend_on_a_full_share(small_fs, vfsnap_mount):
    """Creating or extending a fully allocated (thick) volume that does not fit: ENOSPC, and no
    file or size change is left behind."""
    share = small_fs / "share"
    share.mkdir()
    mnt = vfsnap_mount("thick", share_path=share)
    result = subprocess.run(["truncate", "-s", str(2 * FS_SIZE), str(mnt.volume("big"))],
                            check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "No space left on device" in result.stderr, result.stderr
    subprocess.run(["truncate", "-s", str(1 * MiB), str(mnt.volume("small"))], check=True)
    big_left = sorted(n for n in os.listdir(share) if n == "big" or n.startswith("big."))
    # Either the create failed as a whole, or it left an empty volume (open(O_CREAT) made it
    # before the size was set): never a half-allocated one.
    assert big_left in ([], ["big", "big.vfsnap.json"])
    if big_left:
        assert os.path.getsize(share / "big") == 0
    with pytest.raises(OSError) as exc:
        os.truncate(mnt.volume("small"), 2 * FS_SIZE)
    assert exc.value.errno == errno.ENOSPC
    assert os.stat(mnt.volume("small")).st_size == 1 * MiB
    assert os.path.getsize(share / "small") == 1 * MiB
    with open(mnt.volume("small"), "r+b") as f:
        f.write(b"ok")
    assert mnt.volume("small").read_bytes()[:2] == b"ok"


@pytest.mark.parametrize("kind", ["raw", "qcow2-64k", "qcow2-512"])
def test_unmount_while_the_share_is_full(kind, small_fs, tmp_path, vfsnap_mount):
    """Close and unmount without freeing space: the write-back of metadata fails (ENOSPC), which
    may lose what was not fsynced but must leave the images consistent (check 0 or 3) with every
    fsynced write in place; the next mount, with space again, leaves them clean (check 0)."""
    share = small_fs / "share"
    share.mkdir()
    filler = make_filler(small_fs)
    names, top_fmt = build_volume(share, kind)
    mnt = vfsnap_mount(share_path=share)
    rng = random.Random(kind)
    fd = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        model = bytearray(pread_all(fd, VOLUME_SIZE))
        for _ in range(6):
            offset = rng.randrange(0, VOLUME_SIZE // 4096 - 16) * 4096
            data = rng.randbytes(64 * KiB)
            assert os.pwrite(fd, data, offset) == len(data)
            model[offset:offset + len(data)] = data
        os.fsync(fd)
        durable = bytes(model)
        failed = fill_until_enospc(fd, model, rng, 2 * MiB, 256 * KiB)
    finally:
        try:
            os.close(fd)  # the flush of close(2) may report ENOSPC
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    exit_code = mnt.stop()
    for name in names:
        if (share / name).read_bytes()[:4] == b"QFI\xfb":
            result = check(share / name)
            assert result["exit"] in (0, 3), f"qemu-img check {name} after unmounting a full share: {result}"
    got = flat_bytes(share / names[-1], tmp_path, fmt=top_fmt)
    assert_equal_except(got, durable, [(2 * MiB, failed[1])], "after unmounting a full share")
    assert exit_code == 0, f"vfsnap exited with {exit_code} when unmounted with the share full:\n{mnt.log()[-3000:]}"
    filler.unlink()
    mnt = vfsnap_mount(share_path=share)
    assert_equal_except(mnt.volume("vol").read_bytes(), durable, [(2 * MiB, failed[1])], "mounted again")
    assert mnt.stop() == 0
    for name in names:
        if (share / name).read_bytes()[:4] == b"QFI\xfb":
            result = check(share / name)
            assert result["exit"] == 0, f"qemu-img check {name} after the next mount: {result}"


@pytest.mark.parametrize("volume_format", ["raw", "qcow2"])
def test_create_on_a_full_share_is_enospc_and_leaves_nothing(volume_format, small_fs, vfsnap_mount):
    share = small_fs / "share"
    share.mkdir()
    with open(small_fs / "filler.bin", "wb") as f:
        try:
            while True:
                f.write(bytes(64 * KiB))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    mnt = vfsnap_mount(f"volume_format={volume_format}", share_path=share)
    result = subprocess.run(["truncate", "-s", "10M", str(mnt.volume("new"))], check=False, capture_output=True,
                            text=True)
    assert result.returncode != 0 and "No space left on device" in result.stderr, result.stderr
    with pytest.raises(OSError) as exc:
        os.close(os.open(mnt.volume("new2"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    assert exc.value.errno == errno.ENOSPC
    assert os.listdir(share) == []
    assert os.listdir(mnt.path / "volumes") == []
    # With space again, the same names work.
    (small_fs / "filler.bin").unlink()
    subprocess.run(["truncate", "-s", "10M", str(mnt.volume("new"))], check=True)
    assert os.stat(mnt.volume("new")).st_size == 10 * MiB
    assert sorted(os.listdir(share)) == ["new", "new.vfsnap.json"]
