"""Reads and writes answered on FUSE reader threads, the rest relayed to pyfuse3
(vfsnap/fs/relay.py, issue 12).

The threads read only from maps the loop resolved, while writes (on the loop or on the threads)
patch them and the loop replaces them on snapshots and merges: the bytes must stay those of the
chain (qemu-img convert), and a read may see a block as it was before or after a write that
overlaps it, never older than a write finished before the read began, nor anything that was
never written there. A write on a thread holds the volume's write lock as one on the loop does,
and its errors reach the program that wrote.
"""

from __future__ import annotations

import errno
import mmap
import os
import random
import re
import subprocess
import threading
import time

import pytest

from tests.conftest import requires_fuse
from tests.qemu import flat_bytes, make_chain, qemu_img, qemu_io
from tests.test_faults import ERRNOS, count_write, middle, sweep, write_case
from tests.test_faults import OPTIONS as FAULT_OPTIONS
from tests.test_faults import mounts, template  # noqa: F401 (fixtures)

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4 * KiB
HOT = 256  # blocks the writers write: readers mostly read there too


def _answered_on_threads(mnt, what: str = "reads") -> int:
    found = re.findall(r"(\d+) reads and (\d+) writes were answered on FUSE reader threads", mnt.log())
    assert found, "the mount did not report its reader threads:\n" + mnt.log()[-2000:]
    reads, writes = found[-1]
    return int(reads if what == "reads" else writes)


def _scattered(level, path, fmt):
    if level == 0:
        qemu_io(path, "write -P 0x11 0 8M", fmt=fmt)
        return
    qemu_io(path, *[f"write -P {0x30 + level} {mib * MiB + level * 192 * KiB} 64k" for mib in range(8)], fmt=fmt)


