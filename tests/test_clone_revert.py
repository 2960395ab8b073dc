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

from tests.conftest import requires_fuse, wait_for
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


@pytest.mark.parametrize("share_io", ["inline", "threads"])
def test_clone_of_the_live_volume_under_a_writer_and_a_clone_of_that_clone(share, vfsnap_mount, tmp_path, share_io):
    """The point in time is taken as mkdir takes a snapshot, the writer keeps its file open and
    goes on writing; the hidden point in time is never listed and goes once the copy is done.
    `share_io=threads`: the writes and the clone's copy run on the share's threads (as on a
    network share)."""
    make_chain(share, "vol", size=SIZE, depth=0)
    mnt = vfsnap_mount(f"clone_copy_rate=1m,share_io={share_io}")
    live = bytearray(SIZE)
    with open(mnt.volume("vol"), "r+b") as writer:
        for i in range(4):
            writer.seek(i * 2 * MiB)
            data = pattern(10 + i, 300 * 1024)
            writer.write(data)
            live[i * 2 * MiB : i * 2 * MiB + len(data)] = data
        writer.flush()
        os.fsync(writer.fileno())
        ok("clone", str(mnt.volume("vol")), str(mnt.volume("c1")))
        clone = bytearray(live)
        writer.seek(MiB)
        data = pattern(20, 70000)
        writer.write(data)
        writer.flush()
        os.fsync(writer.fileno())
        live[MiB : MiB + len(data)] = data
        assert os.listdir(mnt.snapshot_dir("vol")) == []  # the point in time is hidden
        assert read(mnt.volume("c1")) == bytes(clone)
        # A clone of the clone, live, while the first copy still runs (it reads through both).
        ok("clone", str(mnt.volume("c1")), "c2")
        second = bytearray(clone)
        write(mnt.volume("c2"), second, 5 * MiB, pattern(21, 9000))
        write(mnt.volume("c1"), clone, 5 * MiB, pattern(22, 3000))
        os.mkdir(mnt.snapshot_dir("c1", "t1"))
        at_t1 = bytes(clone)
        write(mnt.volume("c1"), clone, 0, pattern(23, 4096))
        assert read(mnt.snapshot("c1", "t1")) == at_t1
        with pytest.raises(OSError) as exc:
            os.unlink(mnt.volume("c1"))  # c2 reads from it (and c1 has a snapshot)
        assert exc.value.errno == errno.EBUSY
        assert read(mnt.volume("vol")) == bytes(live)
        assert read(mnt.volume("c2")) == bytes(second)
    mnt.stop()
    mnt = vfsnap_mount(f"share_io={share_io}")
    for name, model in (("vol", live), ("c1", clone), ("c2", second)):
        assert read(mnt.volume(name)) == bytes(model), name
    ok("sync", str(mnt.path))
    assert operations(mnt) == []
    # Nothing ties them any more: the sources go, the clones stay.
    assert json.loads((share / "vol.info").read_text()) == {"active": "vol"} if (share / "vol.info").exists() else True
    os.rmdir(mnt.snapshot_dir("c1", "t1"))
    ok("sync", str(mnt.path))
    os.unlink(mnt.volume("vol"))
    os.unlink(mnt.volume("c1"))
    assert sorted(os.listdir(mnt.path / "volumes")) == ["c2"]
    assert sorted(os.listdir(share)) == ["c2", "c2.vfsnap.json"]
    assert_view(share, mnt, "c2", second, tmp_path)
    mnt.stop()
    mnt = vfsnap_mount()
    assert_view(share, mnt, "c2", second, tmp_path)
    assert_images_clean(share)


