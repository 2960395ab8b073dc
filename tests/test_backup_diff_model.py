"""`vfsnap diff` against an in-memory model (issue 14): a hypothesis state machine.

It runs the snapshot model's machine (tests/test_snapshots_model.py: mkdir, rmdir of any
snapshot with its merge running in the background also while the next checks run, extends,
syncs, remounts, every view compared with the model after every step), with writes of random
bytes and of zeros that cross cluster boundaries, and after every step asks
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
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant, precondition, rule

from tests.conftest import requires_fuse
from tests.test_snapshots_model import SNAP_NAMES, VOLUME, SnapshotMachine
from vfsnap.cli.extents import list_diff

pytestmark = requires_fuse

OVERLAY_CLUSTER = 64 << 10  # vfsnap's overlays (vfsnap.format.create.DEFAULT_CLUSTER_BITS)


class DiffMachine(SnapshotMachine):
    """The snapshot model's machine (its rules, its check of every view after every step, its
    remounts and final `qemu-img check`), with writes of zeros and longer writes, a log of the
    writes, and the diff checks."""

    def __init__(self):
        super().__init__()
        self.writes: list[tuple[int, int]] = []  # every write, in order: (offset, end)
        self.taken_at: dict[str, int] = {}  # snapshot -> len(self.writes) when it was taken
        self.steps = 0

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

    @precondition(lambda self: len(self.order) < 8)
    @rule(name=st.sampled_from(SNAP_NAMES))
    def mkdir(self, name):
        new = name not in self.snapshots
        super().mkdir(name)
        if new:
            self.taken_at[name] = len(self.writes)

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
