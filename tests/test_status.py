"""`vfsnap status` and `vfsnap sync`, snapshot times, and xattrs (issue 4, DESIGN.md section 4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import requires_fuse
from tests.qemu import make_chain
from tests.test_faults import mounts  # noqa: F401 - the fixture

pytestmark = requires_fuse
MiB = 1 << 20


def vfsnap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfsnap", *args], capture_output=True, text=True)


def test_snapshot_mtime_is_its_creation_time_and_survives_remounts(share, vfsnap_mount):
    make_chain(share, "vol", size=MiB, depth=0)
    mnt = vfsnap_mount()
    before = time.time()
    os.mkdir(mnt.snapshot_dir("vol", "one"))
    after = time.time()
    created = os.stat(mnt.snapshot_dir("vol", "one")).st_mtime
    assert before - 1 <= created <= after + 1
    assert os.stat(mnt.snapshot("vol", "one")).st_mtime == created
    stamp = os.getxattr(mnt.snapshot_dir("vol", "one"), "user.vfsnap.created")
    mnt.stop()
    mnt = vfsnap_mount()
    assert os.stat(mnt.snapshot_dir("vol", "one")).st_mtime == created
    assert os.getxattr(mnt.snapshot_dir("vol", "one"), "user.vfsnap.created") == stamp


def test_status_lists_volumes_sizes_depth_and_snapshots(share, vfsnap_mount):
    make_chain(share, "vol", size=4 * MiB, depth=2)
    make_chain(share, "other", size=MiB, depth=0)
    mnt = vfsnap_mount()
    result = vfsnap("status", "--json", str(mnt.path))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    volumes = {v["name"]: v for v in document["volumes"]}
    assert volumes["vol"]["size"] == 4 * MiB and volumes["vol"]["depth"] == 2
    assert volumes["vol"]["snapshots"] == ["s1", "s2"]
    assert volumes["other"]["depth"] == 0 and volumes["other"]["snapshots"] == []
    assert document["operations"] == []
    text = vfsnap("status", str(mnt.path))
    assert text.returncode == 0 and "vol" in text.stdout and "s1 s2" in text.stdout


def test_status_shows_a_running_merge_and_sync_waits_for_it(mounts, tmp_path):  # noqa: F811
    # A slow share (each fsync and fdatasync takes 0.3 s: tests/faults.py) keeps the deletion
    # listed while `vfsnap status` looks (the merge's flush and its commit make about ten syncs);
    # on a fast disk it could finish before the first look.
    share = tmp_path / "share"
    share.mkdir()
    make_chain(share, "vol", size=64 * MiB, depth=0)
    mnt = mounts.start(share, faults="slow:0.3", ops="fsync,fdatasync")
    os.mkdir(mnt.snapshot_dir("vol", "old"))
    with open(mnt.volume("vol"), "r+b") as f:  # 32 MiB in the overlay of "old": a merge to watch
        chunk = os.urandom(MiB)
        for _ in range(32):
            f.write(chunk)
    os.mkdir(mnt.snapshot_dir("vol", "new"))
    os.rmdir(mnt.snapshot_dir("vol", "old"))
    seen = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        operations = json.loads(vfsnap("status", "--json", str(mnt.path)).stdout)["operations"]
        if not operations:
            break
        seen += operations
        time.sleep(0.05)
    assert any(op["kind"] == "delete" and op["snapshot"] == "old" and op["volume"] == "vol" for op in seen), seen
    assert all(op["state"] in ("queued", "merging") for op in seen)
    result = vfsnap("sync", str(mnt.path), "--timeout", "120")
    assert result.returncode == 0, result.stderr
    assert json.loads(vfsnap("status", "--json", str(mnt.path)).stdout)["operations"] == []
    assert os.listdir(mnt.snapshot_dir("vol")) in (["new", "latest"], ["latest", "new"])


def test_status_of_something_else_is_a_clear_error(tmp_path):
    result = vfsnap("status", str(tmp_path))
    assert result.returncode == 1 and "not a vfsnap mount" in result.stderr
