"""Real clients writing through the mount (issue #3): qemu-io, fio, qemu-img, dd, and programs
using O_DSYNC and O_DIRECT. Each test checks the result with QEMU's tools on the share:
`qemu-img compare` of the mounted volume with its chain while mounted and after unmount,
`qemu-img check` of every qcow2 file, and durability where a client asked for it (the daemon is
killed right after the acknowledged write, and the data must be on the share).
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import requires_commands, requires_fuse, wait_for
from tests.qemu import check, create, flat_bytes, make_chain, qemu_img, qemu_io, run

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20

requires_fio = requires_commands("fio")


def _fill(level, path, fmt):
    qemu_io(path, f"write -P {0x10 + level} {level * 192}k 320k", f"write -P {0x70 + level} 5M 64k", fmt=fmt)


# Volumes the clients write to: (base format, overlays, cluster size of the qcow2 images).
CHAINS = {
    "raw": ("raw", 0, None),
    "qcow2-overlay": ("raw", 1, 65536),
    "qcow2-overlays-4k": ("raw", 2, 4096),
    "qcow2-base-512": ("qcow2", 0, 512),
}


def build(share: Path, kind: str, size: int = 8 * MiB) -> tuple[list[str], str]:
    base_fmt, depth, cluster = CHAINS[kind]
    names = make_chain(share, "vol", size=size, depth=depth, base_fmt=base_fmt, cluster_size=cluster, writes=_fill)
    return names, base_fmt if depth == 0 else "qcow2"


def qemu_compare(mounted: Path, top: Path, top_fmt: str) -> subprocess.CompletedProcess:
    """`qemu-img compare` of the mounted raw volume with its chain on the share (read-only, -U)."""
    return run("qemu-img", "compare", "-U", "-f", "raw", "-F", top_fmt, str(mounted), str(top), check=False)


def assert_identical(mounted: Path, top: Path, top_fmt: str) -> None:
    result = qemu_compare(mounted, top, top_fmt)
    assert result.returncode == 0 and "Images are identical" in result.stdout, result.stdout + result.stderr


def snapshot_of_mount(mnt, tmp_path: Path) -> Path:
    """A copy of the mounted volume's bytes (to compare with the share after unmount)."""
    copy = tmp_path / "mounted-copy.raw"
    shutil.copyfile(mnt.volume("vol"), copy)
    return copy


# -- qemu-io -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(CHAINS))
def test_qemu_io_writes_and_verifies_patterns(kind, share, tmp_path, vfsnap_mount):
    """qemu-io with cache=none (O_DIRECT) writes patterns, aligned and not, across clusters and
    L2 tables; a second qemu-io process verifies them with `read -P`."""
    names, top_fmt = build(share, kind)
    mnt = vfsnap_mount()
    vol = mnt.volume("vol")
    expected = bytearray(vol.read_bytes())
    writes = [
        (0x11, 0, 64 * KiB),
        (0x22, 60 * KiB, 8 * KiB),  # overlaps the previous one, across a 64 KiB boundary
        (0x33, 1 * MiB - 512, 4 * KiB),  # across 1 MiB
        (0x44, 2 * MiB - 4 * KiB, 1 * MiB + 8 * KiB),  # across the 2 MiB L2 span of 4 KiB clusters
        (0x55, 32 * KiB - 512, 1 * KiB),  # across the 32 KiB L2 span of 512-byte clusters
        (0x66, 100001, 3000),  # unaligned: qemu-io reads, modifies and writes what it must
        (0x77, 8 * MiB - 1536, 1536),  # the last sectors of the disk
        (0x88, 5 * MiB + 100, 200),  # inside data of a backing file
    ]
    qemu_io(vol, *(f"write -P {p} {off} {length}" for p, off, length in writes), fmt="raw", extra=("-t", "none"))
    for p, off, length in writes:
        expected[off:off + length] = bytes([p]) * length
    # A second process reads the patterns back, with and without the page cache.
    checks = []
    for i, (p, off, length) in enumerate(writes):
        # the part of each write that no later write overwrote
        visible = [(off, off + length)]
        for _, later, n in writes[i + 1:]:
            visible = [piece for a, b in visible for piece in ((a, min(b, later)), (max(a, later + n), b))
                       if piece[0] < piece[1]]
        checks += [f"read -P {p} {a} {b - a}" for a, b in visible]
    for cache in ("none", "writeback"):
        qemu_io(vol, *checks, fmt="raw", extra=("-t", cache))
    assert vol.read_bytes() == expected
    assert_identical(vol, share / names[-1], top_fmt)
    mnt.stop()
    assert flat_bytes(share / names[-1], tmp_path, fmt=top_fmt) == expected
    for name in names:
        if fmt_of(share / name) == "qcow2":
            assert check(share / name)["exit"] == 0, name


