"""contrib/vfsnap-backup and `vfsnap diff` errors (issue 14): full and incremental backups of
snapshots through a real mount, byte-identical after every round, reading only what changed."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time

from tests.conftest import ROOT, requires_fuse
from tests.qemu import make_chain, qemu_io

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20
SCRIPT = ROOT / "contrib" / "vfsnap-backup"
ENV = {**os.environ, "VFSNAP": f"{sys.executable} -m vfsnap"}


def backup(source, target, *extra: str) -> tuple[str, int]:
    """Run the script; returns (kind of backup, bytes it read)."""
    result = subprocess.run([sys.executable, str(SCRIPT), *extra, str(source), str(target)],
                            capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert result.returncode == 0, result.stderr
    match = re.search(r": ([^:]+): (\d+) bytes read of (\d+)", result.stderr)
    assert match, result.stderr
    return match.group(1), int(match.group(2))


def vfsnap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfsnap", *args], capture_output=True, text=True, cwd=ROOT)


def write_some(path, rng: random.Random, model: bytearray) -> int:
    """Random writes (data and zeros, across 64 KiB clusters); returns the clusters they touch."""
    touched = set()
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(rng.randrange(2, 6)):
            length = rng.choice([1, 4 * KiB, 70 * KiB, 300 * KiB])
            offset = rng.randrange(0, len(model) - length)
            payload = bytes(length) if rng.random() < 0.3 else rng.randbytes(length)
            assert os.pwrite(fd, payload, offset) == length
            model[offset : offset + length] = payload
            touched.update(range(offset // (64 * KiB), (offset + length - 1) // (64 * KiB) + 1))
    finally:
        os.close(fd)
    return len(touched)


def test_backup_round_trip_over_five_snapshots_with_deletions_in_between(share, vfsnap_mount, tmp_path):
    size = 16 * MiB
    make_chain(share, "vol", size=size, depth=0,
               writes=lambda level, path, fmt: qemu_io(path, "write -P 3 1M 3M", f"write -P 4 {9 * MiB} 64k", fmt=fmt))
    mnt = vfsnap_mount()
    rng = random.Random(14)
    model = bytearray(mnt.volume("vol").read_bytes())
    target = tmp_path / "backup" / "vol.raw"
    target.parent.mkdir()
    previous = None
    for round_ in range(1, 6):
        written = write_some(mnt.volume("vol"), rng, model)
        os.mkdir(mnt.snapshot_dir("vol", f"mid{round_}"))  # deleted before the next backup: merged
        written += write_some(mnt.volume("vol"), rng, model)
        if round_ == 3:
            os.truncate(mnt.volume("vol"), len(model) + MiB)  # the volume grows between backups
            model.extend(bytes(MiB))
            written += write_some(mnt.volume("vol"), rng, model)
        snap = f"night{round_}"
        os.mkdir(mnt.snapshot_dir("vol", snap))
        os.rmdir(mnt.snapshot_dir("vol", f"mid{round_}"))  # its merge may still run during the backup
        kind, read = backup(mnt.snapshot("vol", snap), target)
        content = target.read_bytes()
        assert content == bytes(model), f"round {round_}: the backup differs from the model"
        assert content == mnt.snapshot("vol", snap).read_bytes(), f"round {round_}: differs from the snapshot"
        if previous is None:
            assert kind == "full"
            assert read <= 3 * MiB + 64 * KiB + written * 64 * KiB, f"the full backup read {read} bytes"
            assert os.stat(target).st_blocks * 512 < size // 2, "the full backup is not sparse"
        else:
            assert kind == f"incremental since {previous}"
            assert read <= written * 64 * KiB, f"round {round_}: read {read} bytes for {written} clusters written"
            os.rmdir(mnt.snapshot_dir("vol", previous))  # nightly rotation: the old one goes after the backup
        state = json.loads((tmp_path / "backup" / "vol.raw.vfsnap-backup").read_text())
        assert state == {"volume": "vol", "snapshot": snap}
        previous = snap
    # Run again on the same snapshot: nothing to do; --full: the same bytes again.
    assert backup(mnt.snapshot("vol", previous), target)[0] == "nothing to do"
    backup(mnt.snapshot("vol", previous), target, "--full")
    assert target.read_bytes() == bytes(model)


def test_backup_refuses_a_live_volume_and_another_volumes_target(share, vfsnap_mount, tmp_path):
    make_chain(share, "vol", size=MiB, depth=0)
    make_chain(share, "other", size=MiB, depth=0)
    mnt = vfsnap_mount()
    os.mkdir(mnt.snapshot_dir("vol", "a"))
    os.mkdir(mnt.snapshot_dir("other", "a"))
    target = tmp_path / "vol.raw"
    for args in ([str(mnt.volume("vol")), str(target)],):
        result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=ENV)
        assert result.returncode == 1 and "not a snapshot file" in result.stderr
    backup(mnt.snapshot("vol", "a"), target)
    result = subprocess.run([sys.executable, str(SCRIPT), str(mnt.snapshot("other", "a")), str(target)],
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == 1 and "holds a backup of volume vol, not other" in result.stderr


def test_diff_rejects_unknown_newer_and_foreign_snapshots_with_one_line(share, vfsnap_mount):
    make_chain(share, "vol", size=MiB, depth=0)
    make_chain(share, "other", size=MiB, depth=0)
    mnt = vfsnap_mount()
    for snap in ("a", "b"):
        os.mkdir(mnt.snapshot_dir("vol", snap))
    os.mkdir(mnt.snapshot_dir("other", "c"))
    cases = [
        (["--from-snap", "nope", str(mnt.volume("vol"))], "volume vol has no snapshot nope"),
        (["--from-snap", "c", str(mnt.volume("vol"))], "volume vol has no snapshot c"),
        (["--from-snap", str(mnt.snapshot_dir("other", "c")), str(mnt.volume("vol"))],
         "snapshot c is a snapshot of volume other, not of vol"),
        (["--from-snap", "b", str(mnt.snapshot("vol", "a"))], "snapshot b of vol is not older than snapshot a"),
        (["--from-snap", "a", str(mnt.snapshot("vol", "a"))], "snapshot a of vol is not older than snapshot a"),
    ]
    for args, message in cases:
        result = vfsnap("diff", *args)
        assert result.returncode == 1, (args, result.stdout)
        assert result.stderr.strip() == f"vfsnap: {message}", (args, result.stderr)
        assert result.stdout == ""
    # The good ones, by name and by path (`latest` too).
    for since in ("a", str(mnt.snapshot_dir("vol", "a")), str(mnt.snapshot("vol", "a"))):
        result = vfsnap("diff", "--from-snap", since, "--output=json", str(mnt.snapshot_dir("vol", "latest") / "vol"))
        assert result.returncode == 0 and json.loads(result.stdout) == [], result.stderr


def test_diff_json_is_rbd_diff_form_and_human_is_a_table(share, vfsnap_mount):
    make_chain(share, "vol", size=MiB, depth=0)
    mnt = vfsnap_mount()
    os.mkdir(mnt.snapshot_dir("vol", "a"))
    with open(mnt.volume("vol"), "r+b") as f:
        f.seek(70 * KiB)
        f.write(b"changed")
    result = vfsnap("diff", "--from-snap", "a", "--output=json", str(mnt.volume("vol")))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{"offset": 64 * KiB, "length": 64 * KiB, "exists": "true"}]
    table = vfsnap("diff", "--from-snap", "a", str(mnt.volume("vol"))).stdout.splitlines()
    assert table[0].split() == ["Offset", "Length", "Type"] and table[1].split() == [str(64 * KiB), str(64 * KiB), "data"]


def test_diff_marks_zeroed_and_discarded_ranges_as_not_existing(share, vfsnap_mount):
    """Zero clusters and discards in the overlays above the snapshot now read as zeros without
    data: `exists` "false"; written ones "true"; nothing else listed, also with merges in between."""
    def writes(level, path, fmt):
        if level == 0:
            qemu_io(path, "write -P 1 0 1M", fmt=fmt)
        elif level == 2:
            qemu_io(path, "write -z 0 64k", "write -P 2 128k 4k", "discard 256k 64k")

    make_chain(share, "vol", size=MiB, depth=2, writes=writes)
    mnt = vfsnap_mount()
    with open(mnt.volume("vol"), "r+b") as f:
        f.seek(512 * KiB)
        f.write(b"live")
    expected = [{"offset": 0, "length": 64 * KiB, "exists": "false"},
                {"offset": 128 * KiB, "length": 64 * KiB, "exists": "true"},
                {"offset": 256 * KiB, "length": 64 * KiB, "exists": "false"},
                {"offset": 512 * KiB, "length": 64 * KiB, "exists": "true"}]
    result = vfsnap("diff", "--from-snap", "s1", "--output=json", str(mnt.volume("vol")))
    assert result.returncode == 0 and json.loads(result.stdout) == expected, result.stdout + result.stderr
    os.rmdir(mnt.snapshot_dir("vol", "s2"))  # merged into vol.s1: still above s1's boundary
    for _ in range(2):  # while the merge may run, and after it
        result = vfsnap("diff", "--from-snap", "s1", "--output=json", str(mnt.volume("vol")))
        assert result.returncode == 0 and json.loads(result.stdout) == expected, result.stdout + result.stderr
        assert vfsnap("sync", str(mnt.path)).returncode == 0


def test_diff_of_a_live_volume_being_written_includes_every_acknowledged_write(share, vfsnap_mount):
    """A writer thread keeps writing 4 KiB blocks (no fsync); every diff since snapshot `a`
    covers each write acknowledged before the diff started, and lists only clusters some started
    write touched."""
    import threading

    from vfsnap.cli.extents import list_diff

    size = 8 * MiB
    make_chain(share, "vol", size=size, depth=0)
    mnt = vfsnap_mount()
    os.mkdir(mnt.snapshot_dir("vol", "a"))
    started: list[tuple[int, int]] = []  # appended before each pwrite
    acknowledged: list[tuple[int, int]] = []  # appended after it returned
    stop = threading.Event()

    def writer():
        rng = random.Random(5)
        fd = os.open(mnt.volume("vol"), os.O_WRONLY)
        try:
            while not stop.is_set():
                offset = rng.randrange(0, size - 4096)
                started.append((offset, offset + 4096))
                os.pwrite(fd, b"w" * 4096, offset)
                acknowledged.append((offset, offset + 4096))
        finally:
            os.close(fd)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(30):
            time.sleep(0.02)  # let the writer go on between diffs
            before = list(acknowledged)
            extents = list_diff(str(mnt.volume("vol")), "a")
            allowed = {c for s, e in list(started) for c in range(s // (64 * KiB), (e - 1) // (64 * KiB) + 1)}
            covered = [(x["offset"], x["offset"] + x["length"]) for x in extents]
            for s, e in before:
                assert any(cs <= s and e <= ce for cs, ce in covered), f"write [{s}, {e}) missing from {covered}"
            for cs, ce in covered:
                assert all(c in allowed for c in range(cs // (64 * KiB), (ce - 1) // (64 * KiB) + 1))
    finally:
        stop.set()
        thread.join()
    assert len(acknowledged) > 20