def _read_all(path, size: int, workers: int = 4) -> bytes:
    """The whole file in 4 KiB O_DIRECT reads, from `workers` threads at once."""
    out = bytearray(size)
    errors: list[BaseException] = []

    def work(first: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        try:
            for offset in range(first * BLOCK, size, workers * BLOCK):
                assert os.preadv(fd, [buf], offset) == BLOCK
                out[offset : offset + BLOCK] = buf[:]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return bytes(out)


# A local directory's I/O stays on the loop (`share_io=inline`): reader threads come only when
# asked for there (`fuse_threads=auto` gives them to network shares).
RELAYED = ["share_io=threads", "share_io=inline,fuse_threads=24"]


@requires_fuse
@pytest.mark.parametrize("options", RELAYED)
def test_reads_on_reader_threads_equal_qemu(share, tmp_path, vfsnap_mount, options):
    names = make_chain(share, "vol", size=8 * MiB, depth=3, base_fmt="raw", cluster_size=64 * KiB,
                       writes=_scattered)
    expected = flat_bytes(share / names[-1], tmp_path)
    mnt = vfsnap_mount(options)
    for _ in range(2):  # the first pass resolves the maps on the loop, the second needs none
        assert _read_all(mnt.volume("vol"), 8 * MiB) == expected
    os.mkdir(mnt.snapshot_dir("vol", "s"))
    assert _read_all(mnt.snapshot("vol", "s"), 8 * MiB) == expected
    mnt.stop()
    # Most reads, once the maps were resolved, never reached the loop.
    assert _answered_on_threads(mnt) >= 8 * MiB // BLOCK


@requires_fuse
@pytest.mark.parametrize("options", ["fuse_threads=0", "", "fuse_threads=auto"])
def test_without_reader_threads_pyfuse3_answers_everything(share, tmp_path, vfsnap_mount, options):
    """`fuse_threads=0`, and the default (`auto`) on a local directory: its writes into the page
    cache cost half as much without the relay's extra hop (bench/write_bench.py)."""
    names = make_chain(share, "vol", size=8 * MiB, depth=2, base_fmt="raw", cluster_size=64 * KiB,
                       writes=_scattered)
    expected = flat_bytes(share / names[-1], tmp_path)
    mnt = vfsnap_mount(options)
    assert _read_all(mnt.volume("vol"), 8 * MiB) == expected
    mnt.stop()
    assert "answered on FUSE reader threads" not in mnt.log()


@pytest.mark.parametrize("text, value", [("", None), ("fuse_threads=auto", None), ("fuse_threads=0", 0),
                                         ("fuse_threads=8", 8)])
def test_fuse_threads_option(text, value):
    from vfsnap.options import parse_options

    assert parse_options(text).fuse_threads == value


@pytest.mark.parametrize("text, message", [("fuse_threads=2", "fuse_threads must be auto, 0 or at least 3"),
                                           ("fuse_threads=many", "bad value for mount option fuse_threads")])
def test_bad_fuse_threads_are_refused_with_a_clear_message(text, message):
    from vfsnap.errors import InvalidName
    from vfsnap.options import parse_options

    with pytest.raises(InvalidName, match=message):
        parse_options(text)


@requires_fuse
@pytest.mark.parametrize("options", RELAYED)
def test_reads_racing_writes_snapshots_and_merges_never_go_back(share, vfsnap_mount, options):
    """Writers count each 4 KiB block up (every byte of the block is its count); readers check
    that a block reads no lower than the count finished before the read began and no higher than
    the count begun by its end, while snapshots are taken and deleted (merges) all along."""
    size = 4 * MiB
    make_chain(share, "vol", size=size, depth=0)
    mnt = vfsnap_mount(options)
    path = mnt.volume("vol")
    blocks = size // BLOCK
    begun = [0] * blocks  # count written into the block, or being written
    done = [0] * blocks  # count the block holds for sure
    locks = [threading.Lock() for _ in range(blocks)]
    stop = threading.Event()
    failures: list[str] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        try:
            while not stop.is_set():
                block = rng.randrange(HOT)
                with locks[block]:  # one writer per block at a time: its count only goes up
                    if begun[block] == 255:
                        continue
                    begun[block] += 1
                    buf[:] = bytes([begun[block]]) * BLOCK
                    assert os.pwrite(fd, buf, block * BLOCK) == BLOCK
                    done[block] = begun[block]
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(f"writer: {exc!r}")
        finally:
            os.close(fd)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BLOCK)
        try:
            while not stop.is_set() and not failures:
                block = rng.randrange(HOT) if rng.random() < 0.75 else rng.randrange(blocks)
                low = done[block]
                assert os.preadv(fd, [buf], block * BLOCK) == BLOCK
                high = begun[block]
                data = buf[:]
                if not low <= min(data) <= max(data) <= high:
                    failures.append(f"block {block}: read {min(data)}..{max(data)}, expected {low}..{high}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(f"reader: {exc!r}")
        finally:
            os.close(fd)

    def snapshotter() -> None:
        taken: list[str] = []
        n = 0
        try:
            while not stop.is_set() and not failures:
                n += 1
                name = f"s{n}"
                os.mkdir(mnt.snapshot_dir("vol", name))
                taken.append(name)
                if len(taken) > 2:
                    os.rmdir(mnt.snapshot_dir("vol", taken.pop(0)))  # a merge, in the background
                if n % 3 == 0:
                    # The newest: the live image merges down while written (the merge watches
                    # the writes: View.observers).
                    os.rmdir(mnt.snapshot_dir("vol", taken.pop()))
                time.sleep(0.1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(f"snapshots: {exc!r}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=reader, args=(100 + i,)) for i in range(4)]
    threads.append(threading.Thread(target=snapshotter))
    for t in threads:
        t.start()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join(60)
    assert not failures, failures[:10]
    # After the race, every block holds its last count, through the mount and on the share.
    expected = b"".join(bytes([count]) * BLOCK for count in done)
    assert _read_all(path, size) == expected
    mnt.stop()
    assert _answered_on_threads(mnt) > 0
    if "share_io=threads" in options:  # writes too, on a network share's volume
        assert _answered_on_threads(mnt, "writes") > 0


# -- the view's side: what a reader thread may touch ------------------------------------------


def _qcow2_view(tmp_path):
    from vfsnap.chain.view import View
    from vfsnap.format.cache import TableCache
    from vfsnap.format.qcow2 import Qcow2Image

    path = tmp_path / "vol.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), str(4 * MiB))
    image = Qcow2Image(os.open(path, os.O_RDWR), path.name, writable=True, table_cache=TableCache())
    return View([image], name=path.name), image


def test_read_now_answers_only_from_resolved_chunks_and_changes_nothing(tmp_path):
    view, image = _qcow2_view(tmp_path)
    try:
        assert view.read_now(0, BLOCK) is None  # not resolved yet: the loop's job
        assert not view._chunks
        assert view.read(0, BLOCK) == bytes(BLOCK)  # the loop resolves the chunk
        assert view.read_now(0, BLOCK) == bytes(BLOCK)
        view.write(64 * KiB, b"\x5a" * (2 * BLOCK))
        assert bytes(view.read_now(64 * KiB - BLOCK, 3 * BLOCK)) == bytes(BLOCK) + b"\x5a" * (2 * BLOCK)
    finally:
        os.close(image.fd)


def test_a_write_replaces_the_chunk_a_reader_thread_may_hold(tmp_path):
    view, image = _qcow2_view(tmp_path)
    try:
        view.write(0, b"\x11" * (64 * KiB))
        view.read(0, BLOCK)
        held = view._chunks[0]
        before = (list(held.starts), list(held.ends), list(held.fds), list(held.hosts))
        view.write(128 * KiB, b"\x22" * (64 * KiB))  # a new cluster: the map of chunk 0 changes
        assert view._chunks[0] is not held
        assert (held.starts, held.ends, held.fds, held.hosts) == before  # seen whole, as it was
        assert view.read_now(128 * KiB, BLOCK) == b"\x22" * BLOCK
    finally:
        os.close(image.fd)


def test_a_chunk_resolved_across_a_write_on_a_reader_thread_is_resolved_again(tmp_path):
    """The loop resolves a chunk from the top's tables while a reader thread's write changes
    them and patches the view (where the chunk is not yet): the chunk it resolved is stale and
    must not be kept (View._chunk)."""
    view, image = _qcow2_view(tmp_path)
    resolve = view._resolve
    writes = []

    def resolve_while_a_thread_writes(index):
        chunk = resolve(index)  # from the tables as they are before the write
        if not writes:
            writer = threading.Thread(target=lambda: writes.append(view.write_now(0, b"\x33" * BLOCK, None)))
            writer.start()
            writer.join()
        return chunk

    view._resolve = resolve_while_a_thread_writes
    try:
        assert view.read(0, BLOCK) == b"\x33" * BLOCK
        assert writes == [BLOCK]
        assert view.read_now(0, BLOCK) == b"\x33" * BLOCK
    finally:
        os.close(image.fd)


def test_a_write_elsewhere_does_not_make_the_loop_resolve_a_chunk_again(tmp_path):
    """Only a patch of the range being resolved counts: under a stream of writes elsewhere, a
    resolution must still finish in one pass."""
    view, image = _qcow2_view(tmp_path)
    view._chunk_bits = 20  # 1 MiB chunks: chunk 0 is resolved while chunk 2 is written
    resolve = view._resolve
    calls = []

    def resolve_while_a_thread_writes_elsewhere(index):
        calls.append(index)
        chunk = resolve(index)
        if len(calls) <= 3:  # bounded: a check that counted every patch would retry forever
            writer = threading.Thread(target=view.write_now, args=(2 * MiB, b"\x44" * BLOCK, None))
            writer.start()
            writer.join()
        return chunk

    view._resolve = resolve_while_a_thread_writes_elsewhere
    try:
        assert view.read(0, BLOCK) == bytes(BLOCK)
        assert calls == [0]
    finally:
        os.close(image.fd)


async def test_the_write_lock_passes_between_reader_threads_and_the_loop():
    import trio

    from vfsnap.share.io import WriteLock

    lock = WriteLock()
    token = trio.lowlevel.current_trio_token()
    assert await trio.to_thread.run_sync(lock.acquire_now)  # a write on a reader thread
    got = trio.Event()
    done = trio.Event()

    async def flush() -> None:
        async with lock:
            got.set()
            await done.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush)
        await trio.sleep(0.2)
        assert not got.is_set()  # the flush waits, without blocking the loop
        # New writes on threads stand back while it waits (they go the loop's way): a stream of
        # them cannot starve it.
        assert not await trio.to_thread.run_sync(lock.acquire_now)
        await trio.to_thread.run_sync(lock.release, token)  # the thread's write ends
        with trio.fail_after(5):
            await got.wait()
        assert lock.locked()
        done.set()
    assert not lock.locked()
    assert await trio.to_thread.run_sync(lock.acquire_now)
    lock.release()


@requires_fuse
def test_writes_on_reader_threads_equal_qemu(share, tmp_path, vfsnap_mount):
    """Writes of every shape (inside a cluster, across clusters, whole clusters, past the end)
    answered on the reader threads, four writers at once: the chain as QEMU reads it equals
    what was written."""
    size = 8 * MiB
    names = make_chain(share, "vol", size=size, depth=2, base_fmt="raw", cluster_size=64 * KiB,
                       writes=_scattered)
    expected = bytearray(flat_bytes(share / names[-1], tmp_path))
    mnt = vfsnap_mount("share_io=threads")
    path = mnt.volume("vol")
    rng = random.Random(7)
    plan = []  # (offset, length, byte): each writer its own quarter of the disk, so the order within it holds
    for writer in range(4):
        for n in range(60):
            length = rng.choice([512, BLOCK, 60 * KiB, 64 * KiB, 200 * KiB])
            offset = writer * size // 4 + rng.randrange(0, size // 4 - length, 512)
            plan.append((writer, offset, length, 1 + (writer * 60 + n) % 250))
    failures = []

    def write(writer: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            for who, offset, length, byte in plan:
                if who == writer:
                    buf = mmap.mmap(-1, length)
                    buf[:] = bytes([byte]) * length
                    assert os.pwrite(fd, buf, offset) == length
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    for _, offset, length, byte in plan:
        expected[offset : offset + length] = bytes([byte]) * length
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 2 * BLOCK)
        buf[:] = b"\x77" * (2 * BLOCK)
        assert os.pwrite(fd, buf, size - BLOCK) == BLOCK  # short at the end of the disk
        expected[size - BLOCK :] = b"\x77" * BLOCK
        with pytest.raises(OSError) as error:
            os.pwrite(fd, buf, size)  # past it
        assert error.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert _read_all(path, size) == bytes(expected)
    mnt.stop()
    assert _answered_on_threads(mnt, "writes") >= len(plan)
    assert qemu_img("check", str(share / names[-1])).returncode == 0
    assert flat_bytes(share / names[-1], tmp_path) == bytes(expected)


@pytest.mark.parametrize("err", list(ERRNOS))
def test_a_write_failing_on_a_reader_thread_reports_the_error_and_can_be_retried(mounts, template, tmp_path, err):  # noqa: F811
    """tests/test_faults.py's write case, with the writes answered on the reader threads: the
    share fails in the middle of a write; the error reaches the program, the views are as
    before, the retried write works, and the share is left clean."""
    options = f"{FAULT_OPTIONS},share_io=threads"
    total = count_write(mounts, template, tmp_path, options=options)
    failed = write_case(mounts, template, tmp_path, middle(total), err, options=options)
    assert _answered_on_threads(failed, "writes") > 0


@pytest.mark.slow
@pytest.mark.parametrize("err", list(ERRNOS))
def test_a_write_failing_on_a_reader_thread_at_every_operation(mounts, template, tmp_path, err):  # noqa: F811
    options = f"{FAULT_OPTIONS},share_io=threads"
    total = count_write(mounts, template, tmp_path, options=options)
    sweep(lambda n: write_case(mounts, template, tmp_path, n, err, options=options), total)


async def test_a_chain_change_waits_for_reads_on_reader_threads_and_holds_new_ones_back():
    import trio

    from vfsnap.share.io import RequestGate

    gate = RequestGate()
    token = trio.lowlevel.current_trio_token()
    seq = await trio.to_thread.run_sync(gate.enter_now)  # a read begins on a reader thread
    assert seq is not None and gate.reads_in_flight
    drained = trio.Event()

    async def change() -> None:
        async with gate.quiesced():
            drained.set()
            assert gate.enter_now() is None  # while it runs, reads go the loop's way

    async with trio.open_nursery() as nursery:
        nursery.start_soon(change)
        await trio.sleep(0.2)
        assert not drained.is_set()  # the change waits for the read in flight
        await trio.to_thread.run_sync(gate.leave, seq, token)  # which ends on its thread
        with trio.fail_after(5):
            await drained.wait()
    assert gate.enter_now() is not None  # and after it, reader threads answer again


def test_direct_io_opens_are_answered_with_parallel_direct_writes():
    from vfsnap.fs.relay import (FOPEN_DIRECT_IO, FOPEN_PARALLEL_DIRECT_WRITES, OPEN_OUT, OUT_HEADER,
                                 KernelRelay)

    relay = KernelRelay(lambda *args: None)

    def answered(unique: int, flags: int, *, error: int = 0, asked: bool = True) -> int:
        reply = bytearray(OUT_HEADER.size + OPEN_OUT.size + 4)
        OUT_HEADER.pack_into(reply, 0, len(reply), error, unique)
        OPEN_OUT.pack_into(reply, OUT_HEADER.size, 7, flags)
        if asked:
            relay._opens.add(unique)
        relay._allow_parallel_writes(reply, len(reply) if not error else OUT_HEADER.size)
        fh, got = OPEN_OUT.unpack_from(reply, OUT_HEADER.size)
        assert fh == 7
        return got

    assert answered(1, FOPEN_DIRECT_IO) == FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES
    assert answered(2, 0) == 0  # page cache opens: the kernel's own locking stays
    assert answered(3, FOPEN_DIRECT_IO, asked=False) == FOPEN_DIRECT_IO  # not an OPEN's reply
    assert answered(4, FOPEN_DIRECT_IO, error=-2) == FOPEN_DIRECT_IO  # a failed open
    assert not relay._opens


FUSECTL = "/sys/fs/fuse/connections"


def _mount_fusectl() -> None:
    """Before the mount: fusectl mounted after it showed its connection's `waiting` as 0 here."""
    if not os.path.ismount(FUSECTL):
        subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], check=True)