def fmt_of(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def test_qemu_io_zero_writes(share, tmp_path, vfsnap_mount):
    """`write -z` on a raw file turns into writes of zeros (there is no fallocate through FUSE):
    backing data must not show through."""
    names, _ = build(share, "qcow2-overlays-4k")
    mnt = vfsnap_mount()
    vol = mnt.volume("vol")
    expected = bytearray(vol.read_bytes())
    qemu_io(vol, "write -z 200k 300k", "write -z 5M 64k", fmt="raw", extra=("-t", "none"))
    expected[200 * KiB:500 * KiB] = bytes(300 * KiB)
    expected[5 * MiB:5 * MiB + 64 * KiB] = bytes(64 * KiB)
    qemu_io(vol, "read -P 0 200k 300k", "read -P 0 5M 64k", fmt="raw", extra=("-t", "none"))
    assert vol.read_bytes() == expected
    mnt.stop()
    assert flat_bytes(share / names[-1], tmp_path) == expected
    for name in names[1:]:
        assert check(share / name)["exit"] == 0


# -- fio -------------------------------------------------------------------------------------------


def fio(filename: Path, *options: str) -> subprocess.CompletedProcess:
    args = ["fio", "--name=verify", f"--filename={filename}", "--ioengine=libaio", "--direct=1", "--iodepth=4",
            "--fallocate=none", "--randrepeat=1", "--output-format=normal", *options]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)


@requires_fio
@pytest.mark.parametrize("kind,bs", [("raw", "--bs=4k"), ("qcow2-overlay", "--bsrange=4k-128k"),
                                     ("qcow2-overlays-4k", "--bs=4k"), ("qcow2-base-512", "--bsrange=512-16k")])
