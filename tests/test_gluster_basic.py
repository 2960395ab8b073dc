"""vfsnap over a GlusterFS volume: two hosts (two vfsnap mounts, each mounting the glusterfs client
itself under its own mount base) serve the same Cinder volumes, byte for byte what QEMU reads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import requires_fuse
from tests.qemu import flat_bytes, make_chain, qemu_io
from tests.test_mount_helper import MountCall, helpers_installed  # noqa: F401 (fixture)
from vfsnap.share.remote import mount_point_for, mounted_source

pytestmark = [requires_fuse, pytest.mark.gluster]


def _fill(level, path, fmt):
    qemu_io(path, f"write -P {0x21 + level} {level * 192}k 320k", fmt=fmt)


@pytest.fixture
def host_bases(tmp_path: Path):
    """Mount bases of two "hosts"; the glusterfs mounts vfsnap leaves there are unmounted at teardown
    (requested before `vfsnap_mount`, so it is torn down after the vfsnap mounts are stopped)."""
    bases = [tmp_path / "host-a" / "mnt-base", tmp_path / "host-b" / "mnt-base"]
    yield bases
    with open("/proc/mounts") as mounts:
        targets = [line.split()[1] for line in mounts]
    ours = [target for target in targets if any(target.startswith(str(base) + os.sep) for base in bases)]
    for target in reversed(ours):
        if subprocess.run(["umount", target], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)


def _mount_hosts(vfsnap_mount, gluster_volume, host_bases, tmp_path, extra: str = ""):
    return [
        vfsnap_mount(f"share_type=glusterfs,mount_base={base}{extra}", path=tmp_path / f"vfsnap-{i}",
                     spec=gluster_volume.spec)
        for i, base in enumerate(host_bases)
    ]


def test_two_hosts_serve_identical_bytes_equal_to_qemu_convert(gluster_volume, gluster_client, host_bases,
                                                               vfsnap_mount, tmp_path):
    names = make_chain(gluster_client, "vol", size=2 << 20, depth=2, base_fmt="qcow2", writes=_fill)
    hosts = _mount_hosts(vfsnap_mount, gluster_volume, host_bases, tmp_path)
    for base in host_bases:
        # Each host mounted the volume itself, where Cinder would: md5 of the share under the base.
        share_dir = mount_point_for(gluster_volume.spec, str(base))
        assert mounted_source(share_dir) == gluster_volume.spec
    expected = {
        "live": flat_bytes(gluster_client / names[2], tmp_path),
        "s1": flat_bytes(gluster_client / names[0], tmp_path),
        "s2": flat_bytes(gluster_client / names[1], tmp_path),
    }
    for mnt in hosts:
        assert os.listdir(mnt.path / "volumes") == ["vol"]
        assert mnt.volume("vol").read_bytes() == expected["live"]
        assert mnt.snapshot("vol", "s1").read_bytes() == expected["s1"]
        assert mnt.snapshot("vol", "s2").read_bytes() == expected["s2"]


def test_volume_created_after_mounting_appears_on_both_hosts(gluster_volume, gluster_client, host_bases,
                                                             vfsnap_mount, tmp_path):
    hosts = _mount_hosts(vfsnap_mount, gluster_volume, host_bases, tmp_path)
    for mnt in hosts:
        assert os.listdir(mnt.path / "volumes") == []
    make_chain(gluster_client, "late", size=1 << 20, depth=0, base_fmt="raw", writes=_fill)
    expected = (gluster_client / "late").read_bytes()
    for mnt in hosts:
        assert os.listdir(mnt.path / "volumes") == ["late"]
        assert mnt.volume("late").read_bytes() == expected


def test_shares_file_line_options_reach_the_glusterfs_mount_and_a_mount_is_reused(
        gluster_volume, gluster_client, host_bases, vfsnap_mount, tmp_path):
    (gluster_client / "vol").write_bytes(b"\x5a" * 65536)
    shares = tmp_path / "glusterfs_shares"
    shares.write_text(f"# Cinder's format\n{gluster_volume.spec} -o direct-io-mode=disable\n")
    base = host_bases[0]
    share_dir = mount_point_for(gluster_volume.spec, str(base))
    options = f"share_type=glusterfs,shares_config={shares},mount_base={base}"
    first = vfsnap_mount(options, path=tmp_path / "first", spec="glusterfs-shares")
    assert first.volume("vol").read_bytes() == b"\x5a" * 65536
    with open("/proc/mounts") as mounts:
        assert [line.split()[2] for line in mounts if line.split()[1] == share_dir] == ["fuse.glusterfs"]
    with open(f"/proc/{_glusterfs_client_pid(share_dir)}/cmdline", "rb") as cmdline:
        assert b"--direct-io-mode=disable" in cmdline.read().split(b"\0")
    first.stop()
    # vfsnap leaves the share mounted (as Cinder does); the next mount reuses it.
    assert mounted_source(share_dir) == gluster_volume.spec
    second = vfsnap_mount(options, path=tmp_path / "second", spec="glusterfs-shares")
    assert second.volume("vol").read_bytes() == b"\x5a" * 65536
    with open("/proc/mounts") as mounts:
        assert sum(line.split()[1] == share_dir for line in mounts) == 1
    assert "already mounted" in second.log()


def _glusterfs_client_pid(mountpoint: str) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"glusterfs") and mountpoint.encode() in args:
            return int(pid)
    raise AssertionError(f"no glusterfs client process for {mountpoint}")


def test_mount_t_vfsnap_of_a_gluster_volume_through_mount8(gluster_volume, gluster_client, host_bases,
                                                           helpers_installed, tmp_path):
    """mount(8) runs the helper without PATH; vfsnap still finds mount(8) and mount.glusterfs."""
    (gluster_client / "vol").write_bytes(b"\xa5" * 65536)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    call = MountCall(["mount", "-t", "vfsnap", gluster_volume.spec, str(mountpoint),
                      "-o", f"_netdev,share_type=glusterfs,mount_base={host_bases[0]}"], mountpoint)
    try:
        assert call.returncode == 0, call.stderr
        assert (mountpoint / "volumes" / "vol").read_bytes() == b"\xa5" * 65536
        subprocess.run(["umount", str(mountpoint)], check=True)
        assert call.daemon_exit_codes() == [0]
    finally:
        call.cleanup()


def test_unreachable_volume_fails_after_the_configured_attempts(gluster_volume, host_bases, tmp_path):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "vfsnap", "mount", "-f", "-o",
         f"share_type=glusterfs,mount_base={host_bases[0]},share_mount_attempts=2",
         f"{gluster_volume.host}:/no-such-volume", str(mountpoint)],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 3
    assert f"cannot mount glusterfs share {gluster_volume.host}:/no-such-volume" in result.stderr
    assert "after 2 attempt(s)" in result.stderr and "/var/log/glusterfs/" in result.stderr
    assert time.monotonic() - started >= 1.0  # one retry delay
    assert not os.path.ismount(mountpoint)
