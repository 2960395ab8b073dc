"""Crash safety (DESIGN.md invariant 3): a crash after any single write, fsync, rename or unlink
of an operation loses no acknowledged write and leaves every view before or after it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from tests.crash import (
    SIZE,
    VOLUME,
    Scenario,
    apply_acked,
    apply_acked_async,
    apply_acked_on_reader_threads,
    apply_acked_threaded,
    assert_writes,
    build_chain,
    make_writes,
    sweep,
)
from vfsnap.share import snapshots
from vfsnap.share.rename import rename_volume

CRASH_POINTS: dict[str, int] = {}


def read_view(view) -> bytes:
    return view.read(0, view.size)


class Writes(Scenario):
    """Guest writes into the active qcow2 overlay: allocation, L2 tables, refcount blocks (with
    512-byte clusters a refcount block covers 128 KiB, so new blocks and a growing refcount
    table are part of the sweep), and an extension of the disk (a larger L1 table)."""

    def __init__(self, cluster_size: int, extend: bool = False):
        self.cluster_size = cluster_size
        self.extend = extend
        self.name = f"writes-{cluster_size}" + ("-extend" if extend else "")

    def prepare(self, share):
        self.snapshot_contents, self.live = build_chain(share, 1, cluster_size=self.cluster_size)
        self.writes = make_writes(7, 28)
        if self.extend:
            self.live += bytes(SIZE)

    def operate(self, pool, shared):
        if self.extend:
            pool.volume(VOLUME).resize(2 * SIZE)
        apply_acked(pool, self.writes, shared)

    def verify(self, share, pool, outcome):
        volume = pool.volume(VOLUME)
        data = read_view(volume.live_view())
        if self.extend:
            assert len(data) in (SIZE, 2 * SIZE)
            if outcome.acked:
                assert len(data) == 2 * SIZE  # resized before the first acknowledged write
        assert_writes(data, self.writes, outcome.acked, self.live[: len(data)])
        assert read_view(volume.snapshot_view("s1")) == self.snapshot_contents[0]


class ThreadedWrites(Writes):
    """Guest writes as on a network share (issue 12): on the share's worker threads, the write-back
    under the volume's write lock, freed clusters returned only after the reads in flight."""

    def __init__(self, cluster_size: int):
        super().__init__(cluster_size)
        self.name = f"threaded-writes-{cluster_size}"

    def operate(self, pool, shared):
        trio.run(apply_acked_threaded, pool, self.writes, shared)


class ReaderThreadWrites(Writes):
    """Guest writes as the FUSE reader threads make them on a network share (issue 12): the
    write lock taken from the thread, the writer and the view's patch there."""

    def __init__(self, cluster_size: int):
        super().__init__(cluster_size)
        self.name = f"reader-thread-writes-{cluster_size}"

    def operate(self, pool, shared):
        trio.run(apply_acked_on_reader_threads, pool, self.writes, shared)


