"""`vfsnap diff` against an in-memory model (issue 14): a hypothesis state machine.

It writes to the live volume through the mount (random bytes and zeros, across cluster
boundaries), takes snapshots with mkdir, deletes any of them with rmdir (the merge then runs in
the background, also while the next checks run), extends the volume, and after every step asks
`vfsnap diff --from-snap S F` for a random older snapshot S and a random later snapshot F, and for
a random snapshot and the live volume, and checks against the model:

- it covers every byte that differs: S's content, extended with zeros to F's size, with F's bytes
  copied over the listed extents, is F's content (exactly what an incremental backup does);
- `exists` false only where F reads zeros;
- it lists no more than the clusters written in between: every listed byte lies in an overlay
  cluster that a write made after S and before F touched;

and `vfsnap diff F` (no --from-snap) lists every byte of F that is not zero.

Examples: VFSNAP_DIFF_EXAMPLES (default 8, a few minutes); raise it for longer runs.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.conftest import ROOT, Mount, requires_fuse
from tests.qemu import qemu_img
from vfsnap.cli.extents import list_diff

pytestmark = requires_fuse

VOLUME = "vol"
SNAP_NAMES = [f"s{i}" for i in range(8)]
OVERLAY_CLUSTER = 64 << 10  # vfsnap's overlays (vfsnap.format.create.DEFAULT_CLUSTER_BITS)


class DiffMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="vfsnap-diff-model-")
        root = Path(self.tmp.name)
        self.share = root / "share"
        self.share.mkdir()
        self.mnt: Mount | None = None
        self.mnt_path = root / "mnt"
        self.live = bytearray()
        self.snapshots: dict[str, bytes] = {}
        self.order: list[str] = []
        self.writes: list[tuple[int, int]] = []  # every write, in order: (offset, end)
        self.taken_at: dict[str, int] = {}  # snapshot -> len(self.writes) when it was taken
        self.steps = 0

    @initialize(size_kib=st.sampled_from([1024, 2048]), base=st.sampled_from(["raw", "qcow2"]))
    def start(self, size_kib, base):
        size = size_kib * 1024
        if base == "raw":
            with open(self.share / VOLUME, "wb") as f:
                f.truncate(size)
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(self.share / VOLUME), str(size))
        self.live = bytearray(size)
        self.mnt = Mount(self.share, self.mnt_path).start()

    def teardown(self):
        try:
            if self.mnt is not None:
                self.mnt.stop()
                assert not self.mnt.unexpected_errors(), self.mnt.unexpected_errors()
        finally:
            if self.mnt is not None and self.mnt.process is not None:
                self.mnt.stop()
            self.tmp.cleanup()

    # -- rules ------------------------------------------------------------------------------

    @rule(data=st.data())
    def write(self, data):
        size = len(self.live)
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, min(150_000, size - offset)), label="length")
        byte = data.draw(st.sampled_from([0, 0, 1, 0x5A, 0xFF]), label="byte")
        payload = bytes([byte]) * length
        fd = os.open(self.mnt.volume(VOLUME), os.O_WRONLY)
        try:
            assert os.pwrite(fd, payload, offset) == length
        finally:
            os.close(fd)
        self.live[offset : offset + length] = payload
        self.writes.append((offset, offset + length))

    @precondition(lambda self: len(self.order) < 6)
    @rule(name=st.sampled_from(SNAP_NAMES))
    def mkdir(self, name):
        if name in self.snapshots:
            return
        os.mkdir(self.mnt.snapshot_dir(VOLUME, name))
        self.snapshots[name] = bytes(self.live)
        self.order.append(name)
        self.taken_at[name] = len(self.writes)

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def rmdir(self, data):
        name = data.draw(st.sampled_from(self.order), label="snapshot")
        os.rmdir(self.mnt.snapshot_dir(VOLUME, name))
        del self.snapshots[name]
        self.order.remove(name)

    @rule(extra_kib=st.sampled_from([64, 100]))
    def extend(self, extra_kib):
        new_size = len(self.live) + extra_kib * 1024
        os.truncate(self.mnt.volume(VOLUME), new_size)
        self.live.extend(bytes(new_size - len(self.live)))

    @rule()
    def sync(self):
        result = subprocess.run([sys.executable, "-m", "vfsnap", "sync", str(self.mnt_path), "--timeout", "120"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def diffs_cover_changes_and_no_more(self):
        if self.mnt is None:
            return
        self.steps += 1
        rng = random.Random(self.steps)  # deterministic, so hypothesis can replay a failure
        if len(self.order) >= 2:
            i, j = sorted(rng.sample(range(len(self.order)), 2))
            self._check(self.order[i], self.order[j])
        if self.order:
            self._check(rng.choice(self.order), None)
        self._check_all_data(None)

    def _content(self, view: str | None) -> bytes:
        return bytes(self.live) if view is None else self.snapshots[view]

    def _path(self, view: str | None) -> Path:
        return self.mnt.volume(VOLUME) if view is None else self.mnt.snapshot(VOLUME, view)

    def _check(self, since: str, view: str | None) -> None:
        extents = list_diff(str(self._path(view)), since)
        old, new = self._content(since), self._content(view)
        where = f"diff --from-snap {since} {view or 'live'}: {extents}"
        _check_sorted(extents, len(new), where)
        # An incremental backup: the old content, resized, with the listed extents copied over.
        restored = bytearray(old[: len(new)].ljust(len(new), b"\0"))
        for e in extents:
            restored[e["offset"] : e["offset"] + e["length"]] = new[e["offset"] : e["offset"] + e["length"]]
            if not e["exists"]:
                assert new[e["offset"] : e["offset"] + e["length"]].count(0) == e["length"], where
        assert restored == new, f"{where} misses changed bytes"
        # No more than the clusters written in between.
        end = self.taken_at[view] if view is not None else len(self.writes)
        allowed = set()
        for offset, stop in self.writes[self.taken_at[since] : end]:
            allowed.update(range(offset // OVERLAY_CLUSTER, (stop - 1) // OVERLAY_CLUSTER + 1))
        for e in extents:
            touched = range(e["offset"] // OVERLAY_CLUSTER, (e["offset"] + e["length"] - 1) // OVERLAY_CLUSTER + 1)
            extra = [c for c in touched if c not in allowed]
            assert not extra, f"{where} lists clusters {extra} that nothing wrote in between"

    def _check_all_data(self, view: str | None) -> None:
        extents = list_diff(str(self._path(view)), None)
        content = self._content(view)
        _check_sorted(extents, len(content), f"diff {view or 'live'}")
        restored = bytearray(len(content))
        for e in extents:
            assert e["exists"]
            restored[e["offset"] : e["offset"] + e["length"]] = content[e["offset"] : e["offset"] + e["length"]]
        assert restored == content, f"diff {view or 'live'} misses data: {extents}"


def _check_sorted(extents: list[dict], size: int, where: str) -> None:
    pos = 0
    for e in extents:
        assert e["length"] > 0 and e["offset"] >= pos, where
        pos = e["offset"] + e["length"]
    assert pos <= size, where


DiffMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("VFSNAP_DIFF_EXAMPLES", "8")),
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDiffModel = DiffMachine.TestCase
