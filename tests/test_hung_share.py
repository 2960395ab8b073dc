"""A share that hangs stalls only its own volumes (issue 12; DESIGN.md section 4).

Two real GlusterFS volumes are the two shares of one mount (a Cinder shares file). The brick
process of share A is stopped with SIGSTOP, as a hung NAS under a hard mount, while a read and
four writes of a volume on A are in flight. Meanwhile a volume on share B keeps serving reads, writes and fsyncs,
and `ls MNT/volumes`, `stat`, `df` and `vfsnap status` answer, the last saying that share A is
not answering; taking or deleting a snapshot of the volume on A, truncating or renaming it fail at
once with EAGAIN. After SIGCONT the waiting read completes with the right bytes, the writes land, and the volume on A
can be snapshotted again. Stopped a second time, with nothing of A in flight (so that the mount
has not noticed yet): closing a file of the volume on A returns, a snapshot of it fails with
EAGAIN after asking A (0.5 s at most), and B still answers.

A second test stops share A in the middle of a merge (the background copy of a deleted
snapshot's overlay into the file below it): the merge waits for A, and nothing else does.

Every call on the mount runs on a helper thread with a deadline, so that a regression fails
the test instead of hanging it; the brick is always continued in a `finally`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, requires_fuse
from tests.gluster import brick_pid, create_volume, mount_client, remove_volume
from tests.qemu import check, flat_bytes, make_chain, qemu_io
from tests.test_gluster_basic import host_bases  # noqa: F401 (fixture)

pytestmark = [requires_fuse, pytest.mark.gluster]

KiB = 1 << 10
MiB = 1 << 20
DEADLINE = 10.0  # seconds each call on the mount may take while share A hangs


@pytest.fixture
def second_gluster_volume(gluster_volume, tmp_path_factory):
    volume = create_volume(tmp_path_factory.mktemp("gluster-b"), name=f"{gluster_volume.name}b")
    yield volume
    remove_volume(volume.name)


class Call:
    """`fn()` on a thread of its own: the test can wait for it with a deadline."""

    def __init__(self, fn):
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def wait(self, timeout: float, what: str):
        self.thread.join(timeout)
        assert self.done, f"{what} did not answer within {timeout} s while the other share hung"
        if self.error is not None:
            raise self.error
        return self.result


# (what, seconds) of each call made while share A hung: printed at the end (pytest -s), for the
# record; the test asserts only the deadline (speed is measured by benchmarks, not tests).
TIMES: list[tuple[str, float]] = []


def within(what: str, fn, timeout: float = DEADLINE):
    started = time.monotonic()
    try:
        return Call(fn).wait(timeout, what)
    finally:
        TIMES.append((what, time.monotonic() - started))


def pread_direct(fd: int, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    got = os.preadv(fd, [buf], offset)
    return bytes(buf[:got])


def read_direct(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return pread_direct(fd, offset, length)
    finally:
        os.close(fd)


def write_direct_and_fsync(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


# Opens the volume, says "open", waits for "go", writes each (offset, data) from a thread of
# its own with O_DIRECT, fsyncs, and exits 0 if every write was whole.
HUNG_WRITER = """
import ast, mmap, os, sys, threading
path, writes = sys.argv[1], ast.literal_eval(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
print("open", flush=True)
sys.stdin.readline()
done = []
def write(offset, data):
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    done.append(os.pwritev(fd, [buf], offset) == len(data))
threads = [threading.Thread(target=write, args=w) for w in writes]
for t in threads:
    t.start()
for t in threads:
    t.join()
os.fsync(fd)
sys.exit(0 if done == [True] * len(writes) else 1)
"""


def status_of(mountpoint: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "vfsnap", "status", "--json", str(mountpoint)],
                            capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    return json.loads(result.stdout)


def _fill(level, path, fmt):
    qemu_io(path, f"write -P {0x31 + level} {level * 256}k 1M", fmt=fmt)


def test_a_hung_share_stalls_only_its_own_volumes(gluster_volume, second_gluster_volume, host_bases,  # noqa: F811
                                                  vfsnap_mount, tmp_path):
    share_a, share_b = gluster_volume, second_gluster_volume
    client_a, client_b = tmp_path / "client-a", tmp_path / "client-b"
    mount_client(share_a, client_a)
    mount_client(share_b, client_b)
    try:
        names_a = make_chain(client_a, "va", size=8 * MiB, depth=2, base_fmt="qcow2", writes=_fill)
        names_c = make_chain(client_a, "vc", size=8 * MiB, depth=1, base_fmt="qcow2", writes=_fill)
        make_chain(client_b, "vb", size=8 * MiB, depth=1, base_fmt="qcow2", writes=_fill)
        expected_a = flat_bytes(client_a / names_a[-1], tmp_path)
        expected_c = bytearray(flat_bytes(client_a / names_c[-1], tmp_path))
    finally:
        for client in (client_a, client_b):
            subprocess.run(["umount", str(client)], capture_output=True, check=False)

    shares = tmp_path / "glusterfs_shares"
    shares.write_text(f"{share_a.spec}\n{share_b.spec}\n")  # A first: every lookup asks it first
    mnt = vfsnap_mount(f"share_type=glusterfs,shares_config={shares},mount_base={host_bases[0]}",
                       path=tmp_path / "mnt", spec="glusterfs-shares")
    # What the mount knows of share A before it hangs: the last known state it answers from.
    assert sorted(os.listdir(mnt.path / "volumes")) == ["va", "vb", "vc"]
    assert os.stat(mnt.volume("va")).st_size == 8 * MiB
    os.statvfs(mnt.path)
    assert {s["answering"] for s in status_of(mnt.path)["shares"]} == {True}
    assert read_direct(mnt.volume("va"), 0, 64 * KiB) == expected_a[: 64 * KiB]
    os.mkdir(mnt.path / "snapshots" / "va" / "before-hang")

    hung_offset = 5 * MiB + 12 * KiB  # not read before: nothing of it is cached anywhere
    # Open before the hang, as a hypervisor holds its disk open (opening a volume of a share
    # that does not answer fails with EAGAIN: docs/operations.md).
    fd_a = os.open(mnt.volume("va"), os.O_RDONLY | os.O_DIRECT)
    # Writes of vc, on share A too, in flight from four writers (on FUSE reader threads: one
    # waits for the share holding vc's write lock, the others for the lock; they must stall
    # nothing else). Of vc, not va: the kernel holds a file's inode lock over its writes, so
    # truncating or renaming va below would wait in the kernel, before vfsnap could refuse it.
    # In a process of their own: while its O_DIRECT writes wait, a process cannot fork (seen
    # here: the test's own `vfsnap status` subprocess waited for them), which is the writing
    # program's business, not the mount's.
    hung_writes = [(6 * MiB + i * 64 * KiB + 4 * KiB, bytes([0xa0 + i]) * (4 * KiB)) for i in range(4)]
    writer = subprocess.Popen([sys.executable, "-c", HUNG_WRITER, str(mnt.volume("vc")), repr(hung_writes)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "open\n"
    pid = brick_pid(share_a.name)
    os.kill(pid, signal.SIGSTOP)
    try:
        hung_read = Call(lambda: pread_direct(fd_a, hung_offset, 64 * KiB))
        writer.stdin.write("go\n")
        writer.stdin.flush()
        time.sleep(0.2)  # let them reach the share (no assertion hangs on this)
        assert not hung_read.done, "the read of the hung share returned: the brick was not stopped"
        assert writer.poll() is None, "the writes of the hung share returned"

        # Volume vb on share B: reads, a write and its fsync, at normal speed.
        expected_b_block = within("read vb", lambda: read_direct(mnt.volume("vb"), 0, 4 * KiB))
        assert expected_b_block == bytes([0x31]) * (4 * KiB)
        payload = bytes(range(256)) * 16
        within("write+fsync vb", lambda: write_direct_and_fsync(mnt.volume("vb"), 3 * MiB + 4 * KiB, payload))
        assert within("read back vb", lambda: read_direct(mnt.volume("vb"), 3 * MiB + 4 * KiB, 4 * KiB)) == payload

        # Listing, stat and df answer, the hung share's part from its last known state.
        assert sorted(within("ls volumes", lambda: os.listdir(mnt.path / "volumes"))) == ["va", "vb", "vc"]
        assert within("stat va", lambda: os.stat(mnt.volume("va"))).st_size == 8 * MiB
        assert within("stat vb", lambda: os.stat(mnt.volume("vb"))).st_size == 8 * MiB
        assert within("df", lambda: os.statvfs(mnt.path)).f_blocks > 0

        # `vfsnap status` says which share does not answer (polled: it is marked after a moment).
        deadline = time.monotonic() + DEADLINE
        while True:
            status = within("vfsnap status", lambda: status_of(mnt.path))
            states = {s["path"]: s["answering"] for s in status["shares"]}
            if list(states.values()) == [False, True]:
                break
            assert time.monotonic() < deadline, f"status never said share A hangs: {status['shares']}"
            time.sleep(0.1)
        assert sorted(v["name"] for v in status["volumes"]) == ["va", "vb", "vc"]

        # Changes of va's chain and size would make their calls on the share from the request
        # loop: they fail with EAGAIN at once instead of stalling the mount; vb still answers.
        for what, change in (("mkdir snapshot of va", lambda: os.mkdir(mnt.path / "snapshots" / "va" / "while-hung")),
                             ("truncate va", lambda: os.truncate(mnt.volume("va"), 16 * MiB)),
                             ("rename va", lambda: os.rename(mnt.volume("va"), mnt.volume("va2"))),
                             ("rmdir snapshot of va", lambda: os.rmdir(mnt.path / "snapshots" / "va" / "before-hang"))):
            with pytest.raises(OSError) as failed:
                within(what, change)
            assert failed.value.errno == errno.EAGAIN, f"{what}: {failed.value}"
        assert within("read vb after", lambda: read_direct(mnt.volume("vb"), 0, 4 * KiB)) == expected_b_block
        assert not hung_read.done, "the read of the hung share finished before SIGCONT"
        assert writer.poll() is None, "a write of the hung share finished before SIGCONT"
    finally:
        os.kill(pid, signal.SIGCONT)
    print("while share A hung: " + ", ".join(f"{what} {seconds:.3f} s" for what, seconds in TIMES))

    # Share A is back: the waiting read and writes complete, and A answers again.
    assert hung_read.wait(120, "the read of share A after SIGCONT") == expected_a[hung_offset : hung_offset + 64 * KiB]
    assert writer.wait(120) == 0, "the writes of share A failed after SIGCONT"
    for offset, data in hung_writes:
        expected_c[offset : offset + len(data)] = data
    assert read_direct(mnt.volume("vc"), 0, 8 * MiB) == expected_c
    os.close(fd_a)
    deadline = time.monotonic() + 30
    while not all(s["answering"] for s in status_of(mnt.path)["shares"]):
        assert time.monotonic() < deadline, "share A is still marked as not answering"
        time.sleep(0.1)
    assert read_direct(mnt.volume("va"), 0, 8 * MiB) == expected_a
    assert read_direct(mnt.volume("vb"), 3 * MiB + 4 * KiB, 4 * KiB) == payload
    # Nothing of the refused changes happened; the same changes work now.
    assert "while-hung" not in os.listdir(mnt.path / "snapshots" / "va")
    assert "before-hang" in os.listdir(mnt.path / "snapshots" / "va")
    assert sorted(os.listdir(mnt.path / "volumes")) == ["va", "vb", "vc"]
    assert os.stat(mnt.volume("va")).st_size == 8 * MiB
    os.mkdir(mnt.path / "snapshots" / "va" / "after-hang")
    assert read_direct(mnt.path / "snapshots" / "va" / "after-hang" / "va", 0, 8 * MiB) == expected_a
    os.rmdir(mnt.path / "snapshots" / "va" / "before-hang")
    assert read_direct(mnt.volume("va"), 0, 8 * MiB) == expected_a

    # Share A hangs again, with a file of va open and nothing of A in flight. Closing the file
    # gives its locks back on the share (a call the loop must not wait for): the close returns
    # and vb still answers; the locks are given back once A answers.
    fd_a = os.open(mnt.volume("va"), os.O_RDONLY | os.O_DIRECT)
    assert pread_direct(fd_a, 0, 4 * KiB) == expected_a[: 4 * KiB]
    os.kill(pid, signal.SIGSTOP)
    try:
        within("close va", lambda: os.close(fd_a))
        # Nothing of A was in flight, so the mount does not know yet that A hangs: a snapshot
        # asks A first (a `stat` of its directory, 0.5 s at most) and fails, rather than making
        # its calls on A from the loop.
        with pytest.raises(OSError) as failed:
            within("mkdir snapshot of va", lambda: os.mkdir(mnt.path / "snapshots" / "va" / "hung-again"))
        assert failed.value.errno == errno.EAGAIN, failed.value
        assert within("read vb meanwhile", lambda: read_direct(mnt.volume("vb"), 0, 4 * KiB)) == expected_b_block
    finally:
        os.kill(pid, signal.SIGCONT)
    print("share A hung again: " + ", ".join(f"{what} {seconds:.3f} s" for what, seconds in TIMES[-3:]))
    assert read_direct(mnt.volume("va"), 0, 8 * MiB) == expected_a
    assert "hung-again" not in os.listdir(mnt.path / "snapshots" / "va")


def progress(mountpoint: Path, state: str = "merging") -> tuple[int, int] | None:
    """(done, total) of the running merge (or clone's copy: "copying"), from the status the
    mount answers through its control file (what `vfsnap status` reads; no process started, so
    that it can be polled)."""
    status = json.loads(os.getxattr(mountpoint / ".vfsnap", "user.vfsnap.status"))
    for op in status["operations"]:
        if op.get("state") == state:
            return op["done"], op["total"]
    return None


def wait_until_copying(mountpoint: Path, state: str) -> None:
    deadline = time.monotonic() + 60
    while (done := progress(mountpoint, state)) is None or done[0] == 0:
        assert time.monotonic() < deadline, f"nothing was {state}: {done}"
        time.sleep(0.005)


def vb_goes_on(mnt, expected_b_block: bytes, payload: bytes, what: str) -> None:
    """Volume vb on share B is read, written and synced while share A hangs; the mount answers."""
    assert within(f"{what}: read vb", lambda: read_direct(mnt.volume("vb"), 0, 4 * KiB)) == expected_b_block
    within(f"{what}: write+fsync vb", lambda: write_direct_and_fsync(mnt.volume("vb"), 2 * MiB, payload))
    assert within(f"{what}: read back vb", lambda: read_direct(mnt.volume("vb"), 2 * MiB, 4 * KiB)) == payload
    assert "vb" in within(f"{what}: ls volumes", lambda: os.listdir(mnt.path / "volumes"))
    assert within(f"{what}: stat va", lambda: os.stat(mnt.volume("va"))).st_size == 384 * MiB
    assert within(f"{what}: df", lambda: os.statvfs(mnt.path)).f_blocks > 0
    shares_status = within(f"{what}: vfsnap status", lambda: status_of(mnt.path))["shares"]
    assert [s["answering"] for s in shares_status] == [False, True], shares_status


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def test_a_copy_on_a_share_that_hangs_stalls_only_the_copy(gluster_volume, second_gluster_volume,  # noqa: F811
                                                           host_bases, vfsnap_mount, tmp_path):
    """Deleting snapshot s1 of va merges its overlay (256 MiB of data) into the base, in the
    background, on share A's threads. A stops answering in the middle of the copy: the merge
    waits, the mount does not (vb is read, written and synced; listing, stat, df and status
    answer, status showing the merge where it stopped). After SIGCONT the merge finishes: the
    live volume and snapshot s2 hold what they held, the overlay is gone, QEMU checks the images.
    Then the same for the background copy of a clone of va. Before these copies ran on the
    share's threads, the stop stalled the whole mount."""
    share_a, share_b = gluster_volume, second_gluster_volume
    client_a, client_b = tmp_path / "client-a", tmp_path / "client-b"
    mount_client(share_a, client_a)
    mount_client(share_b, client_b)
    for leftover in client_a.iterdir():  # share A serves the other tests of this module too
        if leftover.is_file():
            leftover.unlink()

    def fill(level, path, fmt):
        if level == 1:
            qemu_io(path, "write -P 0x41 0 256M", fmt=fmt)  # what the merge copies
        else:
            qemu_io(path, f"write -P {0x30 + level} {level * 64}M 3M", fmt=fmt)

    try:
        names_a = make_chain(client_a, "va", size=384 * MiB, depth=2, base_fmt="qcow2", writes=fill)
        make_chain(client_b, "vb", size=8 * MiB, depth=1, base_fmt="qcow2", writes=_fill)
        live_a = hashlib.sha256(flat_bytes(client_a / names_a[-1], tmp_path)).hexdigest()
        s2_a = hashlib.sha256(flat_bytes(client_a / names_a[1], tmp_path)).hexdigest()
    finally:
        for client in (client_a, client_b):
            subprocess.run(["umount", str(client)], capture_output=True, check=False)

    shares = tmp_path / "glusterfs_shares"
    shares.write_text(f"{share_a.spec}\n{share_b.spec}\n")
    mnt = vfsnap_mount(f"share_type=glusterfs,shares_config={shares},mount_base={host_bases[0]}",
                       path=tmp_path / "mnt", spec="glusterfs-shares")
    expected_b_block = read_direct(mnt.volume("vb"), 0, 4 * KiB)
    assert expected_b_block == bytes([0x31]) * (4 * KiB)
    payload = bytes(range(256)) * 16
    pid = brick_pid(share_a.name)

    def sync() -> None:
        subprocess.run([sys.executable, "-m", "vfsnap", "sync", str(mnt.path), "--timeout", "300"],
                       cwd=ROOT, check=True, timeout=360)

    # The merge.
    os.rmdir(mnt.path / "snapshots" / "va" / "s1")
    wait_until_copying(mnt.path, "merging")
    os.kill(pid, signal.SIGSTOP)
    started = len(TIMES)
    try:
        time.sleep(0.5)  # the step in flight reaches the share and waits
        vb_goes_on(mnt, expected_b_block, payload, "merge")
        done, total = within("merge: status", lambda: progress(mnt.path))
        assert 0 < done < total, f"the merge was not stopped in the middle: {done} of {total}"
        time.sleep(1.0)
        assert within("merge: status again", lambda: progress(mnt.path)) == (done, total), \
            "the merge went on while share A was stopped"
    finally:
        os.kill(pid, signal.SIGCONT)
    print("while share A hung mid-merge: " + ", ".join(f"{what} {seconds:.3f} s" for what, seconds in TIMES[started:]))
    sync()
    assert progress(mnt.path) is None
    assert sorted(os.listdir(mnt.path / "snapshots" / "va")) == ["latest", "s2"]
    assert sha256_of(mnt.volume("va")) == live_a
    assert sha256_of(mnt.path / "snapshots" / "va" / "s2" / "va") == s2_a

    # A clone's copy (of va, into the clone's own base on share A).
    subprocess.run([sys.executable, "-m", "vfsnap", "clone", str(mnt.volume("va")), str(mnt.volume("vc"))],
                   cwd=ROOT, check=True, timeout=120)
    wait_until_copying(mnt.path, "copying")
    os.kill(pid, signal.SIGSTOP)
    started = len(TIMES)
    try:
        time.sleep(0.5)
        vb_goes_on(mnt, expected_b_block, payload, "clone copy")
    finally:
        os.kill(pid, signal.SIGCONT)
    print("while share A hung mid-copy: " + ", ".join(f"{what} {seconds:.3f} s" for what, seconds in TIMES[started:]))
    sync()
    assert progress(mnt.path, "copying") is None
    assert sha256_of(mnt.volume("vc")) == live_a
    assert sha256_of(mnt.volume("va")) == live_a
    mnt.stop()
    mount_client(share_a, client_a)
    try:
        assert sorted(n for n in os.listdir(client_a) if not n.endswith((".info", ".json"))) == ["va", "va.s2", "vc"]
        for name in ("va", "va.s2", "vc"):
            assert check(client_a / name)["exit"] == 0, name
    finally:
        subprocess.run(["umount", str(client_a)], capture_output=True, check=False)
