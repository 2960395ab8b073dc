"""Snapshots against an in-memory model: every view, after every step (DESIGN.md invariants 1-2).

A hypothesis state machine writes to the live volume, takes snapshots with mkdir, deletes any of
them with rmdir (oldest, middle, newest, the only one), extends the volume and remounts, clones
a snapshot or the live volume (`vfsnap clone`, each clone written and deleted on its own), reverts
to a snapshot (`vfsnap revert`, with and without --destroy-newer), and
after every step compares the live volume and every snapshot with the model, also right after
rmdir while the merge may still be running. Half of the runs mount with `share_io=threads`: the
writes, the merges' and the clones' copies run on the share's threads, as on a network share. At the end every image passes `qemu-img check`,
`.info` is byte-for-byte what Cinder's json.dump writes, and QEMU reads the same chain.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.conftest import Mount, requires_fuse
from tests.qemu import check, flat_bytes, qemu_img

pytestmark = requires_fuse

VOLUME = "vol"
SNAP_NAMES = [f"s{i}" for i in range(12)]
CLONE_NAMES = [f"c{i}" for i in range(3)]


def vfsnap(*args: str, check_rc: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "vfsnap", *args], capture_output=True, text=True)
    if check_rc:
        assert result.returncode == 0, result.stderr
    return result


class SnapshotMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="vfsnap-model-")
        root = Path(self.tmp.name)
        self.share = root / "share"
        self.share.mkdir()
        self.mnt_path = root / "mnt"
        self.mnt: Mount | None = None
        self.live = bytearray()
        self.snapshots: dict[str, bytes] = {}
        self.order: list[str] = []
        self.clones: dict[str, bytearray] = {}

    @initialize(size_kib=st.sampled_from([256, 1024, 2048]), base=st.sampled_from(["raw", "qcow2"]),
                options=st.sampled_from(["", "metadata_flush_interval=0.05", "share_io=threads",
                                         "share_io=threads,metadata_flush_interval=0.05"]))
    def start(self, size_kib, base, options):
        size = size_kib * 1024
        if base == "raw":
            with open(self.share / VOLUME, "wb") as f:
                f.truncate(size)
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(self.share / VOLUME), str(size))
        self.options = options
        self.live = bytearray(size)
        self._mount()

    def _mount(self):
        self.mnt = Mount(self.share, self.mnt_path, self.options).start()

    def teardown(self):
        try:
            if self.mnt is not None:
                self._sync()
                self.mnt.stop()
                assert not self.mnt.unexpected_errors(), self.mnt.unexpected_errors()
                self._check_share()
        finally:
            if self.mnt is not None and self.mnt.process is not None:
                self.mnt.stop()
            self.tmp.cleanup()

    def _sync(self):
        vfsnap("sync", str(self.mnt_path), "--timeout", "120")

    def _check_share(self):
        info_path = self.share / f"{VOLUME}.info"
        info = json.loads(info_path.read_text()) if info_path.exists() else {"active": VOLUME}
        if info_path.exists():
            assert info_path.read_text() == json.dumps(info, indent=1, sort_keys=True)
        assert {k for k in info if k != "active"} == set(self.snapshots)
        for name in os.listdir(self.share):
            if name.startswith(VOLUME) and not name.endswith((".info", ".json")):
                with open(self.share / name, "rb") as f:
                    if f.read(4) == b"QFI\xfb":
                        result = check(self.share / name)
                        assert result["exit"] == 0, (name, result)
        active = self.share / info["active"]
        fmt = "qcow2" if open(active, "rb").read(4) == b"QFI\xfb" else "raw"
        assert flat_bytes(active, self.share.parent, fmt=fmt) == bytes(self.live)
        for name, model in self.clones.items():
            top, fmt = self.share / name, "qcow2"
            clone_info = self.share / f"{name}.info"
            if clone_info.exists():
                top = self.share / json.loads(clone_info.read_text())["active"]
            assert check(top)["exit"] == 0, name
            assert flat_bytes(top, self.share.parent, fmt=fmt) == bytes(model), name
        # Every overlay named in .info is the file the snapshot's data sits above.
        for snap, overlay in info.items():
            if snap != "active":
                assert overlay == f"{VOLUME}.{snap}"

    # -- rules ------------------------------------------------------------------------------

    @rule(data=st.data())
    def write(self, data):
        size = len(self.live)
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, min(70000, size - offset)), label="length")
        byte = data.draw(st.integers(1, 255), label="byte")
        payload = bytes([byte]) * length
        fd = os.open(self.mnt.volume(VOLUME), os.O_WRONLY)
        try:
            assert os.pwrite(fd, payload, offset) == length
            if data.draw(st.booleans(), label="fsync"):
                os.fsync(fd)
        finally:
            os.close(fd)
        self.live[offset : offset + length] = payload

    @precondition(lambda self: len(self.order) < 8)
    @rule(name=st.sampled_from(SNAP_NAMES))
    def mkdir(self, name):
        path = self.mnt.snapshot_dir(VOLUME, name)
        if name in self.snapshots:
            try:
                os.mkdir(path)
            except FileExistsError:
                return
            raise AssertionError(f"mkdir of existing snapshot {name} succeeded")
        os.mkdir(path)
        self.snapshots[name] = bytes(self.live)
        self.order.append(name)

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def rmdir(self, data):
        name = data.draw(st.sampled_from(self.order), label="snapshot")
        self._until_copied(lambda: os.rmdir(self.mnt.snapshot_dir(VOLUME, name)))
        del self.snapshots[name]
        self.order.remove(name)
        # Gone from the tree at once, merged or not.
        assert name not in os.listdir(self.mnt.snapshot_dir(VOLUME))

    @precondition(lambda self: len(self.clones) < len(CLONE_NAMES))
    @rule(data=st.data())
    def clone(self, data):
        name = next(n for n in CLONE_NAMES if n not in self.clones)
        source = data.draw(st.sampled_from([None, *self.order]), label="source snapshot")
        if source is None:
            vfsnap("clone", str(self.mnt.volume(VOLUME)), name)
            self.clones[name] = bytearray(self.live)
        else:
            vfsnap("clone", str(self.mnt.snapshot_dir(VOLUME, source)), name)
            self.clones[name] = bytearray(self.snapshots[source])

    @precondition(lambda self: self.clones)
    @rule(data=st.data())
    def write_clone(self, data):
        name = data.draw(st.sampled_from(sorted(self.clones)), label="clone")
        model = self.clones[name]
        offset = data.draw(st.integers(0, len(model) - 1), label="offset")
        payload = bytes([data.draw(st.integers(1, 255), label="byte")]) * min(40000, len(model) - offset)
        fd = os.open(self.mnt.volume(name), os.O_WRONLY)
        try:
            assert os.pwrite(fd, payload, offset) == len(payload)
        finally:
            os.close(fd)
        model[offset : offset + len(payload)] = payload

    @precondition(lambda self: self.clones)
    @rule(data=st.data())
    def delete_clone(self, data):
        name = data.draw(st.sampled_from(sorted(self.clones)), label="clone")
        os.unlink(self.mnt.volume(name))
        del self.clones[name]

    def _until_copied(self, operation):
        """A clone's copy may still hold the files an operation changes (EBUSY): wait for it."""
        try:
            return operation()
        except OSError as exc:
            if exc.errno != errno.EBUSY or not self.clones:
                raise
        self._sync()
        return operation()

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def revert(self, data):
        name = data.draw(st.sampled_from(self.order), label="snapshot")
        destroy = data.draw(st.booleans(), label="destroy newer")
        newer = self.order[self.order.index(name) + 1 :]
        args = ["revert", *(["--destroy-newer"] if destroy else []), str(self.mnt.snapshot_dir(VOLUME, name))]
        result = vfsnap(*args, check_rc=False)
        if result.returncode and "still copying" in result.stderr and self.clones:
            self._sync()
            result = vfsnap(*args, check_rc=False)
        if newer and not destroy:
            assert result.returncode == 1 and "newer snapshots exist" in result.stderr, result.stderr
            return
        assert result.returncode == 0, result.stderr
        for gone in newer:
            del self.snapshots[gone]
            self.order.remove(gone)
        self.live = bytearray(self.snapshots[name])

    @rule(extra_kib=st.sampled_from([64, 100, 512]))
    def extend(self, extra_kib):
        new_size = len(self.live) + extra_kib * 1024
        os.truncate(self.mnt.volume(VOLUME), new_size)
        self.live.extend(bytes(new_size - len(self.live)))

    @rule()
    def sync(self):
        self._sync()

    @rule()
    def remount(self):
        self.mnt.stop()
        assert not self.mnt.unexpected_errors(), self.mnt.unexpected_errors()
        self._mount()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def views_match_model(self):
        if self.mnt is None:
            return
        assert self.mnt.volume(VOLUME).read_bytes() == bytes(self.live)
        listing = set(os.listdir(self.mnt.snapshot_dir(VOLUME)))
        expected = set(self.snapshots) | ({"latest"} if self.order else set())
        assert listing == expected
        if self.order:
            assert os.readlink(self.mnt.snapshot_dir(VOLUME) / "latest") == self.order[-1]
        for name, content in self.snapshots.items():
            assert self.mnt.snapshot(VOLUME, name).read_bytes() == content, name
        assert sorted(os.listdir(self.mnt.path / "volumes")) == sorted([VOLUME, *self.clones])
        for name, model in self.clones.items():
            assert self.mnt.volume(name).read_bytes() == bytes(model), name


SnapshotMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("VFSNAP_MODEL_EXAMPLES", "12")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSnapshotModel = SnapshotMachine.TestCase
