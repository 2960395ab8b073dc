"""Large shares (issue 13): the volume index lists a share of thousands of volumes completely and
correctly while volumes come and go, through the mount and behind its back; another host's new
volume appears within the documented interval; mounting and listing open no volume and write
nothing to the share, and no read of a volume or snapshot writes (issue 16); a 1000-deep chain is
served with the default options; `vfsnap status` shows the mount's memory budget."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import requires_fuse
from tests.qemu import create, flat_bytes, make_chain, qemu_img, qemu_io, write_info
from tests.test_multihost import two_hosts  # noqa: F401 - the fixture
from vfsnap.options import MountOptions
from vfsnap.share.index import RESCAN_SECONDS

pytestmark = requires_fuse
MiB = 1 << 20
CHURN = 400  # volumes each churning thread creates
# What a listing of another host's change may wait for on top of the index's own interval: the
# GlusterFS client's metadata cache (md-cache-timeout, 1 s by default), and a busy machine.
SHARE_CACHES_SECONDS = 1.0
SLACK_SECONDS = 2.0


def vfsnap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfsnap", *args], capture_output=True, text=True)


def sparse_volume(path: Path, size: int = MiB) -> None:
    with open(path, "xb") as f:
        f.truncate(size)


def share_state(share: Path) -> dict[str, tuple[int, int]]:
    """Every file of the share with its size and mtime: what "nothing written" compares."""
    return {name: (st.st_size, st.st_mtime_ns) for name in os.listdir(share)
            for st in [os.lstat(share / name)]}


def test_listing_is_complete_while_volumes_change_through_the_mount_and_on_the_share(share, tmp_path,
                                                                                      vfsnap_mount):
    """3000 volumes stay listed, each once, and no overlay or `.info` ever shows as a volume, while
    one thread creates, renames and deletes volumes through the mount, another does so directly on
    the share (as another host would, and as another host's snapshots add overlays), and a third
    takes snapshots of some stable volumes through a second mount; afterwards the listing is the
    share's truth."""
    stable = [f"stable-{i:05d}" for i in range(3000)]
    for name in stable:
        sparse_volume(share / name)
    snapped = stable[:20]
    mnt = vfsnap_mount()
    other = vfsnap_mount(path=tmp_path / "other-host")
    stop = threading.Event()
    errors: list[BaseException] = []
    mounted: set[str] = set()  # volumes the churn threads leave behind
    behind: set[str] = set()

    def through_the_mount():
        rng = random.Random(1)
        i = 0
        while not stop.is_set() and i < CHURN:
            name = f"mnt-{i:05d}"
            sparse_volume(mnt.volume(name))
            mounted.add(name)
            if rng.random() < 0.3:
                os.rename(mnt.volume(name), mnt.volume(name + "-renamed"))
                mounted.discard(name)
                mounted.add(name + "-renamed")
            elif rng.random() < 0.3:
                os.unlink(mnt.volume(name))
                mounted.discard(name)
            i += 1

    def on_the_share():
        rng = random.Random(2)
        i = 0
        while not stop.is_set() and i < CHURN:
            name = f"direct-{i:05d}"
            sparse_volume(share / name)
            behind.add(name)
            if rng.random() < 0.3:
                os.rename(share / name, share / (name + "-moved"))
                behind.discard(name)
                behind.add(name + "-moved")
            elif rng.random() < 0.3:
                os.unlink(share / name)
                behind.discard(name)
            i += 1
            time.sleep(0.005)

    def snapshots_on_the_other_host():
        i = 0
        while not stop.is_set() and i < CHURN // 10:
            os.mkdir(other.snapshot_dir(snapped[i % len(snapped)], f"s{i}"))
            i += 1
            time.sleep(0.05)

    def guarded(work):
        def run():
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
                stop.set()
        return threading.Thread(target=run)

    threads = [guarded(w) for w in (through_the_mount, on_the_share, snapshots_on_the_other_host)]
    for thread in threads:
        thread.start()
    try:
        listings = 0
        while (listings < 3 or any(t.is_alive() for t in threads)) and not stop.is_set():
            for tree in ("volumes", "snapshots"):
                names = os.listdir(mnt.path / tree)
                assert len(names) == len(set(names)), "a volume listed twice"
                missing = set(stable) - set(names)
                assert not missing, f"{tree}/ lost {len(missing)} volumes, e.g. {sorted(missing)[:3]}"
                strays = [n for n in names if n.startswith("stable-") and "." in n]
                assert not strays, f"overlays or documents listed as volumes: {strays[:3]}"
            listings += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    assert listings >= 3
    assert any(name.startswith("stable-") and name.endswith(".info") for name in os.listdir(share)), \
        "the other host took no snapshot"
    expected = set(stable) | mounted | behind
    deadline = time.monotonic() + RESCAN_SECONDS + SLACK_SECONDS
    while set(os.listdir((mnt.path / "volumes"))) != expected:
        assert time.monotonic() < deadline, set(os.listdir((mnt.path / "volumes"))) ^ expected
        time.sleep(0.05)
    assert set(os.listdir(mnt.path / "snapshots")) == expected
    for name in snapped[:3]:
        assert len([n for n in os.listdir(mnt.snapshot_dir(name)) if n != "latest"]) >= 1


def test_a_volume_another_host_creates_appears_within_the_interval(two_hosts):  # noqa: F811
    """Host B creates volumes (through its mount, and as a plain file on the share): host A,
    which has listed the share just before, lists them within RESCAN_SECONDS (plus the share
    client's own metadata cache), without any action of its own but listing."""
    prepare, start = two_hosts
    sparse_volume(prepare / "existing")
    host_a, host_b = start()
    for round_, make in enumerate((lambda n: sparse_volume(host_b.volume(n)),
                                   lambda n: sparse_volume(prepare / n))):
        for i in range(3):
            assert "existing" in os.listdir((host_a.path / "volumes"))  # host A has a fresh scan
            name = f"new-{round_}-{i}"
            make(name)
            made = time.monotonic()
            deadline = made + RESCAN_SECONDS + SHARE_CACHES_SECONDS + SLACK_SECONDS
            while name not in os.listdir((host_a.path / "volumes")):
                assert time.monotonic() < deadline, f"{name} not listed by the other host in time"
                time.sleep(0.02)
            assert os.stat(host_a.volume(name)).st_size == MiB


def test_mounting_and_listing_open_nothing_and_write_nothing(share, tmp_path, vfsnap_mount):
    """`ls`, `ls -l` (stat and the ACL question: listxattr), `stat`, `ls snapshots/` and
    `vfsnap status` write no sidecar (nor anything else) on the share; the sizes they show are
    those of the opened volumes; the first open writes the record (DESIGN.md invariant 4)."""
    sparse_volume(share / "raw", 3 * MiB + 512)
    create(share / "qcow", 5 * MiB)  # a qcow2 base vfsnap never met
    make_chain(share, "chain", size=2 * MiB, depth=3)  # raw base, 3 overlays, `.info`
    qemu_io(share / "chain.s3", f"write -P 7 {MiB} 64k")
    before = share_state(share)
    mnt = vfsnap_mount()
    result = vfsnap("sync", str(mnt.path), "--timeout", "60")  # the mount's recovery is done
    assert result.returncode == 0, result.stderr
    listed = sorted(os.listdir((mnt.path / "volumes")))
    assert listed == ["chain", "qcow", "raw"]
    subprocess.run(["ls", "-l", str((mnt.path / "volumes"))], check=True, capture_output=True)
    stats = {name: os.stat(mnt.volume(name)) for name in listed}
    for name in listed:
        os.listxattr(mnt.volume(name))
    assert sorted(os.listdir(mnt.path / "snapshots")) == listed
    status = json.loads(vfsnap("status", "--json", str(mnt.path)).stdout)
    assert {v["name"]: v["depth"] for v in status["volumes"]} == {"chain": 3, "qcow": 0, "raw": 0}
    assert share_state(share) == before, "mounting or listing changed the share"
    assert not [n for n in os.listdir(share) if n.endswith(".vfsnap.json")]

    assert stats["raw"].st_size == 3 * MiB + 512
    assert stats["qcow"].st_size == 5 * MiB
    assert stats["chain"].st_size == 2 * MiB
    for name in listed:
        with open(mnt.volume(name), "rb") as f:  # opened: now the record is made
            f.read(4096)
        opened = os.stat(mnt.volume(name))
        assert (opened.st_size, opened.st_blocks) == (stats[name].st_size, stats[name].st_blocks), name
        assert (share / f"{name}.vfsnap.json").exists(), f"{name}: no record after the first open"
    assert json.loads((share / "qcow.vfsnap.json").read_text())["format"] == "qcow2"
    assert json.loads((share / "raw.vfsnap.json").read_text())["format"] == "raw"


def read_everything(mnt, volumes: list[str]) -> dict:
    """Every read a user or a backup tool makes of the tree, through the mount: listings, stat
    of every node (volumes, snapshot directories, snapshot files, `latest`), every attribute,
    the bytes of every snapshot, `vfsnap map` of volumes and snapshots, `vfsnap diff`, `vfsnap
    status`. Returns what was seen (to compare with the share)."""
    seen: dict = {"volumes": sorted(os.listdir(mnt.path / "volumes"))}
    subprocess.run(["ls", "-lR", str(mnt.path)], check=True, capture_output=True)
    for name in volumes:
        paths = [mnt.volume(name), mnt.snapshot_dir(name)]
        snaps = sorted(n for n in os.listdir(mnt.snapshot_dir(name)) if n != "latest")
        seen[name] = {"snapshots": snaps, "created": {}, "data": {}}
        if snaps:
            assert os.readlink(mnt.snapshot_dir(name, "latest")) == snaps[-1]
        for snap in snaps:
            paths += [mnt.snapshot_dir(name, snap), mnt.snapshot(name, snap)]
            seen[name]["created"][snap] = os.stat(mnt.snapshot_dir(name, snap)).st_mtime_ns
            with open(mnt.snapshot(name, snap), "rb") as f:  # the snapshot's bytes, all of them
                seen[name]["data"][snap] = hashlib.sha256(f.read()).hexdigest()
            result = vfsnap("map", "--output=json", str(mnt.snapshot(name, snap)))
            assert result.returncode == 0, result.stderr
        if len(snaps) > 1:
            result = vfsnap("diff", "--from-snap", snaps[0], "--output=json", str(mnt.snapshot(name, snaps[-1])))
            assert result.returncode == 0, result.stderr
        result = vfsnap("map", "--output=json", str(mnt.volume(name)))
        assert result.returncode == 0, result.stderr
        for path in paths:
            os.stat(path)
            for attribute in os.listxattr(path):
                os.getxattr(path, attribute)
    status = vfsnap("status", "--json", str(mnt.path))
    assert status.returncode == 0, status.stderr
    seen["status"] = {v["name"]: v.get("snapshots") for v in json.loads(status.stdout)["volumes"]}
    return seen


def test_reading_volumes_and_snapshots_writes_nothing(share, tmp_path, vfsnap_mount):
    """Reading never writes (issue 16): every read of the tree (listings, stat and getattr of
    every node, the times of snapshots vfsnap did not take, every attribute, reading every
    snapshot's bytes, `vfsnap map`/`diff`/`status`) leaves every file of the share as it was and
    makes no sidecar: for volumes vfsnap never met, for a met volume, and for a snapshot another
    program (Cinder) took behind the mount's back, whose creation time vfsnap can only guess."""
    make_chain(share, "chain", size=2 * MiB, depth=3)  # raw base, 3 overlays, `.info`: Cinder's
    qemu_io(share / "chain.s1", f"write -P 7 {MiB} 64k")
    make_chain(share, "met", size=MiB, depth=2)
    qemu_io(share / "met.s2", "write -P 9 0 64k")
    sparse_volume(share / "plain", MiB)
    mnt = vfsnap_mount()
    result = vfsnap("sync", str(mnt.path), "--timeout", "60")  # the mount's recovery is done
    assert result.returncode == 0, result.stderr
    with open(mnt.volume("met"), "rb") as f:  # "met": opened once, so its record is on the share
        f.read(4096)
    assert (share / "met.vfsnap.json").exists()

    before = share_state(share)
    first = read_everything(mnt, ["chain", "met", "plain"])
    assert share_state(share) == before, "reading the tree changed the share"
    assert sorted(n for n in os.listdir(share) if n.endswith(".vfsnap.json")) == ["met.vfsnap.json"]
    assert first["chain"]["snapshots"] == ["s1", "s2", "s3"] and first["met"]["snapshots"] == ["s1", "s2"]

    # Cinder takes a snapshot of the met volume behind the mount's back: its time is a guess.
    create(share / "met.s3", MiB, backing="met.s2", backing_fmt="qcow2")
    write_info(share, "met", "met.s3", {"s1": "met.s1", "s2": "met.s2", "s3": "met.s3"})
    deadline = time.monotonic() + 10
    while "s3" not in os.listdir(mnt.snapshot_dir("met")):
        assert time.monotonic() < deadline, "a snapshot taken on the share was not listed"
        time.sleep(0.05)
    with open(mnt.volume("met"), "r+b"):  # a guest runs on it (nothing written): backups read
        before = share_state(share)
        second = read_everything(mnt, ["chain", "met", "plain"])
        again = read_everything(mnt, ["chain", "met", "plain"])
        assert share_state(share) == before, "reading the tree changed the share"
    assert second == again  # what reads show is stable, the guessed time of met@s3 too
    assert first["chain"] == second["chain"]
    assert json.loads((share / "met.vfsnap.json").read_text()).get("snapshots", {}).keys() == {"s1", "s2"}


def test_stat_right_after_a_listing_is_exact(share, vfsnap_mount):
    """READDIRPLUS entries of volumes not in use carry their base file's figures (marked as
    expiring at once when the volume has a chain, whose header the listing does not read): a
    `stat` right after the listing (no `ls -l` in between, so nothing else fetched the
    attributes) shows the size the image header says, for a qcow2 base never met, an overlay
    grown past its raw base, and a raw base that is the whole volume."""
    create(share / "qcow", 5 * MiB)  # a qcow2 file of ~200 KiB holding 5 MiB
    make_chain(share, "grown", size=2 * MiB, depth=1)
    qemu_img("resize", "-q", str(share / "grown.s1"), str(4 * MiB))
    sparse_volume(share / "raw", 3 * MiB)
    mnt = vfsnap_mount()
    for _ in range(2):  # the first listing of the mount, then one with the sizes seen before
        with os.scandir(mnt.path / "volumes") as entries:
            sizes = {entry.name: entry.stat().st_size for entry in entries}
        assert sizes == {"qcow": 5 * MiB, "grown": 4 * MiB, "raw": 3 * MiB}
    with open(mnt.volume("grown"), "rb"):  # a volume in use is listed from its view
        with os.scandir(mnt.path / "volumes") as entries:
            assert {e.name: e.stat().st_size for e in entries}["grown"] == 4 * MiB


def deep_chain(share: Path, depth: int, size: int) -> list[str]:
    """`vol` (raw) under `depth` overlays, each holding one distinct cluster (qemu-img made one
    overlay per kind; the rest are copies with the same-length backing name patched)."""
    names = ["vol"] + [f"vol.d{level:04d}" for level in range(1, depth + 1)]
    create(share / "vol", size, fmt="raw")
    qemu_io(share / "vol", f"write -P 1 0 {size}", fmt="raw")
    create(share / names[1], size, backing="vol", backing_fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "vol.d0000", "-F", "qcow2", str(share / "template"), str(size))
    template = (share / "template").read_bytes()
    (share / "template").unlink()
    for level in range(2, depth + 1):
        (share / names[level]).write_bytes(template.replace(b"vol.d0000", names[level - 1].encode(), 1))
    clusters = size // 65536
    for level in range(1, depth + 1, max(1, depth // 64)):  # 64 levels hold data, spread out
        alone = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(share / names[level])},
                            "backing": None})  # written without opening the chain below
        subprocess.run(["qemu-io", "-c", f"write -P {level % 250 + 2} {(level % clusters) * 65536} 65536",
                        f"json:{alone}"], check=True, capture_output=True)
    write_info(share, "vol", names[-1], {f"d{level:04d}": names[level] for level in range(1, depth + 1)})
    return names


