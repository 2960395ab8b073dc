"""A slow share must not stall the whole mount (docs/operations.md, "Performance notes").

vfsnap serves every request on one thread. The long wait of an fsync, for the share to store the
data written since the last one, runs on a worker thread (`Volume.flush_async`,
`share.volume.sync_data`), so that requests for other volumes go on meanwhile. The share is made
slow with the test-only fault hook (tests/faults.py, `VFSNAP_FAULTS=slow:SECONDS`: every fdatasync first sleeps).

The in-process tests pin down the bookkeeping that makes this safe: a sync begun on another
thread marks the data clean only if no write came in while it ran, so the ordered flush after it
still syncs any data before writing metadata that points at it.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from tests.conftest import requires_fuse
from tests.qemu import check as qemu_check
from tests.qemu import create, flat_bytes, make_chain, qemu_io
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
