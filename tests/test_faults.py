"""Faults of the share during real mounts (issue 5): the N-th operation vfsnap issues to the share
fails with ENOSPC or EIO (tests/faults.py, installed from VFSNAP_FAULTS by the daemon's test
launcher, tests/fault_launcher.py) in the middle of a guest write into a qcow2 overlay, a mkdir of
a snapshot, the background merge of an rmdir, and a rename of a volume; and a really full
filesystem (a small tmpfs) under a merge.

Each time the user must get a clean error with the injected errno (for the background merge:
`vfsnap status` shows the operation failed with its error and `vfsnap sync` exits non-zero),
no view may change (every view is compared byte for byte with what it was before), and the
operation must succeed when retried (the merge: after a remount without the fault). Afterwards
`vfsnap check` and `qemu-img check` find the share clean.

N is found by measuring first: a mount with VFSNAP_FAULTS=count reports how many operations the
same run made (VFSNAP_FAULTS_REPORT, written at a clean unmount); the tests then fail the one in
the middle, and the sweeps fail every one of them in turn.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Mount, mount_tmpfs, requires_fuse, unmount
from tests.qemu import check as qemu_check
from tests.qemu import create, qemu_io, write_info
from tests.test_check import (
    CLUSTER,
    output,
    qcow2_files,
    qemu_views,
    run_check,
    run_vfsnap,
    standard_share,
    write_sidecar,
)

pytestmark = requires_fuse

OPTIONS = "metadata_flush_interval=0"  # no background write-back: every counted operation is the test's
ERRNOS = {"ENOSPC": errno.ENOSPC, "EIO": errno.EIO}
INJECTED = "(injected at"

# -- mounting with faults ------------------------------------------------------------------------------


class Mounts:
    """Starts mounts with a fault plan in their environment; stops them all at teardown and
    fails the test if a daemon logged a traceback (an injected fault must be handled)."""

    def __init__(self, monkeypatch, base: Path):
        self.monkeypatch = monkeypatch
        self.base = base
        self.started: list[Mount] = []

    def start(self, share: Path, *, faults: str | None = None, ops: str | None = None,
              report: Path | None = None, options: str = OPTIONS) -> Mount:
        for name, value in (("VFSNAP_FAULTS", faults), ("VFSNAP_FAULTS_OPS", ops),
                            ("VFSNAP_FAULTS_REPORT", str(report) if report else None)):
            if value is None:
                self.monkeypatch.delenv(name, raising=False)
            else:
                self.monkeypatch.setenv(name, value)
        index = len(self.started)
        mnt = Mount(share, self.base / f"mnt{index}", options, log_path=self.base / f"mnt{index}.log",
                    module="tests.fault_launcher")
        self.started.append(mnt)
        try:
            return mnt.start()
        finally:
            for name in ("VFSNAP_FAULTS", "VFSNAP_FAULTS_OPS", "VFSNAP_FAULTS_REPORT"):
                self.monkeypatch.delenv(name, raising=False)

    def stop_all(self) -> list[str]:
        errors = []
        for mnt in self.started:
            mnt.stop()
            errors += [f"{mnt.log_path.name}: {line}" for line in mnt.unexpected_errors()]
        return errors


@pytest.fixture
def mounts(monkeypatch, tmp_path: Path):
    base = tmp_path / "mounts"
    base.mkdir()
    tracker = Mounts(monkeypatch, base)
    yield tracker
    errors = tracker.stop_all()
    if errors:
        pytest.fail("vfsnap logged unexpected errors:\n" + "\n".join(errors[:20]))


def count_operations(mounts: Mounts, template: Path, work: Path, action, *, ops: str | None = None,
                     options: str = OPTIONS) -> int:
    """How many (counted) share operations a mount of a copy of `template` makes for `action`."""
    share = fresh_copy(template, work / "count")
    report = work / "count.report"
    mnt = mounts.start(share, faults="count", ops=ops, report=report, options=options)
    try:
        action(mnt)
    finally:
        assert mnt.stop() == 0, mnt.log()
    return int(report.read_text())


def fresh_copy(template: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(template, target, symlinks=True)
    return target


# -- what the user sees ----------------------------------------------------------------------------------


def tree(mnt: Mount) -> dict[str, list[str]]:
    """volume -> its visible snapshots (without `latest`)."""
    volumes = sorted(os.listdir(mnt.path / "volumes"))
    assert sorted(os.listdir(mnt.path / "snapshots")) == volumes
    return {v: sorted(set(os.listdir(mnt.snapshot_dir(v))) - {"latest"}) for v in volumes}


def read_views(mnt: Mount) -> dict[str, bytes]:
    """Every view of every volume, read through the mount: "vol" and "vol@snap"."""
    views: dict[str, bytes | str] = {}
    for volume, snaps in tree(mnt).items():
        for key, path in [(volume, mnt.volume(volume))] + [(f"{volume}@{s}", mnt.snapshot(volume, s)) for s in snaps]:
            try:
                views[key] = path.read_bytes()
            except OSError as exc:
                views[key] = f"unreadable: {errno.errorcode.get(exc.errno, exc.errno)}"
    return views


def renamed_views(views: dict[str, bytes], old: str, new: str) -> dict[str, bytes]:
    out = {}
    for key, data in views.items():
        volume, _, snap = key.partition("@")
        out[(new if volume == old else volume) + (f"@{snap}" if snap else "")] = data
    return out


def status(mnt: Mount) -> dict:
    result = run_vfsnap("status", str(mnt.path), "--json")
    assert result.returncode == 0, output(result)
    return json.loads(result.stdout)


def sync(mnt: Mount, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_vfsnap("sync", str(mnt.path), "--timeout", str(timeout))


def assert_views(mnt: Mount, expected: dict[str, bytes], what: str) -> None:
    actual = read_views(mnt)
    assert sorted(actual) == sorted(expected), f"{what}: views {sorted(actual)}, expected {sorted(expected)}"
    for key, data in expected.items():
        if isinstance(actual[key], str):
            raise AssertionError(f"{what}: view {key} is {actual[key]}")  # noqa: TRY004 - a test failure
        assert actual[key] == data, f"{what}: view {key} changed"


def assert_share_clean(share: Path, expected_files: set[str] | None = None) -> None:
    result = run_check(share)
    assert result.returncode == 0, "vfsnap check after the retry: " + output(result).replace("\n", " | ")
    for path in qcow2_files(share):
        checked = qemu_check(path)
        assert checked["exit"] == 0, (path.name, checked)
    if expected_files is not None:
        assert set(os.listdir(share)) == expected_files, sorted(os.listdir(share))


def injected_in_log(mnt: Mount) -> list[str]:
    return [line for line in mnt.log().splitlines() if INJECTED in line]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The standard share of tests/test_check.py as a mount leaves it, and its views."""
    base = tmp_path_factory.mktemp("faults-template")
    share = base / "share"
    share.mkdir()
    standard_share(share)
    mnt = Mount(share, base / "mnt", OPTIONS).start()
    try:
        views = read_views(mnt)
    finally:
        mnt.stop()
    assert not mnt.unexpected_errors()
    assert sorted(views) == ["other", "vol", "vol@s1", "vol@s2"]
    oracle = qemu_views(share, "vol", base / "work")
    assert hashlib.sha256(views["vol"]).hexdigest() == oracle["live"]
    assert hashlib.sha256(views["vol@s1"]).hexdigest() == oracle["s1"]
    return share, views