def test_a_1000_deep_chain_is_served_with_the_default_options(share, tmp_path, vfsnap_mount):
    depth = 1000
    assert MountOptions().max_chain_depth >= depth
    names = deep_chain(share, depth, 4 * MiB)
    expected = flat_bytes(share / names[-1], tmp_path)
    mnt = vfsnap_mount()
    assert mnt.volume("vol").read_bytes() == expected
    status = json.loads(vfsnap("status", "--json", str(mnt.path)).stdout)
    assert [v["depth"] for v in status["volumes"]] == [depth]
    older = f"d{depth // 2:04d}"
    assert mnt.snapshot("vol", older).read_bytes() == flat_bytes(share / names[depth // 2 - 1], tmp_path)


def test_status_shows_the_memory_budget_in_use(share, vfsnap_mount):
    def writes(level, path, fmt):
        qemu_io(path, f"write -P {level + 1} {level * MiB} {2 * MiB}", fmt=fmt)

    for i in range(4):
        make_chain(share, f"v{i}", size=8 * MiB, depth=2, base_fmt="qcow2", writes=writes)
    mnt = vfsnap_mount("memory_budget=1M")
    for i in range(4):
        mnt.volume(f"v{i}").read_bytes()
    memory = json.loads(vfsnap("status", "--json", str(mnt.path)).stdout)["memory"]
    assert memory["budget"] == MiB
    used = memory["tables"] + memory["pinned"] + memory["dirty"] + memory["maps"]
    assert 0 < used <= memory["budget"], memory
    assert memory["tables"] > 0 and memory["maps"] > 0, memory
