"""A slow share must not stall the whole mount (docs/operations.md, "Performance notes").

vfsnap serves every request on one thread. The long wait of an fsync, for the share to store the
data written since the last one, runs on a worker thread (`Volume.flush_async`,
`share.volume.sync_data`), so that requests for other volumes go on meanwhile. The share is made
slow with the test-only fault hook (tests/faults.py, `VFSNAP_FAULTS=slow:SECONDS`: every fdatasync first sleeps).
Reads and writes that wait for the share run on its worker threads too (vfsnap/share/io.py;
`share_io=threads` treats the local test directory as the network share it stands for), so a
slow read or write of one volume does not hold back requests for another.

The in-process tests pin down the bookkeeping that makes this safe: a sync begun on another
thread marks the data clean only if no write came in while it ran, so the ordered flush after it
still syncs any data before writing metadata that points at it.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from tests.conftest import requires_fuse
from tests.qemu import check as qemu_check
from tests.qemu import create, flat_bytes, make_chain, qemu_io
from tests.test_faults import OPTIONS as FAULT_OPTIONS
from tests.test_faults import mounts  # noqa: F401 (fixture)
from vfsnap.chain.view import View
from vfsnap.errors import VfsnapError
from vfsnap.format.cache import TableCache
from vfsnap.format.qcow2 import Qcow2Image
from vfsnap.format.raw import RawImage
from vfsnap.share.volume import sync_data

MiB = 1 << 20
SLOW = 4.0  # seconds each fdatasync of the slow share takes


@requires_fuse
def test_a_slow_fsync_of_one_volume_does_not_hold_back_another(mounts, tmp_path: Path):  # noqa: F811
    share = tmp_path / "share"
    share.mkdir()
    make_chain(share, "a", size=4 * MiB, depth=0)
    make_chain(share, "b", size=4 * MiB, depth=0)
    qemu_io(share / "b", "write -P 0x5b 0 1M", fmt="raw")
    expected_b = flat_bytes(share / "b", tmp_path, fmt="raw")[:MiB]
    mnt = mounts.start(share, faults=f"slow:{SLOW}", ops="fdatasync")

    fd = os.open(mnt.volume("a"), os.O_RDWR)
    try:
        # More than SYNC_ON_WORKER_BYTES: less is synced on the request thread, being quick.
        os.pwrite(fd, b"\xaa" * (2 * MiB), 0)
        synced = threading.Event()
        outcome: dict = {}

        def fsync_a():
            try:
                os.fsync(fd)
                outcome["ok"] = True
            except OSError as exc:
                outcome["error"] = exc
            finally:
                synced.set()

        syncer = threading.Thread(target=fsync_a)
        syncer.start()
        time.sleep(0.5)  # the daemon is now waiting for the slow share
        assert not synced.is_set(), "the fault hook did not slow the fsync down: the test proves nothing"

        # Volume b: lookup, open and an O_DIRECT read, each a request to the daemon.
        fd_b = os.open(mnt.volume("b"), os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, MiB)  # page-aligned, as O_DIRECT wants
            assert os.preadv(fd_b, [buf], 0) == MiB
            assert bytes(buf) == expected_b
        finally:
            os.close(fd_b)
        assert not synced.is_set(), "reading volume b waited for the fsync of volume a"

        syncer.join(SLOW * 10)
        assert outcome == {"ok": True}
        assert os.pread(fd, 2 * MiB, 0) == b"\xaa" * (2 * MiB)
    finally:
        os.close(fd)
    assert (share / "a").read_bytes()[: 2 * MiB] == b"\xaa" * (2 * MiB)


def _start_slow(mounts, share: Path, plan: str, ops: str):
    """A mount through the fault launcher (tests/faults.py) whose share is slow for `ops`, its
    I/O on the share's threads as on a network share (`share_io=threads`)."""
    return mounts.start(share, faults=plan, ops=ops, options=f"{FAULT_OPTIONS},share_io=threads")