@pytest.mark.allow_daemon_errors
def test_clone_errors_change_nothing(share, vfsnap_mount, tmp_path):
    make_chain(share, "vol", size=SIZE, depth=0)
    make_chain(share, "other", size=MiB, depth=0)
    mnt = vfsnap_mount()
    os.mkdir(mnt.snapshot_dir("vol", "s1"))
    before = {p.name: p.read_bytes() for p in share.iterdir()}
    cases = [
        ((str(mnt.snapshot_dir("vol", "nope")), "c"), "no such volume or snapshot"),
        ((str(mnt.volume("nope")), "c"), "no such volume or snapshot"),
        ((str(mnt.snapshot_dir("vol", "s1")), "other"), "exists"),
        ((str(mnt.snapshot_dir("vol", "s1")), ".hidden"), "not a valid volume name"),
        ((str(mnt.snapshot_dir("vol", "s1")), "bad name"), "not a valid volume name"),
        ((str(mnt.snapshot_dir("vol", "s1")), "x" * 250), "too long"),
        ((str(mnt.snapshot_dir("vol", "s1")), "vol.s1"), "exists"),  # the snapshot's overlay
        ((str(mnt.snapshot_dir("vol", "s1")), "vol.later"), "collide"),  # a future overlay
        ((str(mnt.snapshot_dir("vol", "s1")), "c.info"), "not a valid volume name"),
        ((str(tmp_path), "c"), "not in a vfsnap mount"),
        ((str(mnt.snapshot_dir("vol")), "c"), "not a snapshot"),
    ]
    for args, words in cases:
        line = refused("clone", *args)
        assert words in line, (args, line)
    assert {p.name: p.read_bytes() for p in share.iterdir()} == before
    # The mount refuses on its own too (a request that skips the command's checks).
    request = {"source": "vol", "snapshot": "s1", "name": "vol.s1"}
    with pytest.raises(OSError) as exc:
        os.setxattr(mnt.path / "volumes", "user.vfsnap.clone", json.dumps(request).encode())
    assert exc.value.errno == errno.EEXIST
    for bad in (b"{", b"[]", json.dumps({"source": "vol"}).encode()):
        with pytest.raises(OSError) as exc:
            os.setxattr(mnt.path / "volumes", "user.vfsnap.clone", bad)
        assert exc.value.errno == errno.EINVAL
    request = {"source": "vol", "snapshot": "zz", "name": "c"}
    with pytest.raises(OSError) as exc:
        os.setxattr(mnt.path / "volumes", "user.vfsnap.clone", json.dumps(request).encode())
    assert exc.value.errno == errno.ENOENT
    assert {p.name: p.read_bytes() for p in share.iterdir()} == before


# -- revert -----------------------------------------------------------------------------------


def test_revert_to_the_newest_snapshot_is_what_a_cached_reader_sees(share, vfsnap_mount, tmp_path):
    make_chain(share, "vol", size=SIZE, depth=0)
    mnt = vfsnap_mount()
    live = bytearray(SIZE)
    write(mnt.volume("vol"), live, 0, pattern(30, 2 * MiB))
    os.mkdir(mnt.snapshot_dir("vol", "s1"))
    at_s1 = bytes(live)
    with open(mnt.volume("vol"), "rb") as reader:  # buffered: the kernel caches its pages
        write(mnt.volume("vol"), live, 4096, pattern(31, 3 * MiB))
        assert reader.read() == bytes(live)  # now in the page cache
        # The request the command sends, right away: within the attribute timeout the kernel
        # would serve its cached pages unless the mount drops them.
        os.setxattr(mnt.snapshot_dir("vol"), "user.vfsnap.revert",
                    json.dumps({"snapshot": "s1", "destroy_newer": False}).encode())
        # Reads inside the cached size (a read past it would make the kernel fetch attributes
        # and drop the pages on its own, the mtime having changed).
        for offset in (0, 4096, MiB, 3 * MiB):
            assert os.pread(reader.fileno(), 65536, offset) == at_s1[offset : offset + 65536], offset
        reader.seek(0)
        assert reader.read() == at_s1
    assert sorted(os.listdir(mnt.snapshot_dir("vol"))) == ["latest", "s1"]
    assert read(mnt.snapshot("vol", "s1")) == at_s1
    assert json.loads((share / "vol.info").read_text()) == {"active": "vol.s1", "s1": "vol.s1"}
    live = bytearray(at_s1)
    assert_view(share, mnt, "vol", live, tmp_path)
    write(mnt.volume("vol"), live, 6 * MiB, pattern(32, 100000))  # and it is writable as before
    ok("revert", str(mnt.snapshot("vol", "s1")))  # the snapshot's file names it too
    assert read(mnt.volume("vol")) == at_s1
    mnt.stop()
    mnt = vfsnap_mount()
    assert_view(share, mnt, "vol", bytearray(at_s1), tmp_path)
    assert_images_clean(share)


