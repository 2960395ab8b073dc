"""`vfsnap clone` and `vfsnap revert` against a real mount, QEMU as the oracle (issue 15).

A clone is readable and writable when the command returns, reads its source's files until its
background copy is done (then depends on nothing of it), and keeps those files from changing
meanwhile (EBUSY). A revert makes the live volume its snapshot's bytes at once.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import requires_fuse
from tests.qemu import check, flat_bytes, info, make_chain

pytestmark = requires_fuse
MiB = 1 << 20
SIZE = 8 * MiB


def vfsnap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfsnap", *args], capture_output=True, text=True)


def ok(*args: str) -> str:
    result = vfsnap(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(*args: str) -> str:
    """The command fails with one line on stderr (and no traceback)."""
    result = vfsnap(*args)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfsnap: "), result.stderr
    return lines[0]


def write(path: Path, model: bytearray, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
        os.fsync(f.fileno())
    model[offset : offset + len(data)] = data


def pattern(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def active_file(share: Path, volume: str) -> tuple[Path, str]:
    """The volume's top image on the share and its format (for qemu-img convert)."""
    info_path = share / f"{volume}.info"
    active = json.loads(info_path.read_text())["active"] if info_path.exists() else volume
    head = (share / active).read_bytes()[:4]
    return share / active, "qcow2" if head == b"QFI\xfb" else "raw"


def assert_view(share: Path, mnt, volume: str, model: bytes, tmp_path: Path) -> None:
    """The mounted view equals the model, and QEMU reads the same from the volume's chain."""
    assert read(mnt.volume(volume)) == bytes(model), volume
    top, fmt = active_file(share, volume)
    assert flat_bytes(top, tmp_path, fmt=fmt) == bytes(model), f"{volume}: qemu-img convert of {top.name}"


def assert_images_clean(share: Path) -> None:
    for path in share.iterdir():
        if path.name.startswith(".") or path.name.endswith((".info", ".json")):
            continue
        if path.read_bytes()[:4] == b"QFI\xfb":
            result = check(path)
            assert result["exit"] == 0, (path.name, result)
    assert ok("check", str(share)).strip().endswith("clean")


def operations(mnt) -> list[dict]:
    return json.loads(ok("status", "--json", str(mnt.path)))["operations"]


# -- clone ------------------------------------------------------------------------------------


def test_clone_of_a_snapshot_is_usable_at_once_and_independent_after_sync(share, vfsnap_mount, tmp_path):
    make_chain(share, "vol", size=SIZE, depth=0)
    mnt = vfsnap_mount()
    live = bytearray(SIZE)
    write(mnt.volume("vol"), live, 0, pattern(1, 3 * MiB))
    os.mkdir(mnt.snapshot_dir("vol", "s1"))
    at_s1 = bytes(live)
    write(mnt.volume("vol"), live, MiB, pattern(2, 2 * MiB))

    ok("clone", str(mnt.snapshot_dir("vol", "s1")), "c1")
    clone = bytearray(at_s1)
    assert read(mnt.volume("c1")) == at_s1
    write(mnt.volume("c1"), clone, 2 * MiB + 512, pattern(3, 5000))
    write(mnt.volume("vol"), live, 4096, pattern(4, 8192))
    assert_view(share, mnt, "c1", clone, tmp_path)
    assert_view(share, mnt, "vol", live, tmp_path)
    assert read(mnt.snapshot("vol", "s1")) == at_s1

    ok("sync", str(mnt.path))
    assert operations(mnt) == []
    assert info(share / "c1").get("backing-filename") is None  # depends on nothing of vol
    os.rmdir(mnt.snapshot_dir("vol", "s1"))
    ok("sync", str(mnt.path))
    os.unlink(mnt.volume("vol"))
    assert not (share / "vol").exists()
    assert_view(share, mnt, "c1", clone, tmp_path)
    mnt.stop()
    mnt = vfsnap_mount()
    assert_view(share, mnt, "c1", clone, tmp_path)
    assert_images_clean(share)


def test_clone_keeps_its_source_files_until_the_copy_is_done(share, vfsnap_mount, tmp_path):
    """While the copy runs (throttled here), rmdir of the source snapshot, unlink and rename of
    the source answer EBUSY; a remount resumes the copy; `vfsnap check` knows the clone."""
    make_chain(share, "vol", size=SIZE, depth=0)
    mnt = vfsnap_mount("clone_copy_rate=256k")
    live = bytearray(SIZE)
    write(mnt.volume("vol"), live, 0, pattern(5, SIZE))
    os.mkdir(mnt.snapshot_dir("vol", "s1"))
    at_s1 = bytes(live)
    write(mnt.volume("vol"), live, 3 * MiB, pattern(6, MiB))
    os.mkdir(mnt.snapshot_dir("vol", "s2"))
    ok("clone", str(mnt.snapshot("vol", "s1")), "c1")  # the snapshot's file names it too
    clone = bytearray(at_s1)
    ops = operations(mnt)
    assert [op["kind"] for op in ops] == ["clone"] and ops[0]["volume"] == "c1"
    with pytest.raises(OSError) as exc:
        os.rmdir(mnt.snapshot_dir("vol", "s1"))
    assert exc.value.errno == errno.EBUSY
    os.rmdir(mnt.snapshot_dir("vol", "s2"))  # merges into s1's overlay, which the clone does not read
    with pytest.raises(OSError) as exc:
        os.rename(mnt.volume("vol"), mnt.volume("renamed"))
    assert exc.value.errno == errno.EBUSY
    write(mnt.volume("c1"), clone, 7 * MiB, pattern(7, 4096))
    assert_view(share, mnt, "c1", clone, tmp_path)
    mnt.stop()

    report = vfsnap("check", str(share))
    assert report.returncode == 0, report.stdout
    assert "note: c1: unfinished clone of vol@s1" in report.stdout

    mnt = vfsnap_mount()  # no throttle: the copy resumes and finishes
    assert_view(share, mnt, "c1", clone, tmp_path)
    ok("sync", str(mnt.path))
    assert info(share / "c1").get("backing-filename") is None
    os.rmdir(mnt.snapshot_dir("vol", "s1"))
    ok("sync", str(mnt.path))
    assert_view(share, mnt, "vol", live, tmp_path)
    assert_view(share, mnt, "c1", clone, tmp_path)
    assert_images_clean(share)
