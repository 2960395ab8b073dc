"""Several hosts on one share (DESIGN.md invariant 7): two vfsnap mounts of the same share, over
a local directory and over a real GlusterFS volume (each "host" mounting the glusterfs client
itself). Chain changes exclude each other through POSIX locks on the share; a volume open for
writing on one host is EBUSY for writers and chain changes on the other; what one host does
shows up on the other."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import requires_fuse
from tests.qemu import check as qemu_check
from tests.qemu import make_chain
from tests.test_snapshots_online import BLOCK, block

pytestmark = requires_fuse


@pytest.fixture(params=["local", pytest.param("glusterfs", marks=pytest.mark.gluster)])
def two_hosts(request, share, tmp_path, vfsnap_mount):
    """(directory where the test prepares volumes, [host A mount, host B mount])."""
    if request.param == "local":
        def start():
            return [vfsnap_mount(path=tmp_path / f"host-{i}") for i in range(2)]
        yield share, start
        return
    volume = request.getfixturevalue("gluster_volume")
    client = request.getfixturevalue("gluster_client")
    bases = [tmp_path / f"host-{i}" / "mnt-base" for i in range(2)]

    def start():
        return [vfsnap_mount(f"share_type=glusterfs,mount_base={base}", path=tmp_path / f"host-{i}" / "mnt",
                             spec=volume.spec) for i, base in enumerate(bases)]

    yield client, start
    with open("/proc/mounts") as mounts:
        targets = [line.split()[1] for line in mounts]
    for target in reversed([t for t in targets if any(t.startswith(str(b) + os.sep) for b in bases)]):
        if subprocess.run(["umount", target], capture_output=True).returncode:
            subprocess.run(["umount", "-l", target], capture_output=True)


def eventually(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def eventually_open(path, flags, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, flags)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_a_writer_on_one_host_excludes_writers_and_chain_changes_on_the_other(two_hosts):
    prepared, start = two_hosts
    make_chain(prepared, "vol", size=1 << 20, depth=1)
    a, b = start()
    with open(a.volume("vol"), "r+b") as writer:
        writer.write(b"a" * 4096)
        writer.flush()
        with pytest.raises(OSError) as exc:
            os.open(b.volume("vol"), os.O_WRONLY)
        assert exc.value.errno == errno.EBUSY
        with pytest.raises(OSError) as exc:
            os.mkdir(b.snapshot_dir("vol", "from-b"))
        assert exc.value.errno == errno.EBUSY
        with pytest.raises(OSError) as exc:
            os.rmdir(b.snapshot_dir("vol", "s1"))
        assert exc.value.errno == errno.EBUSY
        # Readers are welcome, on both hosts; and the writing host takes snapshots itself.
        assert b.snapshot("vol", "s1").read_bytes()[:4096] == bytes(4096)
        os.mkdir(a.snapshot_dir("vol", "from-a"))
    # Released (FUSE sends the release after close() returns, so allow it a moment): the other
    # host may write now.
    fd = eventually_open(b.volume("vol"), os.O_WRONLY)
    os.pwrite(fd, b"b" * 4096, 4096)
    os.close(fd)
    eventually(lambda: a.volume("vol").read_bytes()[:8192] == b"a" * 4096 + b"b" * 4096)


def eventually_mkdir(path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.mkdir(path)
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_snapshots_taken_on_one_host_appear_on_the_other(two_hosts):
    prepared, start = two_hosts
    make_chain(prepared, "vol", size=1 << 20, depth=0)
    a, b = start()
    with open(a.volume("vol"), "r+b") as f:
        f.write(b"1" * 65536)
    os.mkdir(a.snapshot_dir("vol", "one"))
    eventually(lambda: "one" in os.listdir(b.snapshot_dir("vol")))
    assert b.snapshot("vol", "one").read_bytes()[:65536] == b"1" * 65536
    fd = eventually_open(b.volume("vol"), os.O_WRONLY)
    os.pwrite(fd, b"2" * 65536, 0)
    os.close(fd)
    eventually_mkdir(b.snapshot_dir("vol", "two"))
    eventually(lambda: sorted(os.listdir(a.snapshot_dir("vol"))) == ["latest", "one", "two"])
    assert a.snapshot("vol", "two").read_bytes()[:65536] == b"2" * 65536
    assert os.readlink(a.snapshot_dir("vol", "latest")) == "two"
    os.rmdir(a.snapshot_dir("vol", "one"))
    eventually(lambda: "one" not in os.listdir(b.snapshot_dir("vol")))
    subprocess.run([sys.executable, "-m", "vfsnap", "sync", str(a.path), "--timeout", "60"], check=True)
    eventually(lambda: b.snapshot("vol", "two").read_bytes()[:65536] == b"2" * 65536)
    assert b.volume("vol").read_bytes()[:65536] == b"2" * 65536


def test_concurrent_writes_mkdir_and_rmdir_from_two_hosts_keep_the_chain_consistent(two_hosts):
    prepared, start = two_hosts
    total = 400
    make_chain(prepared, "vol", size=total * BLOCK, depth=0)
    hosts = start()
    busy = {"count": 0}
    taken_by = {"a": 0, "b": 0}
    errors: list[BaseException] = []

    def writer(mnt, first, step):
        # Writes in short sessions (open, a few O_DSYNC blocks, close), from both hosts in turn.
        try:
            n = first
            while n < total:
                try:
                    fd = os.open(mnt.volume("vol"), os.O_WRONLY | os.O_DSYNC)
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise OSError(exc.errno, f"writer {first}: open: {exc.strerror}") from exc
                    busy["count"] += 1
                    time.sleep(0.01)
                    continue
                try:
                    for _ in range(5):
                        if n >= total:
                            break
                        os.pwrite(fd, block(n), n * BLOCK)
                        n += step
                finally:
                    os.close(fd)
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def snapshotter(mnt, prefix):
        try:
            taken = []
            for i in range(40):
                try:
                    if taken and i % 3 == 2:
                        doing = f"rmdir {taken[0]}"
                        os.rmdir(mnt.snapshot_dir("vol", taken.pop(0)))
                    else:
                        name = f"{prefix}{i}"
                        doing = f"mkdir {name}"
                        os.mkdir(mnt.snapshot_dir("vol", name))
                        taken.append(name)
                        taken_by[prefix] += 1
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise OSError(exc.errno, f"host {prefix}: {doing}: {exc.strerror}") from exc
                    busy["count"] += 1
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [
        threading.Thread(target=writer, args=(hosts[0], 0, 2)),
        threading.Thread(target=writer, args=(hosts[1], 1, 2)),
        threading.Thread(target=snapshotter, args=(hosts[0], "a")),
        threading.Thread(target=snapshotter, args=(hosts[1], "b")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"
    assert not errors, errors
    # The hosts did contend (else the exclusion was never exercised), and each still took snapshots.
    assert busy["count"] > 0, "no EBUSY at all: the two hosts never overlapped"
    assert taken_by["a"] > 0 and taken_by["b"] > 0, taken_by
    for mnt in hosts:
        subprocess.run([sys.executable, "-m", "vfsnap", "sync", str(mnt.path), "--timeout", "120"], check=True)
    eventually(lambda: sorted(os.listdir(hosts[0].snapshot_dir("vol"))) == sorted(os.listdir(hosts[1].snapshot_dir("vol"))))
    listings = [sorted(os.listdir(mnt.snapshot_dir("vol"))) for mnt in hosts]
    live = hosts[0].volume("vol").read_bytes()
    missing = [n for n in range(total) if live[n * BLOCK : (n + 1) * BLOCK] != block(n)]
    if missing:
        other = hosts[1].volume("vol").read_bytes()
        missing_other = [n for n in range(total) if other[n * BLOCK : (n + 1) * BLOCK] != block(n)]
        for mnt in hosts:
            mnt.stop()
        import json
        info = json.loads((Path(prepared) / "vol.info").read_text()) if (Path(prepared) / "vol.info").exists() else {"active": "vol"}
        from tests.qemu import flat_bytes
        top = Path(prepared) / info["active"]
        flat = flat_bytes(top, Path(prepared).parent, fmt="qcow2" if info["active"] != "vol" else "raw")
        missing_disk = [n for n in range(total) if flat[n * BLOCK : (n + 1) * BLOCK] != block(n)]
        raise AssertionError(f"missing on host0 {missing[:10]}, host1 {missing_other[:10]}, on disk {missing_disk[:10]}")
    for name in set(listings[0]) - {"latest"}:
        data = hosts[1].snapshot("vol", name).read_bytes()
        for n in range(total):  # every block is either written or not: never torn
            chunk = data[n * BLOCK : (n + 1) * BLOCK]
            assert chunk in (block(n), bytes(BLOCK)), (name, n)
    for mnt in hosts:
        mnt.stop()
    for name in os.listdir(prepared):
        if name.startswith("vol.") and not name.endswith((".info", ".json")):
            assert qemu_check(Path(prepared) / name)["exit"] == 0, name
    result = subprocess.run([sys.executable, "-m", "vfsnap", "check", str(prepared)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