def test_revert_past_newer_snapshots(share, vfsnap_mount, tmp_path):
    make_chain(share, "vol", size=SIZE, depth=0)
    mnt = vfsnap_mount()
    live = bytearray(SIZE)
    contents = {}
    for i, snap in enumerate(("s1", "s2", "s3")):
        write(mnt.volume("vol"), live, i * MiB + 512, pattern(40 + i, MiB + 4096))
        os.mkdir(mnt.snapshot_dir("vol", snap))
        contents[snap] = bytes(live)
    write(mnt.volume("vol"), live, 5 * MiB, pattern(49, 8192))
    files_before = sorted(os.listdir(share))
    line = refused("revert", str(mnt.snapshot_dir("vol", "s1")))
    assert "newer snapshots exist (s2 s3)" in line and "--destroy-newer" in line
    assert sorted(os.listdir(share)) == files_before
    assert read(mnt.volume("vol")) == bytes(live)
    ok("revert", "--destroy-newer", str(mnt.snapshot_dir("vol", "s2")))
    assert sorted(os.listdir(mnt.snapshot_dir("vol"))) == ["latest", "s1", "s2"]
    assert os.readlink(mnt.snapshot_dir("vol", "latest")) == "s2"
    assert read(mnt.volume("vol")) == contents["s2"]
    for snap in ("s1", "s2"):
        assert read(mnt.snapshot("vol", snap)) == contents[snap]
    assert not (share / "vol.s3").exists()
    assert json.loads((share / "vol.info").read_text()) == {"active": "vol.s2", "s1": "vol.s1", "s2": "vol.s2"}
    assert_view(share, mnt, "vol", bytearray(contents["s2"]), tmp_path)
    # A snapshot being deleted (hidden, merge pending) above the target goes with the revert.
    os.mkdir(mnt.snapshot_dir("vol", "s4"))
    os.rmdir(mnt.snapshot_dir("vol", "s4"))
    ok("revert", str(mnt.snapshot_dir("vol", "s2")))
    ok("sync", str(mnt.path))
    assert read(mnt.volume("vol")) == contents["s2"]
    os.mkdir(mnt.snapshot_dir("vol", "s5"))
    ok("revert", "--destroy-newer", str(mnt.snapshot_dir("vol", "s1")))
    assert sorted(os.listdir(mnt.snapshot_dir("vol"))) == ["latest", "s1"]
    assert sorted(os.listdir(share)) == ["vol", "vol.info", "vol.s1", "vol.vfsnap.json"]
    assert_view(share, mnt, "vol", bytearray(contents["s1"]), tmp_path)
    assert_images_clean(share)


@pytest.mark.allow_daemon_errors
def test_revert_is_refused_while_the_volume_is_open_for_writing(share, vfsnap_mount, tmp_path):
    make_chain(share, "vol", size=SIZE, depth=0)
    mnt = vfsnap_mount()
    live = bytearray(SIZE)
    os.mkdir(mnt.snapshot_dir("vol", "s1"))
    write(mnt.volume("vol"), live, 0, pattern(50, MiB))
    files_before = {p.name: p.read_bytes() for p in share.iterdir()}
    with open(mnt.volume("vol"), "r+b"):
        line = refused("revert", str(mnt.snapshot_dir("vol", "s1")))
        assert "open for writing" in line
        with pytest.raises(OSError) as exc:  # the mount refuses on its own
            os.setxattr(mnt.snapshot_dir("vol"), "user.vfsnap.revert",
                        json.dumps({"snapshot": "s1", "destroy_newer": False}).encode())
        assert exc.value.errno == errno.EBUSY
    assert {p.name: p.read_bytes() for p in share.iterdir()} == files_before
    assert "no such snapshot" in refused("revert", str(mnt.snapshot_dir("vol", "nope")))
    assert "not a snapshot" in refused("revert", str(mnt.volume("vol")))
    with open(mnt.snapshot("vol", "s1"), "rb"):  # a reader of the snapshot is no writer
        ok("revert", str(mnt.snapshot_dir("vol", "s1")))
    assert read(mnt.volume("vol")) == bytes(SIZE)
    assert_images_clean(share)


