"""Several hosts on GlusterFS as many sites mount it (issue 16): the glusterfs client with its
default options (attribute and entry caching on), vfsnap pointed at the mounted directory. Every
snapshot is kept, no ESTALE reaches the user, another host's snapshot is listed within the
documented bound, and the mount warns about the client options."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import requires_fuse, wait_for
from tests.gluster import CLIENT_CACHES, _run, gluster
from vfsnap.share.remote import GLUSTERFS_COHERENCE_OPTIONS
from tests.qemu import make_chain, qemu_io

pytestmark = [requires_fuse, pytest.mark.gluster]

# docs/operations.md, "Several hosts": a snapshot taken on one host is listed on the others within this.
LISTING_BOUND = 1.0
MKDIRS_PER_HOST = 8


def _fill(level, path, fmt):
    qemu_io(path, f"write -P {0x31 + level} {level * 512}k 1M", fmt=fmt)


@pytest.fixture(params=["default-options", "vfsnap-options"])
def two_default_clients(request, gluster_volume, gluster_client, tmp_path):
    """Two glusterfs client mounts of the test volume (the first is the session's
    `gluster_client`, emptied at teardown). "default-options": as many sites run it, the
    client's default mount options and the volume's default client-side caches (quick-read,
    io-cache, md-cache, ... on, as a volume made without `group virt` has them; turned off again
    after); "vfsnap-options": remounted with the options vfsnap uses, caches off."""
    clients = [gluster_client, tmp_path / "gluster-client-2"]
    clients[1].mkdir()
    if request.param == "default-options":
        for option in CLIENT_CACHES:
            gluster("volume", "reset", gluster_volume.name, option)
        options = []
    else:
        options = ["-o", ",".join(GLUSTERFS_COHERENCE_OPTIONS)]
        _run("umount", str(clients[0]), timeout=30)
    for client in clients[1:] if not options else clients:
        result = _run("mount", "-t", "glusterfs", *options, gluster_volume.spec, str(client), timeout=60)
        if result.returncode != 0:
            pytest.fail(f"mount -t glusterfs {gluster_volume.spec} failed: {result.stderr.strip()}")
    yield tuple(clients)
    if _run("umount", str(clients[1]), timeout=30).returncode != 0:
        _run("umount", "-l", str(clients[1]), timeout=30)
    if request.param == "default-options":
        for option in CLIENT_CACHES:
            gluster("volume", "set", gluster_volume.name, option, "off")


def test_concurrent_mkdirs_on_two_hosts(two_default_clients, gluster_volume, vfsnap_mount, tmp_path, request):
    first, second = two_default_clients
    make_chain(first, "vol", size=4 << 20, depth=0)
    hosts = [vfsnap_mount(path=tmp_path / f"host-{i}", share_path=client) for i, client in enumerate((first, second))]
    warned = "default-options" in request.node.callspec.id
    for mnt in hosts:
        log = mnt.log()
        # The mount warns about the client's caching, naming the options to use; not otherwise.
        assert ("attribute-timeout=0,entry-timeout=0" in log) == warned, log
    errors: list[str] = []
    taken: list[str] = []
    done = threading.Event()

    def snapshotter(mnt, prefix):
        for i in range(MKDIRS_PER_HOST):
            name = f"{prefix}{i}"
            try:
                os.mkdir(mnt.snapshot_dir("vol", name))
                taken.append(name)
            except OSError as exc:
                errors.append(f"mkdir {name}: {exc}")

    def lister(mnt):
        while not done.is_set():
            try:
                os.listdir(mnt.snapshot_dir("vol"))
                os.stat(mnt.volume("vol"))
            except OSError as exc:
                errors.append(f"listing on {mnt.path}: {exc}")
            time.sleep(0.01)

    listers = [threading.Thread(target=lister, args=(mnt,)) for mnt in hosts]
    for thread in listers:
        thread.start()
    snapshotters = [threading.Thread(target=snapshotter, args=(mnt, prefix)) for mnt, prefix in zip(hosts, "ab")]
    for thread in snapshotters:
        thread.start()
    for thread in snapshotters:
        thread.join(300)
    done.set()
    for thread in listers:
        thread.join(60)
    assert not errors, errors[:20]
    assert not any(f"[Errno {errno.ESTALE}]" in line for mnt in hosts for line in mnt.log().splitlines())
    expected = sorted(f"{p}{i}" for p in "ab" for i in range(MKDIRS_PER_HOST))
    assert sorted(taken) == expected
    # From the brick (the server's own copy): the clients' caches are what is being tested.
    info = json.loads((gluster_volume.brick / "vol.info").read_text())
    assert sorted(k for k in info if k != "active") == expected, info
    for mnt in hosts:
        wait_for(lambda: sorted(set(os.listdir(mnt.snapshot_dir("vol"))) - {"latest"}) == expected,
                 f"every snapshot listed on {mnt.path}", timeout=10)
    for mnt in hosts:
        mnt.stop()
    result = subprocess.run([sys.executable, "-m", "vfsnap", "check", str(first)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_another_hosts_snapshot_is_listed_within_the_bound(two_default_clients, vfsnap_mount, tmp_path):
    first, second = two_default_clients
    make_chain(first, "vol", size=4 << 20, depth=0)
    a, b = (vfsnap_mount(path=tmp_path / f"host-{i}", share_path=client) for i, client in enumerate((first, second)))
    latencies = []
    for i in range(5):
        assert f"s{i}" not in os.listdir(b.snapshot_dir("vol"))  # b has read `.info` just now
        os.mkdir(a.snapshot_dir("vol", f"s{i}"))
        taken = time.monotonic()
        # The deadline is the documented bound with room for a busy machine; the figure is printed.
        wait_for(lambda: f"s{i}" in os.listdir(b.snapshot_dir("vol")), "the other host to list the snapshot",
                 timeout=LISTING_BOUND * 5, interval=0.01)
        latencies.append(time.monotonic() - taken)
    print(f"\nanother host's snapshot listed after {', '.join(f'{t:.2f}' for t in latencies)} s")


def test_files_replaced_behind_vfsnaps_back_while_it_reads(two_default_clients, vfsnap_mount, tmp_path):
    """Another client replaces the volume's `.info` and sidecar by identical copies (rename over,
    as another host's update does) while vfsnap opens, reads and lists the volume: no ESTALE
    reaches the reader, and every read returns the data."""
    first, second = two_default_clients
    make_chain(first, "vol", size=2 << 20, depth=1, writes=_fill)
    mnt = vfsnap_mount(share_path=first)
    expected = {path: path.read_bytes() for path in (mnt.volume("vol"), mnt.snapshot("vol", "s1"))}
    errors: list[str] = []
    done = threading.Event()

    def replacer():
        round_no = 0
        while not done.is_set():
            for name in ("vol.info", "vol.vfsnap.json"):
                copy = second / f".copy-{name}"
                shutil.copyfile(second / name, copy)
                os.rename(copy, second / name)
            round_no += 1
            done.wait(0.05)  # the pace of another host's changes, a busy one's
        replaced.append(round_no)

    replaced: list[int] = []
    thread = threading.Thread(target=replacer)
    thread.start()
    try:
        for _ in range(30):
            for path, data in expected.items():
                try:
                    if path.read_bytes() != data:
                        errors.append(f"{path}: wrong data")
                    os.listdir(mnt.snapshot_dir("vol"))
                except OSError as exc:
                    errors.append(f"{path}: {exc}")
    finally:
        done.set()
        thread.join(60)
    assert replaced and replaced[0] > 0
    assert not errors, errors[:10]