def _raw_volume_known_to_vfsnap(share: Path, name: str, data: bytes) -> None:
    """A raw volume whose format vfsnap has recorded: opening it reads nothing (no probe)."""
    from vfsnap.names import sidecar_file
    from vfsnap.share.info import Sidecar

    (share / name).write_bytes(data)  # and its pages stay in the page cache
    (share / sidecar_file(name)).write_bytes(Sidecar(base_format="raw").to_json())


def _in_background(fn) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = fn()
        except OSError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _pread_direct(fd: int, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    got = os.preadv(fd, [buf], offset)
    return bytes(buf[:got])


SLOW_IO = 0.5  # seconds each pread or pwrite of the slow share takes


def _drop_cached_pages(path: Path) -> None:
    """Evict `path` from the page cache, so that reading it has to ask the (slow) share."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _b_answers_meanwhile(mnt, expected_b: bytes, offset: int, background, what: str) -> None:
    """A 1 MiB read of volume b returns the right bytes while `background`, the slow `what` of
    volume a, still waits for the share; then waits for `background` to end."""
    fd_b = os.open(mnt.volume("b"), os.O_RDONLY | os.O_DIRECT)
    try:
        assert _pread_direct(fd_b, offset, MiB) == expected_b[offset : offset + MiB]
    finally:
        os.close(fd_b)
    assert background.is_alive(), f"reading volume b waited for the slow {what} of volume a"
    background.join(SLOW_IO * 60)


@requires_fuse
def test_a_slow_read_of_one_volume_does_not_hold_back_another(mounts, tmp_path: Path):  # noqa: F811
    share = tmp_path / "share"
    share.mkdir()
    # Volume a: a qcow2 chain whose tables and data must all be read from the slow share.
    names = make_chain(share, "a", size=8 * MiB, depth=2, base_fmt="qcow2",
                       writes=lambda level, path, fmt: qemu_io(path, f"write -P {0x41 + level} {level}M 2M", fmt=fmt))
    expected_a = flat_bytes(share / names[-1], tmp_path)
    for name in names:
        _drop_cached_pages(share / name)  # else the page cache answers (RWF_NOWAIT), as it should
    expected_b = bytes(range(256)) * (4 * MiB // 256)
    _raw_volume_known_to_vfsnap(share, "b", expected_b)
    mnt = _start_slow(mounts, share, f"slow:{SLOW_IO}", "pread")

    fd_a = os.open(mnt.volume("a"), os.O_RDONLY | os.O_DIRECT)  # reads headers: slow, but done now
    try:
        # Tables of three images and the data: several slow preads, one after the other.
        reader, outcome = _in_background(lambda: _pread_direct(fd_a, 2 * MiB + 4096, 64 * 1024))
        _b_answers_meanwhile(mnt, expected_b, MiB, reader, "read")
        assert outcome == {"result": expected_a[2 * MiB + 4096 : 2 * MiB + 4096 + 65536]}
    finally:
        os.close(fd_a)


@requires_fuse
def test_a_slow_write_of_one_volume_does_not_hold_back_another(mounts, tmp_path: Path):  # noqa: F811
    share = tmp_path / "share"
    share.mkdir()
    make_chain(share, "a", size=8 * MiB, depth=1, base_fmt="raw",
               writes=lambda level, path, fmt: qemu_io(path, f"write -P {0x61 + level} 0 1M", fmt=fmt))
    expected_b = bytes(range(256)) * (4 * MiB // 256)
    _raw_volume_known_to_vfsnap(share, "b", expected_b)
    mnt = _start_slow(mounts, share, f"slow:{SLOW_IO}", "pwrite")

    payload = b"\xa7" * 12288
    fd_a = os.open(mnt.volume("a"), os.O_RDWR)
    try:
        # Copy-on-write into the overlay: the header's dirty mark, then the data, each slow.
        writer, outcome = _in_background(lambda: os.pwrite(fd_a, payload, 3 * MiB + 512))
        _b_answers_meanwhile(mnt, expected_b, 0, writer, "write")
        assert outcome == {"result": len(payload)}
        os.fsync(fd_a)
        assert os.pread(fd_a, len(payload), 3 * MiB + 512) == payload
    finally:
        os.close(fd_a)


@requires_fuse
@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_a_snapshot_of_a_volume_with_unsynced_writes_does_not_hold_back_another(mounts, tmp_path: Path,  # noqa: F811
                                                                               base_fmt):
    """`mkdir` of a snapshot first writes the active image back (data, metadata, its dirty mark
    cleared): with every fdatasync of the share slow, that runs on the share's threads and a
    read of another volume is answered meanwhile; the snapshot holds the writes."""
    share = tmp_path / "share"
    share.mkdir()
    make_chain(share, "a", size=8 * MiB, depth=1 if base_fmt == "qcow2" else 0, base_fmt=base_fmt)
    expected_b = bytes(range(256)) * (4 * MiB // 256)
    _raw_volume_known_to_vfsnap(share, "b", expected_b)
    mnt = _start_slow(mounts, share, f"slow:{SLOW_IO}", "fdatasync")

    payload = b"\x5e" * (3 * MiB)
    with open(mnt.volume("a"), "r+b") as fa:
        fa.seek(MiB + 512)
        fa.write(payload)
        fa.flush()  # to the daemon (a write, not a sync): unsynced there
        snapshot = mnt.snapshot_dir("a", "s")
        taker, outcome = _in_background(lambda: os.mkdir(snapshot))
        time.sleep(0.2)
        assert taker.is_alive(), "the snapshot did not wait for the slow share: the test proves nothing"
        _b_answers_meanwhile(mnt, expected_b, MiB, taker, "snapshot")
        assert outcome == {"result": None}
    expected_a = bytearray(8 * MiB)
    expected_a[MiB + 512 : MiB + 512 + len(payload)] = payload
    assert mnt.snapshot("a", "s").read_bytes() == bytes(expected_a)
    assert mnt.volume("a").read_bytes() == bytes(expected_a)


@requires_fuse
@pytest.mark.parametrize(("base_fmt", "ops"), [("raw", "ftruncate"), ("qcow2", "pwrite,fdatasync")])
def test_growing_a_volume_does_not_hold_back_another(mounts, tmp_path: Path, base_fmt, ops):  # noqa: F811
    """`truncate` to a larger size makes its calls on the share (ftruncate of a raw file; the
    header and L1 table of a qcow2 overlay) on the share's threads: with those calls slow, a
    read of another volume is answered meanwhile; the grown area reads as zeros."""
    share = tmp_path / "share"
    share.mkdir()
    make_chain(share, "a", size=8 * MiB, depth=1 if base_fmt == "qcow2" else 0, base_fmt=base_fmt,
               writes=lambda level, path, fmt: qemu_io(path, f"write -P {0x61 + level} 0 1M", fmt=fmt))
    expected_b = bytes(range(256)) * (4 * MiB // 256)
    _raw_volume_known_to_vfsnap(share, "b", expected_b)
    mnt = _start_slow(mounts, share, f"slow:{SLOW_IO}", ops)

    grower, outcome = _in_background(lambda: os.truncate(mnt.volume("a"), 24 * MiB))
    time.sleep(0.2)
    assert grower.is_alive(), "growing the volume did not wait for the slow share: the test proves nothing"
    _b_answers_meanwhile(mnt, expected_b, MiB, grower, "truncate")
    assert outcome == {"result": None}
    assert os.stat(mnt.volume("a")).st_size == 24 * MiB
    data = mnt.volume("a").read_bytes()
    assert data[:MiB] == bytes([0x61 + (base_fmt == "qcow2")]) * MiB
    assert data[MiB:] == bytes(23 * MiB)


@requires_fuse
@pytest.mark.parametrize("change", ["mkdir", "rmdir"])
def test_a_snapshot_taken_or_deleted_on_a_slow_share_does_not_hold_back_another(mounts, tmp_path: Path,  # noqa: F811
                                                                               change):
    """The files a snapshot's `mkdir` or `rmdir` writes on the share (the record's journal, the
    new overlay, `.info`, each fsynced and renamed into place) are written on the share's
    threads: with every fsync and rename slow, a read of another volume is answered while the
    change waits. Then the deletion's merge and commit run (`vfsnap sync`) and every view holds
    what it held."""
    share = tmp_path / "share"
    share.mkdir()
    names = make_chain(share, "a", size=8 * MiB, depth=2, base_fmt="qcow2",
                       writes=lambda level, path, fmt: qemu_io(path, f"write -P {0x41 + level} {level}M 2M", fmt=fmt))
    expected_a = flat_bytes(share / names[-1], tmp_path)
    expected_s2 = flat_bytes(share / names[1], tmp_path)
    expected_b = bytes(range(256)) * (4 * MiB // 256)
    _raw_volume_known_to_vfsnap(share, "b", expected_b)
    mnt = _start_slow(mounts, share, f"slow:{SLOW_IO}", "fsync,rename")

    assert sorted(os.listdir(mnt.snapshot_dir("a"))) == ["latest", "s1", "s2"]
    if change == "mkdir":
        background, outcome = _in_background(lambda: os.mkdir(mnt.snapshot_dir("a", "s3")))
    else:
        background, outcome = _in_background(lambda: os.rmdir(mnt.snapshot_dir("a", "s1")))
    time.sleep(0.2)
    assert background.is_alive(), f"{change} did not wait for the slow share: the test proves nothing"
    _b_answers_meanwhile(mnt, expected_b, MiB, background, change)
    assert outcome == {"result": None}
    subprocess.run([sys.executable, "-m", "vfsnap", "sync", str(mnt.path), "--timeout", "120"], check=True,
                   timeout=180)
    left = ["latest", "s1", "s2", "s3"] if change == "mkdir" else ["latest", "s2"]
    assert sorted(os.listdir(mnt.snapshot_dir("a"))) == left
    assert mnt.volume("a").read_bytes() == expected_a
    assert mnt.snapshot("a", "s2").read_bytes() == expected_s2
    if change == "mkdir":
        assert mnt.snapshot("a", "s3").read_bytes() == expected_a


@requires_fuse
@pytest.mark.parametrize(("change", "ops"), [("rename", "rename,fsync"), ("rm", "unlink,fsync")])
def test_renaming_or_removing_a_volume_on_a_slow_share_does_not_hold_back_another(mounts, tmp_path: Path,  # noqa: F811
                                                                                  change, ops):
    """`mv` renames every file of the chain and rewrites `.info` and the record; `rm` removes the
    files: with those calls slow, a read of another volume is answered while they wait. (Volume b
    is opened before: the kernel itself holds lookups in `volumes/` back while a rename or an
    unlink in it is under way, whatever the filesystem does.)"""
    share = tmp_path / "share"
    share.mkdir()
    names = make_chain(share, "a", size=8 * MiB, depth=2 if change == "rename" else 0, base_fmt="qcow2",
                       writes=lambda level, path, fmt: qemu_io(path, f"write -P {0x41 + level} {level}M 2M", fmt=fmt))
    expected_a = flat_bytes(share / names[-1], tmp_path)
    expected_b = bytes(range(256)) * (4 * MiB // 256)
    _raw_volume_known_to_vfsnap(share, "b", expected_b)
    mnt = _start_slow(mounts, share, f"slow:{SLOW_IO}", ops)

    fd_b = os.open(mnt.volume("b"), os.O_RDONLY | os.O_DIRECT)
    try:
        if change == "rename":
            background, outcome = _in_background(lambda: os.rename(mnt.volume("a"), mnt.volume("c")))
        else:
            background, outcome = _in_background(lambda: os.unlink(mnt.volume("a")))
        time.sleep(0.2)
        assert background.is_alive(), f"{change} did not wait for the slow share: the test proves nothing"
        assert _pread_direct(fd_b, MiB, MiB) == expected_b[MiB : 2 * MiB]
        assert background.is_alive(), f"reading volume b waited for the slow {change} of volume a"
        background.join(SLOW_IO * 60)
    finally:
        os.close(fd_b)
    assert outcome == {"result": None}
    if change == "rename":
        assert sorted(os.listdir(mnt.path / "volumes")) == ["b", "c"]
        assert mnt.volume("c").read_bytes() == expected_a
        assert sorted(os.listdir(mnt.snapshot_dir("c"))) == ["latest", "s1", "s2"]
    else:
        assert sorted(os.listdir(mnt.path / "volumes")) == ["b"]
        assert sorted(n for n in os.listdir(share) if n.startswith("a")) == []


# -- the bookkeeping ----------------------------------------------------------------------------


def _qcow2_view(path: Path) -> tuple[View, Qcow2Image]:
    image = Qcow2Image(os.open(path, os.O_RDWR), path.name, writable=True, table_cache=TableCache())
    return View([image], name=path.name), image


def test_a_write_during_an_off_loop_sync_keeps_the_data_marked_for_the_flush(tmp_path: Path):
    path = tmp_path / "vol"
    create(path, 4 * MiB, fmt="qcow2")
    view, image = _qcow2_view(path)
    try:
        view.write(0, b"\x01" * 65536)
        ticket = image.begin_data_sync()
        assert ticket is not None
        fd, generation = ticket
        os.fdatasync(fd)
        os.close(fd)
        view.write(65536, b"\x02" * 65536)  # came in while the sync ran: not covered by it
        image.data_synced(generation)
        assert image._data_dirty, "a write after the sync began was marked as stored"
        # With no write in between, the sync covers everything written so far.
        ticket = image.begin_data_sync()
        fd, generation = ticket
        os.fdatasync(fd)
        os.close(fd)
        image.data_synced(generation)
        assert not image._data_dirty
        assert image.begin_data_sync() is None  # nothing left to sync
        assert image.dirty  # but the metadata (L2 entries, refcounts) still waits for flush
        image.close_writes()
    finally:
        image.close()
    report = qemu_check(path)
    assert report["exit"] == 0, report
    raw = flat_bytes(path, tmp_path)
    assert raw[:65536] == b"\x01" * 65536 and raw[65536:131072] == b"\x02" * 65536


async def test_sync_data_runs_on_a_thread_and_other_tasks_go_on(tmp_path: Path, monkeypatch):
    path = tmp_path / "raw"
    path.write_bytes(bytes(MiB))
    image = RawImage(os.open(path, os.O_RDWR), "raw", writable=True)
    image.write(0, b"\x07" * 4096)
    real_fdatasync = os.fdatasync
    threads = []

    def slow_fdatasync(fd):
        threads.append(threading.current_thread())
        time.sleep(0.5)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    ticks = []

    async def ticker():
        while True:
            ticks.append(None)
            await trio.sleep(0.01)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await sync_data(image, min_bytes=0)
            nursery.cancel_scope.cancel()
        assert threads and threads[0] is not threading.main_thread()
        assert len(ticks) > 5, "the event loop stood still during the sync"
        assert not image.dirty
    finally:
        image.close()


async def test_a_failed_off_loop_sync_leaves_the_data_dirty_and_reports_the_errno(tmp_path: Path, monkeypatch):
    path = tmp_path / "raw"
    path.write_bytes(bytes(MiB))
    image = RawImage(os.open(path, os.O_RDWR), "raw", writable=True)
    image.write(0, b"\x07" * 4096)

    def failing_fdatasync(fd):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    try:
        with pytest.raises(VfsnapError) as info:
            await sync_data(image, 0)
        assert info.value.errno == errno.EIO
        assert image.dirty
    finally:
        image.close()


async def test_little_unsynced_data_is_left_to_the_flush_on_the_request_thread(tmp_path: Path, monkeypatch):
    """Below SYNC_ON_WORKER_BYTES the worker is not used (its sync would only add one to the
    flush); from it on it is, and a flush afterwards has no data left to sync."""
    from vfsnap.share.volume import SYNC_ON_WORKER_BYTES

    path = tmp_path / "raw"
    path.write_bytes(bytes(4 * MiB))
    image = RawImage(os.open(path, os.O_RDWR), "raw", writable=True)
    calls = []
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd):
        calls.append(threading.current_thread() is threading.main_thread())
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    try:
        image.write(0, b"\x01" * (SYNC_ON_WORKER_BYTES - 4096))
        await sync_data(image)
        assert calls == [] and image.dirty
        image.flush()
        assert calls == [True] and not image.dirty
        image.write(0, b"\x02" * SYNC_ON_WORKER_BYTES)
        await sync_data(image)
        assert calls == [True, False] and not image.dirty
        image.flush()
        assert calls == [True, False], "the flush synced again what the worker had stored"
    finally:
        image.close()


@pytest.mark.parametrize("text, message", [("share_io=fast", "share_io must be auto, threads or inline"),
                                           ("share_threads=0", "share_threads must be at least 1"),
                                           ("share_threads=many", "bad value for mount option share_threads")])
def test_bad_share_io_options_are_refused_with_a_clear_message(text, message):
    from vfsnap.errors import InvalidName
    from vfsnap.options import parse_options

    with pytest.raises(InvalidName, match=message):
        parse_options(text)
    assert parse_options("share_io=threads,share_threads=4").share_threads == 4


@requires_fuse
def test_a_daemonized_mount_answers_lookups_from_its_own_threads(share: Path, tmp_path: Path):
    """`vfsnap mount` without -f opens the shares, then forks: the share's lookup threads must be
    the daemon's own, or every lookup waits for threads that do not exist and the share looks
    hung (vfsnap/share/io.py)."""
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    data = bytes(range(256)) * 4096
    _raw_volume_known_to_vfsnap(share, "v", data)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run([sys.executable, "-m", "vfsnap", "mount", "-o", "share_io=threads", str(share), str(mnt)],
                   cwd=ROOT, check=True, timeout=60)
    try:
        assert os.listdir(mnt / "volumes") == ["v"]
        assert (mnt / "volumes" / "v").read_bytes() == data
        status = subprocess.run([sys.executable, "-m", "vfsnap", "status", "--json", str(mnt)], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=60)
        assert json.loads(status.stdout)["shares"] == [{"path": str(share), "answering": True}]
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False, timeout=60)


def test_resolving_a_range_over_many_missing_tables_reads_them_in_one_hand_off(tmp_path: Path):
    """On the loop a resolution does not read the share: a missing L2 table goes to a worker
    thread, and the resolution is tried again. A 1 MiB chunk of 512-byte clusters spans 32 L2
    tables (64 entries each) per image: one hand-off per image of the chain reads every missing
    table the chunk needs, tables next to each other in the file in one read. One per table
    mapped the chunk again from its start each time (the hostile many-tables test took 117 s).
    The bytes read are QEMU's, with a table cache too small to keep one chunk's tables."""
    from vfsnap.share.io import ShareIO

    def fill(level, path, fmt):
        # A data cluster in every L2 table's range of the base, every third range in the overlay.
        step = 3 if level else 1
        commands = [f"write -P {0x10 + level * 16 + i % 16} {i * 32768 + 512 * (i % 64)} 512"
                    for i in range(0, 2 * MiB // 32768, step)]
        qemu_io(path, *commands, fmt=fmt)

    names = make_chain(tmp_path, "vol", size=2 * MiB, depth=1, base_fmt="qcow2", cluster_size=512, writes=fill)
    expected = flat_bytes(tmp_path / names[-1], tmp_path)
    io = ShareIO(str(tmp_path), threaded=True)
    cache = TableCache(8 * 1024)  # 16 tables of 512 bytes: fewer than a chunk spans
    images = [Qcow2Image(os.open(tmp_path / name, os.O_RDONLY), name, writable=False, table_cache=cache)
              for name in names]
    view = View(images, name="vol", io=io)
    hand_offs: list[str] = []
    run = io.run

    async def counted(what, fn, *args):
        hand_offs.append(what)
        return await run(what, fn, *args)

    io.run = counted

    async def read_all() -> bytes:
        parts = []
        for offset in range(0, 2 * MiB, 256 * 1024):
            before = hand_offs.count("table load")
            parts.append(bytes(await view.read_async(offset, 256 * 1024)))
            if offset % MiB == 0:  # the first read of each chunk resolves it
                loads = hand_offs.count("table load") - before
                assert 1 <= loads <= len(images), f"{loads} table loads for one chunk of {len(images)} images"
        return b"".join(parts)

    try:
        assert trio.run(read_all) == expected
    finally:
        for image in images:
            image.close()