class TakeSnapshot(Scenario):
    """mkdir between acknowledged writes: all or nothing, and it holds the data of its instant."""

    name = "snapshot"

    def prepare(self, share):
        self.snapshot_contents, self.live = build_chain(share, 2)
        self.before = make_writes(11, 4)
        self.after = make_writes(12, 4, region=(SIZE // 2, SIZE))
        at_snapshot = bytearray(self.live)
        for w in self.before:
            at_snapshot[w.offset : w.offset + len(w.data)] = w.data
        self.at_snapshot = bytes(at_snapshot)

    def operate(self, pool, shared):
        apply_acked(pool, self.before, shared)
        trio.run(snapshots.take_snapshot, pool.volume(VOLUME), "new")
        apply_acked(pool, self.after, shared, start=len(self.before))

    def verify(self, share, pool, outcome):
        volume = pool.volume(VOLUME)
        names = volume.snapshots()
        assert names[:2] == ["s1", "s2"]
        if outcome.acked > len(self.before):
            assert "new" in names  # writes after mkdir returned: the snapshot was committed
        if "new" in names:
            assert names == ["s1", "s2", "new"]
            assert read_view(volume.snapshot_view("new")) == self.at_snapshot
        else:
            assert not (share / f"{VOLUME}.new").exists()
        for i, content in enumerate(self.snapshot_contents):
            assert read_view(volume.snapshot_view(f"s{i + 1}")) == content
        assert_writes(read_view(volume.live_view()), self.before + self.after, outcome.acked, self.live)


class DeleteSnapshot(Scenario):
    """rmdir of a snapshot and its merge, with a guest writing meanwhile."""

    def __init__(self, position: str, cluster_size: int = 4096):
        self.position = position
        self.cluster_size = cluster_size
        self.name = f"delete-{position}-{cluster_size}"
        self.victim = {"oldest": "s1", "middle": "s2", "newest": "s3"}[position]

    def prepare(self, share):
        self.snapshot_contents, self.live = build_chain(share, 3, cluster_size=self.cluster_size)
        self.writes = make_writes(21, 10)

    def operate(self, pool, shared):
        volume = pool.volume(VOLUME)
        trio.run(snapshots.request_delete, volume, self.victim)

        async def run():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(snapshots.run_pending, volume)
                nursery.start_soon(apply_acked_async, pool, self.writes, shared)

        trio.run(run)

    def verify(self, share, pool, outcome):
        volume = pool.volume(VOLUME)
        assert not volume.sidecar().journal, "the merge was not finished on recovery"
        names = volume.snapshots()
        expected = [s for s in ("s1", "s2", "s3") if s != self.victim]
        assert names in (expected, ["s1", "s2", "s3"])
        for i, content in enumerate(self.snapshot_contents):
            name = f"s{i + 1}"
            if name in names:
                assert read_view(volume.snapshot_view(name)) == content, name
        if self.victim not in names:
            assert not (share / f"{VOLUME}.{self.victim}").exists()
        assert_writes(read_view(volume.live_view()), self.writes, outcome.acked, self.live)


class Rename(Scenario):
    def __init__(self, layers: int):
        self.layers = layers
        self.name = f"rename-{layers}"

    def prepare(self, share):
        self.snapshot_contents, self.live = build_chain(share, self.layers)

    def operate(self, pool, shared):
        trio.run(rename_volume, pool.shares[0], VOLUME, "renamed")

    def verify(self, share, pool, outcome):
        names = pool.volume_names()
        assert names in (["vol"], ["renamed"]), names
        if outcome.done:
            assert names == ["renamed"]
        volume = pool.volume(names[0])
        assert read_view(volume.live_view()) == self.live
        assert volume.snapshots() == [f"s{i}" for i in range(1, self.layers + 1)]
        for i, content in enumerate(self.snapshot_contents):
            assert read_view(volume.snapshot_view(f"s{i + 1}")) == content
        leftovers = [n for n in os.listdir(share) if not n.startswith(names[0])]
        assert not leftovers, leftovers


class Clone(Scenario):
    """vfsnap clone of a snapshot or of the live volume (a hidden point in time), and its
    background copy with writes landing in the clone meanwhile; then the point in time's merge."""

    def __init__(self, source: str):
        self.source = source
        self.name = f"clone-{source}"

    def prepare(self, share):
        self.snapshot_contents, self.live = build_chain(share, 2)
        self.before = make_writes(61, 3)
        self.after = make_writes(62, 4, region=(SIZE // 4, SIZE))
        point = bytearray(self.live)
        if self.source == "live":
            for w in self.before:
                point[w.offset : w.offset + len(w.data)] = w.data
        self.point = bytes(point) if self.source == "live" else self.snapshot_contents[0]

    def operate(self, pool, shared):
        from vfsnap.share.clone import create_clone, run_copy

        volume = pool.volume(VOLUME)
        if self.source == "live":
            apply_acked(pool, self.before, shared)
        start = len(self.before) if self.source == "live" else 0
        new = trio.run(create_clone, pool, volume, None if self.source == "live" else "s1", "c")

        async def run():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_copy, new)
                nursery.start_soon(_apply_acked_to, new, self.after, shared, start)
            await snapshots.run_pending(volume)

        trio.run(run)

    def verify(self, share, pool, outcome):
        volume = pool.volume(VOLUME)
        assert volume.snapshots() == ["s1", "s2"]
        for i, content in enumerate(self.snapshot_contents):
            assert read_view(volume.snapshot_view(f"s{i + 1}")) == content
        before = self.before if self.source == "live" else []
        assert_writes(read_view(volume.live_view()), before, min(outcome.acked, len(before)), self.live)
        names = pool.volume_names()
        assert names in (["vol"], ["c", "vol"]), names
        if outcome.acked > len(before) or outcome.done:
            assert "c" in names  # writes into the clone were acknowledged: it was committed
        for v in names:
            assert not pool.volume(v).sidecar().journal, f"{v}: unfinished after recovery"
        if "c" in names:
            clone = pool.volume("c")
            assert [image.name for image in clone.live_chain()] == ["c"]  # independent now
            assert_writes(read_view(clone.live_view()), self.after, max(0, outcome.acked - len(before)), self.point)
        else:
            assert not [n for n in os.listdir(share) if n.startswith("c")]
        assert not (share / f"{VOLUME}.info").exists() or len(volume.info().snapshots) == 2


async def _apply_acked_to(volume, writes, shared, start: int) -> None:
    from tests.crash import _set, ACKED

    for i, write in enumerate(writes):
        await trio.sleep(0)
        volume.live_view().write(write.offset, write.data)
        volume.flush()
        _set(shared, ACKED, start + i + 1)


class Revert(Scenario):
    """vfsnap revert to the newest snapshot, or past two newer ones (--destroy-newer), then
    writes into the reverted volume."""

    def __init__(self, target: str):
        self.target = target
        self.name = f"revert-{target}"

    def prepare(self, share):
        self.snapshot_contents, self.live = build_chain(share, 3)
        self.writes = make_writes(71, 4)

    def operate(self, pool, shared):
        from vfsnap.share.revert import revert

        revert(pool.volume(VOLUME), self.target, destroy_newer=True)
        apply_acked(pool, self.writes, shared)

    def verify(self, share, pool, outcome):
        volume = pool.volume(VOLUME)
        assert not volume.sidecar().journal
        index = int(self.target[1:]) - 1
        kept = [f"s{i + 1}" for i in range(index + 1)]
        names = volume.snapshots()
        assert names in (kept, ["s1", "s2", "s3"]), names
        data = read_view(volume.live_view())
        reverted = outcome.acked > 0 or outcome.done or data != self.live
        if reverted:
            assert names == kept
            assert_writes(data, self.writes, outcome.acked, self.snapshot_contents[index])
            assert volume.info().active == f"{VOLUME}.{self.target}"
        for name in names:
            assert read_view(volume.snapshot_view(name)) == self.snapshot_contents[int(name[1:]) - 1], name
        expected = {VOLUME, f"{VOLUME}.info", f"{VOLUME}.vfsnap.json", *(f"{VOLUME}.{n}" for n in names)}
        listed = set(os.listdir(share))
        if not reverted:
            # Rolled back before anything was kept: the volume's record (sidecar) is written at
            # its first change (issue 13), and a crash before that leaves none, rightly.
            if f"{VOLUME}.vfsnap.json" not in listed:
                expected.discard(f"{VOLUME}.vfsnap.json")
        assert listed == expected


SCENARIOS = [
    Writes(4096),
    Writes(512),
    Writes(65536, extend=True),
    Writes(512, extend=True),
    ThreadedWrites(512),
    ReaderThreadWrites(512),
    TakeSnapshot(),
    *(DeleteSnapshot(position, size) for position in ("oldest", "middle", "newest") for size in (4096, 512)),
    Rename(2),
    Rename(6),
    Clone("snapshot"),
    Clone("live"),
    Revert("s3"),
    Revert("s1"),
]


# The fewest crash points each scenario's sweep must cover (about 85% of what it covered when
# this was written: 1223 in all), so that the total of 1000 (issue 5) is checked scenario by
# scenario, also when only some of them run (`-k`), and a sweep that silently shrinks fails.
# (When an overwrite of several clusters became one write instead of one per cluster, the writes
# and deletes swept fewer points, delete-middle-512 fewer than its minimum: their guests now make
# more writes, 28 and 10 instead of 24 and 6, and sweep as many points as before or more.)
MIN_CRASH_POINTS = {
    "writes-4096": 105, "writes-512": 175, "writes-65536-extend": 70, "writes-512-extend": 180,
    "snapshot": 52, "delete-oldest-4096": 50, "delete-oldest-512": 62, "delete-middle-4096": 63,
    "delete-middle-512": 95, "delete-newest-4096": 50, "delete-newest-512": 78, "rename-2": 19, "rename-6": 29,
    # clone and revert (issue 15): swept 32, 88, 45 and 51 points when written
    "clone-snapshot": 27, "clone-live": 75, "revert-s3": 38, "revert-s1": 43,
    # writes on the share's worker threads (issue 12): swept 207 points when written
    "threaded-writes-512": 175,
    # writes on the FUSE reader threads (issue 12)
    "reader-thread-writes-512": 175,
}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_crash_after_every_operation(scenario, tmp_path: Path):
    every = int(os.environ.get("VFSNAP_CRASH_EVERY", "1"))
    points = sweep(scenario, tmp_path, every=every)
    CRASH_POINTS[scenario.name] = points
    expected = -(-MIN_CRASH_POINTS[scenario.name] // every)  # the sweep crashes at every `every`-th point
    assert points >= expected, f"{scenario.name}: {points} crash points swept, expected at least {expected}"


def test_crash_point_count_reported():
    """The sweep covers at least 1000 distinct crash points (issue 5): each scenario checks its
    own share of them above, whichever subset runs."""
    assert sorted(MIN_CRASH_POINTS) == sorted(s.name for s in SCENARIOS)
    assert sum(MIN_CRASH_POINTS.values()) >= 1000
    total = sum(CRASH_POINTS.values())
    print(f"\ncrash points swept: {total} ({CRASH_POINTS})")


# -- real mounts: kill -9 at random moments -----------------------------------------------------------

from tests.conftest import Mount, requires_fuse  # noqa: E402
from tests.qemu import check as qemu_check  # noqa: E402
from tests.test_snapshots_online import BLOCK, Writer, assert_prefix  # noqa: E402


@requires_fuse
@pytest.mark.parametrize("seed", range(int(os.environ.get("VFSNAP_KILL_RUNS", "6"))))
def test_kill_9_during_snapshot_operations_under_a_writer(share, tmp_path, seed):
    import random
    import subprocess
    import sys
    import time

    from tests.qemu import make_chain

    rng = random.Random(seed)
    total = 3000
    make_chain(share, "vol", size=total * BLOCK, depth=0)
    mnt = Mount(share, tmp_path / "mnt").start()
    writer = Writer(mnt.volume("vol"), total)
    writer.start()
    taken = []
    try:
        time.sleep(rng.uniform(0.05, 0.3))
        deadline = time.monotonic() + rng.uniform(0.1, 1.5)
        step = 0
        in_flight = None
        while time.monotonic() < deadline:
            step += 1
            action = rng.choice(["mkdir", "mkdir", "rmdir"])
            try:
                if action == "mkdir" or not taken:
                    in_flight = f"k{step}"
                    os.mkdir(mnt.snapshot_dir("vol", in_flight))
                    taken.append(in_flight)
                else:
                    in_flight = rng.choice(taken)
                    taken.remove(in_flight)
                    os.rmdir(mnt.snapshot_dir("vol", in_flight))
                in_flight = None
            except OSError as exc:
                # Only EBUSY is an answer (a snapshot busy in a merge); an EIO or anything else
                # is a failure of the test, never a reason to stop quietly.
                if exc.errno != errno.EBUSY:
                    raise
                break
            time.sleep(rng.uniform(0, 0.05))
    finally:
        mnt.kill()
    writer.join(30)
    acked = writer.written
    mnt = Mount(share, tmp_path / "mnt").start()
    try:
        subprocess.run([sys.executable, "-m", "vfsnap", "sync", str(mnt.path), "--timeout", "120"], check=True)
        assert assert_prefix(mnt.volume("vol").read_bytes(), total=total) >= acked
        listed = set(os.listdir(mnt.snapshot_dir("vol"))) - {"latest"}
        for name in listed:
            assert_prefix(mnt.snapshot("vol", name).read_bytes(), total=total)
        # Every mkdir and rmdir that returned took effect; the one the kill interrupted is all
        # or nothing.
        assert set(taken) <= listed <= set(taken) | {in_flight}
    finally:
        mnt.stop()
    assert not mnt.unexpected_errors(), mnt.unexpected_errors()
    result = subprocess.run([sys.executable, "-m", "vfsnap", "check", str(share)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in os.listdir(share):
        if name.startswith("vol.") and not name.endswith((".info", ".json")):
            assert qemu_check(share / name)["exit"] == 0, name
