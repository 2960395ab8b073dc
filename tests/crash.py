"""Crash harness: run a chain operation in a child process that is SIGKILLed right after its N-th
write/fsync/rename/unlink to the share (`tests/faults.py`), for every N, then recover the way a mount
does and check DESIGN.md invariant 3 against a model:

- every write acknowledged by a flush (fsync) before the crash is there;
- every view that existed before is intact; the interrupted operation's outcome is all or
  nothing (the snapshot exists with the right data, or does not exist);
- `vfsnap check` finds nothing and `qemu-img check` is clean (exit 0) on every image.

The child is the daemon's own code path (share, chain and format layers) without FUSE, forked
from the test process so that a crash point costs milliseconds; `tests/test_crash.py` also
kills real mounts.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import signal
import sys
import traceback
from pathlib import Path

import attrs
import trio

from tests.qemu import check as qemu_check
from tests.qemu import create as qemu_create
from tests.qemu import write_info
from vfsnap.cli.check import check_share
from tests.faults import FaultPlan
from vfsnap.options import MountOptions
from vfsnap.share import clone, snapshots
from vfsnap.share.pool import Pool
from vfsnap.share.share import Share

OPTIONS = MountOptions(metadata_flush_interval=0)
VOLUME = "vol"
SIZE = 1 << 20
# Shared memory between the parent and the crashing child: [0:8] fault counter,
# [8:16] writes acknowledged, [16:24] 1 when the operation itself returned.
ACKED, DONE = slice(8, 16), slice(16, 24)


def _get(shared, field: slice) -> int:
    return int.from_bytes(shared[field], "little")


def _set(shared, field: slice, value: int) -> None:
    shared[field] = value.to_bytes(8, "little")


@attrs.define
class Write:
    offset: int
    data: bytes


def make_writes(seed: int, count: int, size: int = SIZE, *, region: tuple[int, int] | None = None) -> list[Write]:
    """Writes to disjoint places (so each one's bytes can be checked alone), of varied sizes."""
    rng = random.Random(seed)
    lo, hi = region or (0, size)
    slots = list(range(lo, hi, 36864))
    rng.shuffle(slots)
    writes = []
    for i, start in enumerate(slots[:count]):
        offset = start + rng.randrange(0, 4096)
        length = min(rng.choice([512, 4096, 5000, 9000, 30000]), hi - offset)
        writes.append(Write(offset, bytes([(seed * 7 + i) % 250 + 3]) * length))
    return writes


@attrs.define
class Outcome:
    """What a crash point left, after recovery."""

    crashed: bool
    acked: int
    done: bool


class Scenario:
    """A share prepared in the parent, an operation run in the child, a check afterwards."""

    name = "scenario"

    def prepare(self, share: Path) -> None:
        raise NotImplementedError

    def operate(self, pool: Pool, shared) -> None:
        raise NotImplementedError

    def verify(self, share: Path, pool: Pool, outcome: Outcome) -> None:
        raise NotImplementedError


# -- helpers used by scenarios ----------------------------------------------------------------------


def apply_acked(pool: Pool, writes: list[Write], shared, *, volume: str = VOLUME, start: int = 0) -> None:
    """Write, flush (the fsync a guest would do), and record the acknowledgement."""
    vol = pool.volume(volume)
    for i, write in enumerate(writes):
        vol.live_view().write(write.offset, write.data)
        vol.flush()
        _set(shared, ACKED, start + i + 1)


async def apply_acked_async(pool: Pool, writes: list[Write], shared, *, start: int = 0) -> None:
    """The same, yielding between writes: a guest writing while a merge runs."""
    vol = pool.volume(VOLUME)
    for i, write in enumerate(writes):
        await trio.sleep(0)
        vol.live_view().write(write.offset, write.data)
        vol.flush()
        _set(shared, ACKED, start + i + 1)


async def apply_acked_threaded(pool: Pool, writes: list[Write], shared) -> None:
    """The same the way a network share is written (vfsnap/share/io.py): each write on one of
    the share's worker threads under the volume's write lock, each fsync's data sync and ordered
    write-back on them too, freed clusters given back after the reads in flight."""
    vol = pool.volume(VOLUME)
    vol.share.io.threaded = True
    view = vol.live_view()
    for i, write in enumerate(writes):
        async with vol.gate.write_lock:
            await view.write_async(write.offset, write.data)
        await vol.flush_async()
        _set(shared, ACKED, i + 1)


async def apply_acked_on_reader_threads(pool: Pool, writes: list[Write], shared) -> None:
    """The same the way the FUSE reader threads write a network share's volume
    (vfsnap/fs/relay.py): each write on a thread of its own (`Volume.write_now`: the request
    gate, the write lock taken from the thread, the view patched there), each fsync as above."""
    vol = pool.volume(VOLUME)
    vol.share.io.threaded = True
    view = vol.live_view()
    token = trio.lowlevel.current_trio_token()
    for i, write in enumerate(writes):
        written = await trio.to_thread.run_sync(vol.write_now, view, write.offset, write.data, token)
        assert written == len(write.data)
        await vol.flush_async()
        _set(shared, ACKED, i + 1)


def assert_writes(data: bytes, writes: list[Write], acked: int, before: bytes) -> None:
    """Acked writes are there; nothing else changed except where later writes landed."""
    touched = bytearray(len(data))
    for i, write in enumerate(writes):
        end = write.offset + len(write.data)
        got = data[write.offset : end]
        if i < acked:
            assert got == write.data, f"acknowledged write {i} at {write.offset} lost"
        touched[write.offset : end] = b"\1" * len(write.data)
    for offset in range(0, len(data), 4096):
        if touched[offset : offset + 4096].count(0) == len(touched[offset : offset + 4096]):
            assert data[offset : offset + 4096] == before[offset : offset + 4096], f"untouched block {offset} changed"


def build_chain(share: Path, layers: int, *, cluster_size: int = 4096) -> tuple[list[bytes], bytes]:
    """vol (raw) <- vol.s1 <- ... <- vol.s<layers>, each overlay with its own writes.

    Returns the content of each snapshot s1..sN (the chain below its overlay) and the live one.
    """
    rng = random.Random(layers)
    content = bytearray(bytes(rng.randrange(256) for _ in range(256)) * (SIZE // 256))
    (share / VOLUME).write_bytes(bytes(content))
    snapshots_content = []
    names = [VOLUME]
    for level in range(1, layers + 1):
        snapshots_content.append(bytes(content))
        name = f"{VOLUME}.s{level}"
        qemu_create(share / name, SIZE, fmt="qcow2", backing=names[-1],
                    backing_fmt="raw" if level == 1 else "qcow2", options=f"cluster_size={cluster_size}")
        names.append(name)
        write_info(share, VOLUME, name, {f"s{i}": names[i] for i in range(1, level + 1)})
        pool = Pool.open([str(share)], MountOptions(metadata_flush_interval=0))
        try:
            view = pool.volume(VOLUME).live_view()
            for write in make_writes(100 + level, 6):
                view.write(write.offset, write.data)
                content[write.offset : write.offset + len(write.data)] = write.data
            pool.volume(VOLUME).close_writes()
        finally:
            pool.close()
    return snapshots_content, bytes(content)


def recover(share: Path) -> Pool:
    """What the next mount does: open the shares (journal replay, dirty images) and run merges."""
    pool = Pool.open([str(share)], OPTIONS)

    async def merges():
        # Clones' copies first: a finished copy releases its source's point in time.
        for volume in pool.volumes_with_pending_work():
            await clone.run_copy(volume)
        for volume in pool.volumes_with_pending_work():
            await snapshots.run_pending(volume)

    trio.run(merges)
    return pool


def assert_share_clean(share: Path) -> None:
    checked = Share(str(share), MountOptions(read_only=True))
    try:
        report = check_share(checked, repair=False)
    finally:
        checked.close()
    assert not report.problems, report.problems
    for name in os.listdir(share):
        path = share / name
        if name.startswith(".") or name.endswith((".info", ".json")):
            continue
        with open(path, "rb") as f:
            if f.read(4) != b"QFI\xfb":
                continue
        result = qemu_check(path)
        assert result["exit"] == 0, (name, result)
    info_path = share / f"{VOLUME}.info"
    if info_path.exists():
        document = json.loads(info_path.read_text())
        assert info_path.read_text() == json.dumps(document, indent=1, sort_keys=True)


# -- running crash points ---------------------------------------------------------------------------


def run_child(scenario: Scenario, share: Path, plan: FaultPlan, shared) -> int:
    """Fork; the child runs the operation under `plan`. Returns the child's wait status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: the daemon's code, then exit without cleanup
        code = 0
        try:
            plan.install()
            pool = Pool.open([str(share)], OPTIONS)
            scenario.operate(pool, shared)
            _set(shared, DONE, 1)
            pool.close()
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def count_operations(scenario: Scenario, template: Path, work: Path) -> int:
    shared = mmap.mmap(-1, 64)
    share = fresh_copy(template, work / "count")
    status = run_child(scenario, share, FaultPlan("count", counter=shared), shared)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"{scenario.name}: dry run failed ({status})"
    return int.from_bytes(shared[:8], "little")


def fresh_copy(template: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(template, target)
    return target


def crash_point(scenario: Scenario, template: Path, work: Path, at: int) -> Outcome:
    shared = mmap.mmap(-1, 64)
    share = fresh_copy(template, work / "point")
    status = run_child(scenario, share, FaultPlan("crash", at, counter=shared), shared)
    crashed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert crashed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), \
        f"{scenario.name} @ {at}: child failed (status {status})"
    outcome = Outcome(crashed=crashed, acked=_get(shared, ACKED), done=bool(_get(shared, DONE)))
    pool = recover(share)
    try:
        scenario.verify(share, pool, outcome)
    finally:
        pool.close()
    assert_share_clean(share)
    return outcome


def sweep(scenario: Scenario, work: Path, *, every: int = 1) -> int:
    """Crash `scenario` after each of its operations in turn; returns the number of points."""
    template = work / "template"
    if template.exists():
        shutil.rmtree(template)
    template.mkdir(parents=True)
    scenario.prepare(template)
    total = count_operations(scenario, template, work)
    points = 0
    for at in range(1, total + 1, every):
        try:
            crash_point(scenario, template, work, at)
        except AssertionError as exc:
            raise AssertionError(f"{scenario.name}: crash after operation {at} of {total}: {exc}") from exc
        points += 1
    return points
