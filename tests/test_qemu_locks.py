"""QEMU's own image locks (issue 16; vfsnap/share/qemu_locks.py), with QEMU 7.2's tools as the
other party: they refuse to write an image vfsnap writes, or to change one it reads, and vfsnap
refuses (EBUSY, a log line naming the file) an image a running QEMU holds for writing. Readers
with -U (force-share) keep working, and the locks follow the images through snapshot creation
and merges, which reopen them."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_fuse, wait_for
from tests.qemu import flat_bytes, make_chain, qemu_img
from tests.test_check import read_info

pytestmark = requires_fuse

MiB = 1 << 20
WRITE_REFUSED = 'Failed to get "write" lock'


def qemu_write(path: Path, fmt: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", fmt, "-c", "write -P 0x66 0 4k", str(path)], capture_output=True,
                          text=True)


def holds_byte(path: Path, byte: int) -> bool:
    """Whether any process holds a lock on `byte` of `path` (as QEMU tests it, F_OFD_GETLK)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return struct.unpack("hhqqi", answer)[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def chain_files(share: Path) -> list[str]:
    return sorted(n for n in os.listdir(share) if n == "vol" or (n.startswith("vol.") and n.count(".") == 1
                                                                  and n != "vol.info"))


def locked_files(share: Path) -> list[str]:
    return [name for name in chain_files(share)
            if any(holds_byte(share / name, byte) for byte in (100, 101, 102, 103, 201, 203))]


@pytest.fixture
def chain(share: Path) -> list[str]:
    """vol (raw) <- vol.s1 <- vol.s2 (active)."""
    return make_chain(share, "vol", size=4 * MiB, depth=2)


def test_qemu_tools_refuse_to_write_an_image_vfsnap_writes(share, chain, vfsnap_mount, tmp_path):
    mnt = vfsnap_mount()
    fd = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        os.pwrite(fd, b"\x11" * 65536, 0)
        os.fsync(fd)
        active = share / "vol.s2"
        for path, fmt in ((active, "qcow2"), (share / "vol.s1", "qcow2"), (share / "vol", "raw")):
            result = qemu_write(path, fmt)
            assert result.returncode != 0 and WRITE_REFUSED in result.stderr, (path, result)
        commit = qemu_img("commit", str(active), check=False)
        assert commit.returncode != 0 and WRITE_REFUSED in commit.stderr, commit.stderr
        # Readers that tolerate a writer (-U) read on, and see what vfsnap wrote.
        assert qemu_img("info", "-U", str(active)).returncode == 0
        out = tmp_path / "copy.raw"
        qemu_img("convert", "-U", "-O", "raw", str(active), str(out))
        assert out.read_bytes()[:65536] == b"\x11" * 65536
        # A reader without -U is refused the image being written, as with a running guest.
        assert qemu_img("info", str(active), check=False).returncode != 0
        assert os.pread(fd, 65536, 0) == b"\x11" * 65536  # and vfsnap is untouched
    finally:
        os.close(fd)
    # Nothing open any more: vfsnap holds no QEMU lock, and QEMU may use the images again.
    wait_for(lambda: not locked_files(share), "vfsnap to drop QEMU's locks (the kernel releases files after close)")
    assert qemu_img("info", str(share / "vol.s2")).returncode == 0


def test_backing_files_are_locked_against_changes_while_a_view_is_read(share, chain, vfsnap_mount):
    mnt = vfsnap_mount()
    with open(mnt.snapshot("vol", "s2"), "rb") as snapshot:
        snapshot.read(4096)
        for path, fmt in ((share / "vol", "raw"), (share / "vol.s1", "qcow2")):
            result = qemu_write(path, fmt)
            assert result.returncode != 0 and WRITE_REFUSED in result.stderr, (path, result)
        # Read-only QEMU use of a file vfsnap only reads is fine, with or without -U.
        assert qemu_img("info", str(share / "vol.s1")).returncode == 0
        assert qemu_img("check", str(share / "vol.s1")).returncode == 0


def test_locks_follow_the_images_through_snapshots_and_merges(share, chain, vfsnap_mount):
    """mkdir makes a new active overlay, rmdir merges one overlay into its backing and rebases
    (both reopen images): under a writer, every file of the chain stays locked, the new active
    image for writing; afterwards nothing is left locked."""
    mnt = vfsnap_mount()
    fd = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        os.mkdir(mnt.snapshot_dir("vol", "s3"))
        active = read_info(share, "vol")["active"]
        assert active not in ("vol.s2",)
        os.pwrite(fd, b"\x22" * 4096, 0)
        os.rmdir(mnt.snapshot_dir("vol", "s1"))
        subprocess.run([sys.executable, "-m", "vfsnap", "sync", str(mnt.path), "--timeout", "60"], check=True,
                       cwd=Path(__file__).resolve().parent.parent)
        assert read_info(share, "vol")["active"] == active
        files = chain_files(share)
        assert "vol.s1" not in files and active in files
        for name in files:
            result = qemu_write(share / name, "raw" if name == "vol" else "qcow2")
            assert result.returncode != 0 and WRITE_REFUSED in result.stderr, (name, result)
        assert holds_byte(share / active, 101)  # vfsnap writes the new active image
        assert not holds_byte(share / "vol.s2", 101)  # and no longer the old one: it only reads it
    finally:
        os.close(fd)
    wait_for(lambda: not locked_files(share), "vfsnap to drop QEMU's locks (the kernel releases files after close)")


def test_vfsnap_refuses_an_image_qemu_io_holds_for_writing(share, chain, vfsnap_mount, tmp_path):
    mnt = vfsnap_mount()
    qemu = subprocess.Popen(["qemu-io", "-f", "qcow2", str(share / "vol.s2")], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: holds_byte(share / "vol.s2", 101), "qemu-io to hold vol.s2 for writing", 20)
        with pytest.raises(OSError) as refused:
            os.open(mnt.volume("vol"), os.O_RDWR)
        assert refused.value.errno == errno.EBUSY
        with pytest.raises(OSError) as refused:
            os.mkdir(mnt.snapshot_dir("vol", "now"))  # a chain change would write the image too
        assert refused.value.errno == errno.EBUSY
        assert "vol.s2 is in use by another program" in mnt.log()
        assert read_info(share, "vol")["active"] == "vol.s2"
    finally:
        qemu.communicate(b"quit\n", timeout=30)
    # QEMU gone: vfsnap writes again.
    fd = os.open(mnt.volume("vol"), os.O_RDWR)
    try:
        os.pwrite(fd, b"\x33" * 4096, 0)
    finally:
        os.close(fd)
    assert mnt.volume("vol").read_bytes()[:4096] == b"\x33" * 4096


def test_vfsnap_refuses_an_image_a_storage_daemon_exports_for_writing(share, chain, vfsnap_mount, tmp_path):
    mnt = vfsnap_mount()
    socket = tmp_path / "nbd.sock"
    daemon = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,node-name=file0,filename={share / 'vol.s2'}",
         "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
         "--nbd-server", f"addr.type=unix,addr.path={socket}",
         "--export", "type=nbd,id=export0,node-name=disk0,writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: holds_byte(share / "vol.s2", 101) or daemon.poll() is not None,
                 "qemu-storage-daemon to hold vol.s2 for writing", 20)
        assert daemon.poll() is None, daemon.stderr.read()
        with pytest.raises(OSError) as refused:
            os.open(mnt.volume("vol"), os.O_WRONLY)
        assert refused.value.errno == errno.EBUSY
    finally:
        daemon.terminate()
        daemon.wait(30)
    with open(mnt.volume("vol"), "r+b") as volume:
        volume.write(b"\x44" * 4096)
    assert flat_bytes(share / "vol.s2", tmp_path)[:4096] == b"\x44" * 4096