def _fuse_requests_waiting(mountpoint) -> int:
    """Requests of the mount's FUSE connection sent to vfsnap and not answered yet (fusectl)."""
    with open(f"{FUSECTL}/{os.minor(os.stat(mountpoint).st_dev)}/waiting") as f:
        return int(f.read())


@requires_fuse
@pytest.mark.parametrize("fuse_threads, together", [(24, 4), (0, 1)])
def test_direct_writes_of_one_volume_reach_vfsnap_together(mounts, tmp_path, fuse_threads, together):  # noqa: F811
    """With reader threads, an O_DIRECT open is answered with FOPEN_PARALLEL_DIRECT_WRITES: four
    writers of one volume have their writes in vfsnap at once (which orders them itself), where
    the kernel would otherwise send them one at a time. A slow share (each pwrite 0.5 s) keeps
    them there long enough to count them."""
    share = tmp_path / "share"
    share.mkdir()
    make_chain(share, "a", size=8 * MiB, depth=1)
    _mount_fusectl()
    mnt = mounts.start(share, faults="slow:0.5", ops="pwrite",
                       options=f"{FAULT_OPTIONS},share_io=threads,fuse_threads={fuse_threads}")

    fds = [os.open(mnt.volume("a"), os.O_WRONLY | os.O_DIRECT) for _ in range(4)]  # no open in flight

    def write(cluster: int) -> None:
        buf = mmap.mmap(-1, BLOCK)
        buf[:] = bytes([0x40 + cluster]) * BLOCK
        assert os.pwrite(fds[cluster], buf, cluster * 64 * KiB) == BLOCK

    try:
        writers = [threading.Thread(target=write, args=(c,)) for c in range(4)]
        for t in writers:
            t.start()
        most = 0
        while any(t.is_alive() for t in writers):
            most = max(most, _fuse_requests_waiting(mnt.path))
            time.sleep(0.02)
        for t in writers:
            t.join()
    finally:
        for fd in fds:
            os.close(fd)
    assert most == together
    fd = os.open(mnt.volume("a"), os.O_RDONLY)
    try:
        for c in range(4):
            assert os.pread(fd, BLOCK, c * 64 * KiB) == bytes([0x40 + c]) * BLOCK
    finally:
        os.close(fd)