def middle(total: int) -> int:
    return max(1, (total + 1) // 2)


def sweep(case, total: int) -> None:
    """Run `case(n)` for every n of 1..total; report every n that went wrong, not just the first."""
    failures = []
    for n in range(1, total + 1):
        try:
            case(n)
        except (AssertionError, OSError) as exc:
            text = " | ".join(line.strip() for line in str(exc).strip().splitlines()[:4] if line.strip())
            failures.append(f"N={n}: {(text or repr(exc))[:400]}")
    assert not failures, f"{len(failures)} of {total} fault points went wrong:\n" + "\n".join(failures)


# -- (a) a guest write into a qcow2 overlay ------------------------------------------------------------------

# Clusters 3 (unallocated in the whole chain above the raw base) and 4 (allocated in vol.s1),
# half each: copy-on-write of both from the chain, new clusters in vol.s2. Page aligned and
# 64 KiB: one FUSE write request, so a failure can't turn into a short write.
WRITE_OFFSET = 3 * CLUSTER + CLUSTER // 2
WRITE_LENGTH = CLUSTER


def attempt_write(fd: int, data: bytes) -> dict[str, int | None]:
    """pwrite then fsync, as a program does, stopping at the first failure.
    Returns call -> errno (None: it succeeded)."""
    outcome: dict[str, int | None] = {}
    try:
        written = os.pwrite(fd, data, WRITE_OFFSET)
        assert written == len(data), f"short write: {written} of {len(data)}"
        outcome["write"] = None
        os.fsync(fd)
        outcome["fsync"] = None
    except OSError as exc:
        outcome["write" if "write" not in outcome else "fsync"] = exc.errno
    return outcome


def guest_write(mnt: Mount, data: bytes) -> dict[str, int | None]:
    fd = os.open(mnt.volume("vol"), os.O_WRONLY)
    try:
        return attempt_write(fd, data)
    finally:
        os.close(fd)


def with_write(views: dict[str, bytes], data: bytes) -> dict[str, bytes]:
    live = views["vol"]
    return {**views, "vol": live[:WRITE_OFFSET] + data + live[WRITE_OFFSET + len(data):]}


def wait_for_log(mnt: Mount, predicate, timeout: float = 5.0) -> list[str]:
    """Lines of the daemon's log with the injected fault that satisfy `predicate`; waits a
    little, because FUSE's release runs after close(2) has returned."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in injected_in_log(mnt) if predicate(line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def write_case(mounts: Mounts, template, work: Path, n: int, err: str, *, options: str = OPTIONS) -> Mount:
    """A program writes, fsyncs, and on an error retries on the same open file (as a
    hypervisor does); then closes. The fault hits the N-th share operation of all that.
    Returns the (stopped) mount that failed."""
    share_template, before = template
    share = fresh_copy(share_template, work / "share")
    first, second = b"\xee" * WRITE_LENGTH, b"\x5a" * WRITE_LENGTH
    mnt = failed_mount = mounts.start(share, faults=f"error:{n}:{err}", options=options)
    try:
        fd = os.open(mnt.volume("vol"), os.O_WRONLY)
        try:
            outcome = attempt_write(fd, first)
            failed = {call: e for call, e in outcome.items() if e is not None}
            assert all(e == ERRNOS[err] for e in failed.values()), \
                f"errors {({c: errno.errorcode[e] for c, e in failed.items()})}, injected {err}"
            if outcome.get("write"):
                assert_views(mnt, before, f"after the failed write ({err} at operation {n})")
            else:
                # The write succeeded (the fault hits fsync or later): its data is there, nothing else moved.
                assert_views(mnt, with_write(before, first), f"after the write ({err} at operation {n})")
            if failed:
                retry = attempt_write(fd, second)
                assert retry == {"write": None, "fsync": None}, f"the retried write failed: {retry}"
                expected = with_write(before, second)
            else:
                expected = with_write(before, first)
        finally:
            os.close(fd)
        if not failed:
            # Only a failure nobody can be told about may stay unreported: in release, which
            # runs after close(2) returned. It must be logged.
            assert wait_for_log(mnt, lambda line: "release" in line), \
                f"the injected {err} surfaced nowhere: {outcome}"
        assert_views(mnt, expected, "after the retried write")
        # A new writer (open, write, fsync, close) works too.
        assert guest_write(mnt, second[:4096]) == {"write": None, "fsync": None}
        expected = with_write(expected, second[:4096])
    finally:
        assert mnt.stop() == 0, mnt.log()
    assert_share_clean(share, set(os.listdir(share_template)))
    mnt = mounts.start(share)
    try:
        assert_views(mnt, expected, "after a remount")
    finally:
        mnt.stop()
    return failed_mount


def incompatible_features(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(80)[72:80], "big")


@pytest.mark.parametrize("err", list(ERRNOS))
def test_dirty_bit_is_on_disk_while_metadata_is_unwritten_after_a_failed_first_write(mounts, template, tmp_path,
                                                                                  err):
    """QCOW2-NOTES 1.8 rule 5: the dirty bit is durable before the first deferred metadata
    change. Operation 1 of a first write is that header write: when it fails, the retried
    write must still mark the image dirty before it leaves metadata changes in memory."""
    share = fresh_copy(template[0], tmp_path / "share")
    mnt = mounts.start(share, faults=f"error:1:{err}")
    try:
        fd = os.open(mnt.volume("vol"), os.O_WRONLY)
        try:
            assert attempt_write(fd, b"\xee" * WRITE_LENGTH) == {"write": ERRNOS[err]}
            assert os.pwrite(fd, b"\x5a" * WRITE_LENGTH, WRITE_OFFSET) == WRITE_LENGTH  # retried; not yet fsynced
            assert incompatible_features(share / "vol.s2") & 1, "new clusters in use, refcounts unwritten, image not marked dirty"
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        assert mnt.stop() == 0, mnt.log()
    assert not incompatible_features(share / "vol.s2") & 1, "dirty bit left set after a clean unmount"
    assert_share_clean(share)


def count_write(mounts, template, work, *, options: str = OPTIONS) -> int:
    def action(mnt: Mount) -> None:
        assert guest_write(mnt, b"\xee" * WRITE_LENGTH) == {"write": None, "fsync": None}

    return count_operations(mounts, template[0], work, action, options=options)


@pytest.mark.parametrize("err", list(ERRNOS))
def test_write_failing_in_the_middle_reports_the_error_and_can_be_retried(mounts, template, tmp_path, err):
    total = count_write(mounts, template, tmp_path)
    assert total >= 6, total  # dirty bit, data, refcounts, L2, L1, syncs
    write_case(mounts, template, tmp_path, middle(total), err)


@pytest.mark.slow
@pytest.mark.parametrize("err", list(ERRNOS))
def test_write_failing_at_every_operation(mounts, template, tmp_path, err):
    total = count_write(mounts, template, tmp_path)
    sweep(lambda n: write_case(mounts, template, tmp_path, n, err), total)


# -- (b) mkdir of a snapshot ------------------------------------------------------------------------------------


def mkdir_case(mounts: Mounts, template, work: Path, n: int, err: str) -> None:
    share_template, before = template
    share = fresh_copy(share_template, work / "share")
    mnt = mounts.start(share, faults=f"error:{n}:{err}")
    try:
        try:
            os.mkdir(mnt.snapshot_dir("vol", "new"))
            failed = None
        except OSError as exc:
            failed = exc.errno
        if failed is None:
            assert injected_in_log(mnt), f"mkdir succeeded and the injected {err} surfaced nowhere"
            expected = {**before, "vol@new": before["vol"]}
            assert_views(mnt, expected, f"after mkdir ({err} at operation {n}, not reported)")
        else:
            assert failed == ERRNOS[err], f"mkdir failed with {errno.errorcode[failed]}, injected {err}"
            assert_views(mnt, before, f"after the failed mkdir ({err} at operation {n})")
            assert not (share / "vol.new").exists(), "the failed mkdir left its overlay"
            os.mkdir(mnt.snapshot_dir("vol", "new"))  # the retry
        assert_views(mnt, {**before, "vol@new": before["vol"]}, "after the retried mkdir")
        # The live volume still takes writes, and the new snapshot keeps its data.
        with open(mnt.volume("vol"), "r+b") as f:
            f.seek(5 * CLUSTER)
            f.write(b"\x42" * 4096)
        assert mnt.snapshot("vol", "new").read_bytes() == before["vol"]
    finally:
        assert mnt.stop() == 0, mnt.log()
    assert_share_clean(share, set(os.listdir(share_template)) | {"vol.new"})


def count_mkdir(mounts, template, work) -> int:
    return count_operations(mounts, template[0], work, lambda mnt: os.mkdir(mnt.snapshot_dir("vol", "new")))


@pytest.mark.parametrize("err", list(ERRNOS))
def test_mkdir_failing_in_the_middle_reports_the_error_and_can_be_retried(mounts, template, tmp_path, err):
    total = count_mkdir(mounts, template, tmp_path)
    assert total >= 8, total
    mkdir_case(mounts, template, tmp_path, middle(total), err)


@pytest.mark.slow
@pytest.mark.parametrize("err", ["ENOSPC"])
def test_mkdir_failing_at_every_operation(mounts, template, tmp_path, err):
    total = count_mkdir(mounts, template, tmp_path)
    sweep(lambda n: mkdir_case(mounts, template, tmp_path, n, err), total)


# -- (c) the background merge of rmdir ----------------------------------------------------------------------------

IMAGE_WRITES = "pwrite,copy_file_range,fdatasync"  # the merge's copy, the target's write-back, the rebase; not the journal


def merge_case(mounts: Mounts, template, work: Path, n: int, err: str, victim: str, ops: str | None) -> None:
    share_template, before = template
    share = fresh_copy(share_template, work / "share")
    after = {k: v for k, v in before.items() if k != f"vol@{victim}"}
    mnt = mounts.start(share, faults=f"error:{n}:{err}", ops=ops)
    try:
        try:
            os.rmdir(mnt.snapshot_dir("vol", victim))
            rmdir_failed = None
        except OSError as exc:
            rmdir_failed = exc.errno
        if rmdir_failed is not None:
            # The fault hit rmdir's own journal write: rmdir fails, nothing changed, retry works.
            assert rmdir_failed == ERRNOS[err], f"rmdir failed with {errno.errorcode[rmdir_failed]}, injected {err}"
            assert_views(mnt, before, f"after the failed rmdir ({err} at operation {n})")
            os.rmdir(mnt.snapshot_dir("vol", victim))
            synced = sync(mnt)
            assert synced.returncode == 0, output(synced)
            assert_views(mnt, after, "after the retried rmdir")
        else:
            synced = sync(mnt)
            operations = status(mnt)["operations"]
            assert_views(mnt, after, f"after the merge ({err} at operation {n})")
            if synced.returncode == 0:
                assert not operations
                assert injected_in_log(mnt), f"the merge succeeded and the injected {err} surfaced nowhere"
            else:
                assert "vol" in synced.stderr and "failed" in synced.stderr, output(synced)
                failed = [op for op in operations if op.get("snapshot") == victim]
                assert len(failed) == 1 and failed[0]["state"] == "failed", operations
                assert failed[0]["volume"] == "vol" and failed[0]["kind"] == "delete", operations
                assert failed[0].get("error"), operations
    finally:
        assert mnt.stop() == 0, mnt.log()
    # Remount without the fault: the pending deletion resumes and completes.
    mnt = mounts.start(share)
    try:
        synced = sync(mnt)
        assert synced.returncode == 0, "sync after the remount: " + output(synced)
        assert not status(mnt)["operations"]
        assert_views(mnt, after, "after the remount and the merge")
    finally:
        assert mnt.stop() == 0, mnt.log()
    assert_share_clean(share, set(os.listdir(share_template)) - {f"vol.{victim}"})


def rmdir_and_sync(victim: str):
    def action(mnt: Mount) -> None:
        os.rmdir(mnt.snapshot_dir("vol", victim))
        synced = sync(mnt)
        assert synced.returncode == 0, output(synced)

    return action


@pytest.mark.parametrize("victim", ["s1", "s2"], ids=["oldest", "newest"])
@pytest.mark.parametrize("err", list(ERRNOS))
def test_merge_failing_in_the_middle_shows_failed_and_resumes_after_remount(mounts, template, tmp_path,
                                                                          err, victim):
    total = count_operations(mounts, template[0], tmp_path, rmdir_and_sync(victim), ops=IMAGE_WRITES)
    assert total >= 6, total
    merge_case(mounts, template, tmp_path, middle(total), err, victim, IMAGE_WRITES)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["s1", "s2"], ids=["oldest", "newest"])
def test_rmdir_and_merge_failing_at_every_operation(mounts, template, tmp_path, victim):
    total = count_operations(mounts, template[0], tmp_path, rmdir_and_sync(victim))
    sweep(lambda n: merge_case(mounts, template, tmp_path, n, "ENOSPC", victim, None), total)


# -- (d) a rename (mv) of a volume --------------------------------------------------------------------------------


def rename_case(mounts: Mounts, template, work: Path, n: int, err: str) -> None:
    share_template, before = template
    share = fresh_copy(share_template, work / "share")
    after = renamed_views(before, "vol", "new")
    mnt = mounts.start(share, faults=f"error:{n}:{err}")
    try:
        try:
            os.rename(mnt.volume("vol"), mnt.volume("new"))
            failed = None
        except OSError as exc:
            failed = exc.errno
        if failed is None:
            assert injected_in_log(mnt), f"mv succeeded and the injected {err} surfaced nowhere"
        else:
            assert failed == ERRNOS[err], f"mv failed with {errno.errorcode[failed]}, injected {err}"
            assert_views(mnt, before, f"after the failed mv ({err} at operation {n})")
            os.rename(mnt.volume("vol"), mnt.volume("new"))  # the retry
        assert_views(mnt, after, "after the retried mv")
    finally:
        assert mnt.stop() == 0, mnt.log()
    expected = {name.replace("vol", "new", 1) if name.startswith("vol") else name for name in os.listdir(share_template)}
    assert_share_clean(share, expected)
    mnt = mounts.start(share)
    try:
        assert_views(mnt, after, "after a remount")
    finally:
        mnt.stop()


def count_rename(mounts, template, work) -> int:
    return count_operations(mounts, template[0], work, lambda mnt: os.rename(mnt.volume("vol"), mnt.volume("new")))


@pytest.mark.parametrize("err", list(ERRNOS))
def test_rename_failing_in_the_middle_reports_the_error_and_can_be_retried(mounts, template, tmp_path, err):
    total = count_rename(mounts, template, tmp_path)
    assert total >= 12, total
    rename_case(mounts, template, tmp_path, middle(total), err)


@pytest.mark.slow
@pytest.mark.parametrize("err", ["ENOSPC"])
def test_rename_failing_at_every_operation(mounts, template, tmp_path, err):
    total = count_rename(mounts, template, tmp_path)
    sweep(lambda n: rename_case(mounts, template, tmp_path, n, err), total)


# -- a really full filesystem --------------------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    path = tmp_path / "tmpfs"
    path.mkdir()
    mount_tmpfs(path, "12m")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            unmount(path, lazy=True)
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def test_merge_on_a_full_filesystem_fails_then_completes_after_space_is_freed(mounts, small_tmpfs, tmp_path):
    share = small_tmpfs / "share"
    share.mkdir()
    size = 8 << 20
    # A sparse raw base, an overlay holding 5 MiB of data, the active overlay above it.
    create(share / "vol", size, fmt="raw")
    qemu_io(share / "vol", "write -P 0x11 0 1M", fmt="raw")
    create(share / "vol.s1", size, backing="vol", backing_fmt="raw")
    qemu_io(share / "vol.s1", "write -P 0x22 1M 5M")
    create(share / "vol.s2", size, backing="vol.s1", backing_fmt="qcow2")
    qemu_io(share / "vol.s2", "write -P 0x33 2M 64k")
    write_info(share, "vol", "vol.s2", {"s1": "vol.s1", "s2": "vol.s2"})
    write_sidecar(share, "vol", created={"s1": 1.0e9, "s2": 1.0e9 + 1})
    # Fill the filesystem so that merging vol.s1 into the base (5 MiB of new blocks) cannot fit.
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\xff" * (free - (2 << 20)))
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    assert (1 << 20) < free < (3 << 20), free

    mnt = mounts.start(share)
    try:
        before = read_views(mnt)
        after = {k: v for k, v in before.items() if k != "vol@s1"}
        os.rmdir(mnt.snapshot_dir("vol", "s1"))
        synced = sync(mnt)
        assert synced.returncode != 0, "the merge cannot have fitted: " + output(synced)
        assert "vol" in synced.stderr and "failed" in synced.stderr, output(synced)
        operations = status(mnt)["operations"]
        assert [(op["snapshot"], op["state"]) for op in operations] == [("s1", "failed")], operations
        assert "space" in operations[0]["error"].lower() or "ENOSPC" in operations[0]["error"], operations
        assert_views(mnt, after, "after the failed merge")
        # The rest of the volume keeps working: a write into an allocated cluster of the top.
        with open(mnt.volume("vol"), "r+b") as f:
            f.seek(2 << 20)
            f.write(b"\x44" * 4096)
        after["vol"] = after["vol"][: 2 << 20] + b"\x44" * 4096 + after["vol"][(2 << 20) + 4096:]
        assert_views(mnt, after, "after a write beside the failed merge")
    finally:
        assert mnt.stop() == 0, mnt.log()
    filler.unlink()
    mnt = mounts.start(share)
    try:
        synced = sync(mnt)
        assert synced.returncode == 0, "sync after freeing space and remounting: " + output(synced)
        assert not status(mnt)["operations"]
        assert_views(mnt, after, "after the merge completed")
    finally:
        assert mnt.stop() == 0, mnt.log()
    assert_share_clean(share, {"vol", "vol.info", "vol.s2", "vol.vfsnap.json"})