def test_fio_randwrite_verify(kind, bs, share, tmp_path, vfsnap_mount):
    """fio random writes with crc32c verification (libaio, O_DIRECT, iodepth 4); the data
    survives an unmount (fio verify_only after a remount) and QEMU reads the same bytes."""
    size = 8 * MiB
    names, top_fmt = build(share, kind, size)
    mnt = vfsnap_mount()
    vol = mnt.volume("vol")
    job = ("--rw=randwrite", bs, f"--size={size}", "--verify=crc32c", "--verify_fatal=1",
           "--verify_backlog=64", "--io_size=6M")
    result = fio(vol, *job, "--do_verify=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "verify" in result.stdout and "err= 0" in result.stdout, result.stdout[-3000:]
    assert os.stat(vol).st_size == size
    assert_identical(vol, share / names[-1], top_fmt)
    copy = snapshot_of_mount(mnt, tmp_path)
    assert mnt.stop() == 0
    for name in names:
        if fmt_of(share / name) == "qcow2":
            assert check(share / name)["exit"] == 0, f"{name}: {check(share / name)}"
    assert_identical(copy, share / names[-1], top_fmt)
    mnt = vfsnap_mount()
    result = fio(mnt.volume("vol"), *job, "--verify_only=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_identical(mnt.volume("vol"), share / names[-1], top_fmt)


@requires_fio
def test_fio_buffered_mixed_rw_verify(share, tmp_path, vfsnap_mount):
    """Buffered (page cache) random read/write with verification, psync engine, over an overlay
    with 512-byte clusters: sub-page writes go through the kernel's write-through path."""
    names, top_fmt = build(share, "qcow2-overlays-4k")
    mnt = vfsnap_mount()
    vol = mnt.volume("vol")
    args = ["fio", "--name=mixed", f"--filename={vol}", "--ioengine=psync", "--direct=0", "--fallocate=none",
            "--rw=randwrite", "--bsrange=512-48k", "--size=8M", "--io_size=4M", "--verify=crc32c",
            "--verify_fatal=1", "--do_verify=1", "--fsync=7"]
    result = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_identical(vol, share / names[-1], top_fmt)
    mnt.stop()
    for name in names[1:]:
        assert check(share / name)["exit"] == 0


# -- qemu-img convert into a volume ------------------------------------------------------------


def test_qemu_img_convert_into_volume(share, tmp_path, vfsnap_mount):
    """Restoring an image into an existing volume (`qemu-img convert -n`), as a backup tool does."""
    names, _ = build(share, "qcow2-overlay")
    source = tmp_path / "source.qcow2"
    create(source, 8 * MiB, options="cluster_size=65536")
    rng = random.Random(7)
    qemu_io(source, *(f"write -P {rng.randint(1, 255)} {rng.randrange(0, 8 * MiB - 70000)} {rng.randint(1, 70000)}"
                      for _ in range(30)))
    mnt = vfsnap_mount()
    qemu_img("convert", "-n", "-f", "qcow2", "-O", "raw", "-t", "none", str(source), str(mnt.volume("vol")))
    expected = flat_bytes(source, tmp_path)
    assert mnt.volume("vol").read_bytes() == expected
    result = run("qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(mnt.volume("vol")), str(source),
                 check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    mnt.stop()
    assert flat_bytes(share / names[-1], tmp_path) == expected
    assert check(share / names[-1])["exit"] == 0


# -- dd ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["raw", "qcow2-overlay"])
def test_dd_conv_fsync_is_durable(kind, share, tmp_path, vfsnap_mount):
    """dd conv=fsync,notrunc: once dd exits, the data is on the share, even if vfsnap dies then."""
    names, top_fmt = build(share, kind)
    mnt = vfsnap_mount()
    expected = bytearray(mnt.volume("vol").read_bytes())
    data = random.Random(3).randbytes(640 * KiB + 512)
    source = tmp_path / "src.bin"
    source.write_bytes(data)
    subprocess.run(["dd", f"if={source}", f"of={mnt.volume('vol')}", "bs=64k", "seek=37", "conv=fsync,notrunc",
                    "status=none"], check=True)
    expected[37 * 64 * KiB:37 * 64 * KiB + len(data)] = data
    mnt.kill()
    for name in names:
        if fmt_of(share / name) == "qcow2":
            assert check(share / name)["exit"] in (0, 3), name
    assert flat_bytes(share / names[-1], tmp_path, fmt=top_fmt) == expected


def test_dd_without_notrunc_cannot_shrink_the_volume(share, tmp_path, vfsnap_mount):
    """dd without conv=notrunc truncates its output: on a volume that would shrink it (EPERM).
    Without seek= dd opens with O_TRUNC and stops; with seek= the ftruncate fails, dd reports it
    and (its own choice) still copies; the disk keeps its size either way."""
    names, _ = build(share, "qcow2-overlay")
    mnt = vfsnap_mount()
    size = os.stat(mnt.volume("vol")).st_size
    expected = bytearray(mnt.volume("vol").read_bytes())
    source = tmp_path / "src.bin"
    source.write_bytes(b"\x99" * 64 * KiB)
    result = subprocess.run(["dd", f"if={source}", f"of={mnt.volume('vol')}", "bs=64k"],
                            check=False, capture_output=True, text=True)
    assert result.returncode != 0 and "Operation not permitted" in result.stderr, result.stderr
    assert mnt.volume("vol").read_bytes() == expected
    result = subprocess.run(["dd", f"if={source}", f"of={mnt.volume('vol')}", "bs=64k", "seek=3"],
                            check=False, capture_output=True, text=True)
    assert "failed to truncate" in result.stderr and "Operation not permitted" in result.stderr, result.stderr
    if "records out" in result.stderr and "0+0 records out" not in result.stderr:
        expected[3 * 64 * KiB:4 * 64 * KiB] = b"\x99" * 64 * KiB
    assert os.stat(mnt.volume("vol")).st_size == size
    assert mnt.volume("vol").read_bytes() == expected
    mnt.stop()
    assert flat_bytes(share / names[-1], tmp_path) == expected
    assert check(share / names[-1])["exit"] == 0


# -- O_DSYNC / O_SYNC / fsync followed by a crash ----------------------------------------------------


SYNC_CASES = [(how, kind) for how in ("O_DSYNC", "O_SYNC", "fsync", "fdatasync")
              for kind in ("raw", "qcow2-overlays-4k")]
SYNC_CASES += [("O_DSYNC", "qcow2-overlay"), ("O_DSYNC", "qcow2-base-512"), ("fsync", "qcow2-base-512")]


@pytest.mark.parametrize("how,kind", SYNC_CASES)
def test_acknowledged_sync_writes_survive_a_crash(how, kind, share, tmp_path, vfsnap_mount):
    """Writes acknowledged by an O_DSYNC/O_SYNC write or by fsync survive SIGKILL of the daemon
    with the file still open (no close, no unmount); the images need no more than leak repair."""
    names, top_fmt = build(share, kind)
    mnt = vfsnap_mount()
    expected = bytearray(mnt.volume("vol").read_bytes())
    flags = os.O_WRONLY | {"O_DSYNC": os.O_DSYNC, "O_SYNC": os.O_SYNC}.get(how, 0)
    fd = os.open(mnt.volume("vol"), flags)
    rng = random.Random(how + kind)
    for _ in range(12):
        length = rng.choice([1, 511, 4096, 70000, 300000])
        offset = rng.randrange(0, 8 * MiB - length)
        data = rng.randbytes(length)
        assert os.pwrite(fd, data, offset) == length
        expected[offset:offset + length] = data
    if how == "fsync":
        os.fsync(fd)
    elif how == "fdatasync":
        os.fdatasync(fd)
    mnt.kill()  # the fd is still open: nothing was flushed by a close
    try:
        os.close(fd)
    except OSError:
        pass
    for name in names:
        if fmt_of(share / name) == "qcow2":
            result = check(share / name)
            assert result["exit"] in (0, 3), f"{name} after a crash: {result}"
    assert flat_bytes(share / names[-1], tmp_path, fmt=top_fmt) == expected
    # The next mount serves the same data, and leaves the images clean.
    mnt = vfsnap_mount()
    assert mnt.volume("vol").read_bytes() == expected
    mnt.stop()
    for name in names:
        if fmt_of(share / name) == "qcow2":
            assert check(share / name)["exit"] == 0, name


# -- O_DIRECT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["raw", "qcow2-overlay", "qcow2-overlays-4k"])
def test_o_direct_writes_with_aligned_buffers(kind, share, tmp_path, vfsnap_mount):
    """A program using O_DIRECT with page-aligned buffers (mmap), as databases and hypervisors do."""
    names, top_fmt = build(share, kind)
    mnt = vfsnap_mount()
    expected = bytearray(mnt.volume("vol").read_bytes())
    fd = os.open(mnt.volume("vol"), os.O_RDWR | os.O_DIRECT)
    rng = random.Random(kind)
    buffer = mmap.mmap(-1, 1 * MiB)
    try:
        for _ in range(20):
            length = rng.choice([512, 4096, 65536, 1 * MiB]) if kind != "raw" else rng.choice([4096, 1 * MiB])
            offset = rng.randrange(0, (8 * MiB - length) // 4096) * 4096
            data = rng.randbytes(length)
            buffer[:length] = data
            view = memoryview(buffer)[:length]
            assert os.pwritev(fd, [view], offset) == length
            view.release()
            expected[offset:offset + length] = data
            readback = mmap.mmap(-1, length)
            try:
                assert os.preadv(fd, [readback], offset) == length
                assert readback[:] == data
            finally:
                readback.close()
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()
    assert mnt.volume("vol").read_bytes() == expected
    assert_identical(mnt.volume("vol"), share / names[-1], top_fmt)
    mnt.stop()
    assert flat_bytes(share / names[-1], tmp_path, fmt=top_fmt) == expected
    for name in names:
        if fmt_of(share / name) == "qcow2":
            assert check(share / name)["exit"] == 0, name


def test_writes_past_the_end_are_clipped_or_enospc(share, vfsnap_mount):
    """Like a block device: a write across the end is short, a write at or past it ENOSPC."""
    build(share, "qcow2-overlay")
    mnt = vfsnap_mount()
    size = os.stat(mnt.volume("vol")).st_size
    fd = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"\xab" * 4096, size - 1000) == 1000
        for offset in (size, size + 1, size + 10 * MiB):
            with pytest.raises(OSError) as exc:
                os.pwrite(fd, b"x" * 512, offset)
            assert exc.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == size
        assert os.pread(fd, 2000, size - 1000) == b"\xab" * 1000
    finally:
        os.close(fd)
    assert os.stat(mnt.volume("vol")).st_size == size


@pytest.mark.parametrize("kind", ["raw", "qcow2-overlays-4k"])
def test_shared_mmap_writes(kind, share, tmp_path, vfsnap_mount):
    """A program writing through a shared mapping of the volume (msync): the kernel writes the
    dirty pages back to the daemon."""
    names, top_fmt = build(share, kind)
    mnt = vfsnap_mount()
    expected = bytearray(mnt.volume("vol").read_bytes())
    rng = random.Random(kind)
    with open(mnt.volume("vol"), "r+b") as f:
        with mmap.mmap(f.fileno(), 8 * MiB, access=mmap.ACCESS_WRITE) as mapping:
            for _ in range(40):
                length = rng.choice([1, 100, 4096, 20000])
                offset = rng.randrange(0, 8 * MiB - length)
                data = rng.randbytes(length)
                mapping[offset:offset + length] = data
                expected[offset:offset + length] = data
            mapping.flush()
        os.fsync(f.fileno())
    fd = os.open(mnt.volume("vol"), os.O_RDONLY | os.O_DIRECT)
    try:
        got = b"".join(os.pread(fd, 1 * MiB, off) for off in range(0, 8 * MiB, 1 * MiB))
    finally:
        os.close(fd)
    assert got == expected
    mnt.stop()
    assert flat_bytes(share / names[-1], tmp_path, fmt=top_fmt) == expected
    for name in names:
        if fmt_of(share / name) == "qcow2":
            assert check(share / name)["exit"] == 0, name


@requires_fio
@pytest.mark.parametrize("volume_format", ["raw", "qcow2"])
def test_fio_on_a_volume_created_through_the_mount(volume_format, share, tmp_path, vfsnap_mount):
    """The images vfsnap creates itself take the same load: `truncate -s`, then fio with verify."""
    size = 8 * MiB
    mnt = vfsnap_mount(f"volume_format={volume_format}")
    subprocess.run(["truncate", "-s", str(size), str(mnt.volume("new"))], check=True)
    job = ("--rw=randwrite", "--bsrange=4k-64k", f"--size={size}", "--verify=crc32c", "--verify_fatal=1",
           "--io_size=6M")
    result = fio(mnt.volume("new"), *job, "--do_verify=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_identical(mnt.volume("new"), share / "new", volume_format)
    assert mnt.stop() == 0
    if volume_format == "qcow2":
        assert check(share / "new")["exit"] == 0
    mnt = vfsnap_mount()
    result = fio(mnt.volume("new"), *job, "--verify_only=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("kind", ["raw", "qcow2-overlays-4k"])
def test_background_flush_writes_metadata_back(kind, share, tmp_path, vfsnap_mount):
    """Without any fsync, the periodic write-back (metadata_flush_interval) makes writes durable:
    a crash once the share shows them loses nothing."""
    names, top_fmt = build(share, kind)
    mnt = vfsnap_mount("metadata_flush_interval=0.2")
    expected = bytearray(mnt.volume("vol").read_bytes())
    fd = os.open(mnt.volume("vol"), os.O_WRONLY)
    rng = random.Random(kind)
    for _ in range(10):
        offset, length = rng.randrange(0, 8 * MiB - 70000), rng.choice([1, 4096, 70000])
        data = rng.randbytes(length)
        assert os.pwrite(fd, data, offset) == length
        expected[offset:offset + length] = data
    def written_back() -> bool:
        # -U: read while vfsnap holds the image; a half-written table reads as a failure, and is
        # polled again.
        out = tmp_path / "written-back.raw"
        converted = qemu_img("convert", "-U", "-f", top_fmt, "-O", "raw", str(share / names[-1]), str(out),
                             check=False)
        return converted.returncode == 0 and out.read_bytes() == expected

    wait_for(written_back, "the periodic write-back to reach the share", timeout=15, interval=0.1)
    mnt.kill()
    try:
        os.close(fd)
    except OSError:
        pass
    for name in names:
        if fmt_of(share / name) == "qcow2":
            assert check(share / name)["exit"] in (0, 3), name
    assert flat_bytes(share / names[-1], tmp_path, fmt=top_fmt) == expected


@requires_fio
def test_fio_two_jobs_with_a_tiny_table_cache(share, tmp_path, vfsnap_mount):
    """Two writers at once on a 512-byte-cluster overlay while the L2-table cache holds almost
    nothing (table_cache_size=8k, map_cache_chunks=2): dirty tables must never be lost to eviction."""
    names, top_fmt = build(share, "qcow2-base-512", 16 * MiB)
    mnt = vfsnap_mount("table_cache_size=8k,map_cache_chunks=2")
    vol = mnt.volume("vol")
    job = ("--numjobs=2", "--offset_increment=8M", "--size=8M", "--rw=randwrite", "--bsrange=512-16k",
           "--verify=crc32c", "--verify_fatal=1", "--io_size=3M", "--group_reporting")
    result = fio(vol, *job, "--do_verify=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_identical(vol, share / names[-1], top_fmt)
    assert mnt.stop() == 0
    assert check(share / names[-1])["exit"] == 0
    mnt = vfsnap_mount()
    result = fio(mnt.volume("vol"), *job, "--verify_only=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