def test_check_repair_finishes_an_unfinished_clone_of_the_live_volume(share, vfsnap_mount, tmp_path):
    make_chain(share, "vol", size=SIZE, depth=0)
    mnt = vfsnap_mount("clone_copy_rate=64k")
    live = bytearray(SIZE)
    write(mnt.volume("vol"), live, MiB, pattern(60, 3 * MiB))
    ok("clone", str(mnt.volume("vol")), "c1")
    clone = bytearray(live)
    write(mnt.volume("vol"), live, 2 * MiB, pattern(61, 4096))
    write(mnt.volume("c1"), clone, 0, pattern(62, 4096))
    mnt.stop()
    hidden = [k for k in json.loads((share / "vol.info").read_text()) if k.startswith("clone-")]
    assert len(hidden) == 1  # the point in time, on the share until the copy is done
    report = vfsnap("check", str(share))
    assert report.returncode == 0 and "unfinished clone of vol@" in report.stdout, report.stdout
    assert "kept until its copy is done" in report.stdout
    report = vfsnap("check", "--repair", str(share))
    assert report.returncode == 0, report.stdout
    assert "repaired: c1: finished copying" in report.stdout
    assert json.loads((share / "vol.info").read_text()) == {"active": "vol"}
    assert info(share / "c1").get("backing-filename") is None
    assert sorted(os.listdir(share)) == ["c1", "c1.vfsnap.json", "vol", "vol.info", "vol.vfsnap.json"]
    report = vfsnap("check", str(share))
    assert report.returncode == 0 and "note:" not in report.stdout, report.stdout
    mnt = vfsnap_mount()
    assert_view(share, mnt, "vol", live, tmp_path)
    assert_view(share, mnt, "c1", clone, tmp_path)
    assert_images_clean(share)


def test_removing_a_clone_mid_copy_releases_its_source(share, vfsnap_mount, tmp_path):
    make_chain(share, "vol", size=SIZE, depth=0)
    mnt = vfsnap_mount("clone_copy_rate=256k")
    live = bytearray(SIZE)
    write(mnt.volume("vol"), live, 0, pattern(70, SIZE))
    os.mkdir(mnt.snapshot_dir("vol", "s1"))
    ok("clone", str(mnt.snapshot_dir("vol", "s1")), "c1")
    ok("clone", str(mnt.volume("vol")), "c2")
    assert {op["kind"] for op in operations(mnt)} == {"clone", "clone-point"}
    with pytest.raises(OSError) as exc:
        os.rmdir(mnt.snapshot_dir("vol", "s1"))
    assert exc.value.errno == errno.EBUSY
    os.unlink(mnt.volume("c1"))
    os.unlink(mnt.volume("c2"))
    ok("sync", str(mnt.path))  # the hidden point in time of c2 is merged away
    assert operations(mnt) == []
    os.rmdir(mnt.snapshot_dir("vol", "s1"))
    ok("sync", str(mnt.path))
    assert sorted(os.listdir(share)) == ["vol", "vol.info", "vol.vfsnap.json"]
    assert_view(share, mnt, "vol", live, tmp_path)
    assert_images_clean(share)


@pytest.mark.allow_daemon_errors
def test_revert_is_refused_while_another_host_writes_the_volume(share, vfsnap_mount, tmp_path):
    """Two mounts of one share (two hosts): the share's writer lock refuses the revert."""
    make_chain(share, "vol", size=SIZE, depth=0)
    host_a = vfsnap_mount(path=tmp_path / "host-a")
    host_b = vfsnap_mount(path=tmp_path / "host-b")
    os.mkdir(host_a.snapshot_dir("vol", "s1"))
    deadline = time.monotonic() + 10
    while not os.path.exists(host_b.snapshot_dir("vol", "s1")):  # B rereads `.info` soon
        assert time.monotonic() < deadline, "host B never saw the snapshot"
        time.sleep(0.1)
    live = bytearray(SIZE)
    with open(host_a.volume("vol"), "r+b") as writer:
        writer.write(pattern(80, 4096))
        writer.flush()
        os.fsync(writer.fileno())
        live[:4096] = pattern(80, 4096)
        line = refused("revert", str(host_b.snapshot_dir("vol", "s1")))
        assert "open for writing" in line
        assert read(host_b.snapshot("vol", "s1")) == bytes(SIZE)
    # close() returns before host A's daemon has the release (the kernel sends FUSE_RELEASE
    # asynchronously), so A gives up its writer lock a moment later: the revert goes through once
    # it has, refused only as the one line above until then.
    wait_for(lambda: vfsnap("revert", str(host_b.snapshot_dir("vol", "s1"))).returncode == 0,
             "the revert, once host A has released the volume", timeout=30)
    assert read(host_b.volume("vol")) == bytes(SIZE)
    time.sleep(1.1)  # host A's cached `.info` and attributes expire (INFO_RECHECK_SECONDS, ATTR_TIMEOUT)
    assert read(host_a.volume("vol")) == bytes(SIZE)
