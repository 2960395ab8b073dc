"""`mount.vfsnap`: mount(8)'s helper convention, fstab lines, and `umount` ending the daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, requires_commands, requires_fuse, unmount
from vfsnap.cli.mount_helper import HelperCall, UsageError, normalise_options, parse_args
from vfsnap.errors import InvalidName

HELPERS = ("/sbin/mount.vfsnap", "/sbin/mount.fuse.vfsnap")

# Runs a command as a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so the daemon that the
# mount helper leaves behind becomes its child: prints the command's result, then the exit status
# of every vfsnap daemon among the orphans once they have exited. Other orphans (a glusterfs
# client that vfsnap started) are left alone; they go to init when the reaper exits.
REAPER = r"""
import ctypes, json, os, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_CHILD_SUBREAPER) failed")
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": result.returncode, "stderr": result.stderr}), flush=True)
daemons = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            program = f.read().split(b"\0")[:3]  # interpreter, script or -m, module
    except (OSError, ValueError, IndexError):
        continue
    names = {os.path.basename(arg) for arg in program}
    if parent == os.getpid() and names & {b"mount.vfsnap", b"mount.fuse.vfsnap", b"vfsnap.cli.mount_helper"}:
        daemons.append(int(pid))
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in daemons]
print(json.dumps({"daemons": codes}), flush=True)
"""


# -- argument handling (no mount) --------------------------------------------------------------

def test_helper_arguments_as_mount_passes_them():
    call = parse_args(["nas:/cinder", "/mnt/x", "-s", "-n", "-v", "-o", "rw,_netdev", "-t", "fuse.vfsnap",
                       "-N", "1234"])
    assert call == HelperCall(spec="nas:/cinder", mountpoint="/mnt/x", options="rw,_netdev", sloppy=True,
                              no_mtab=True, verbose=True, fstype="fuse.vfsnap", namespace="1234")


def test_helper_arguments_by_hand_combined_flags_and_repeated_o():
    call = parse_args(["-fv", "-oro", "/srv/share", "-o", "allow_other", "/mnt/x"])
    assert call == HelperCall(spec="/srv/share", mountpoint="/mnt/x", options="ro,allow_other", fake=True,
                              verbose=True)


@pytest.mark.parametrize("argv, message", [
    (["/srv/share"], "expected SPEC and DIR"),
    (["a", "b", "c"], "expected SPEC and DIR"),
    (["a", "b", "-o"], "-o needs a value"),
    (["a", "b", "-x"], "unknown flag -x"),
    (["a", "b", "-t", "nfs"], "type 'nfs' is not vfsnap"),
])
def test_bad_helper_arguments_are_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_args(argv)


def test_fstab_and_systemd_options_are_ignored_and_unknown_ones_refused():
    ignored = ("rw,defaults,auto,noauto,user,nouser,users,_netdev,nofail,noatime,x-systemd.automount,"
               "X-mount.mkdir,comment=x")
    assert normalise_options(ignored + ",ro", sloppy=False) == ignored + ",ro"
    with pytest.raises(InvalidName, match="unknown mount option 'bogus=1'"):
        normalise_options("ro,bogus=1", sloppy=False)


def test_sloppy_drops_unknown_options_but_not_bad_values(capsys):
    assert normalise_options("ro,bogus,log_level=debug", sloppy=True) == "ro,log_level=debug"
    assert "ignoring unknown option 'bogus'" in capsys.readouterr().err
    with pytest.raises(InvalidName, match="bad value for mount option max_chain_depth"):
        normalise_options("bogus,max_chain_depth=many", sloppy=True)


# -- through mount(8) --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def helpers_installed():
    """/sbin/mount.vfsnap and /sbin/mount.fuse.vfsnap running this checkout's code.

    scripts/setup.sh (run by scripts/test.sh, so in CI) links them into the checkout's .venv. Links
    that lead elsewhere (or nowhere) are pointed at the checkout's ./mount.vfsnap for the tests and
    restored afterwards. What cannot be set up fails the tests that need it: a run without them has
    not tested what `mount -t vfsnap` and fstab lines do.
    """
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.fail(f"no {ROOT / '.venv'}: ./mount.vfsnap runs vfsnap with the checkout's .venv, which "
                    "`bash scripts/setup.sh --test` makes", pytrace=False)
    restore: list[tuple[str, str | None]] = []
    try:
        for helper in HELPERS:
            if os.path.realpath(helper).startswith(str(ROOT) + os.sep):
                continue
            previous = os.readlink(helper) if os.path.islink(helper) else None
            if os.path.exists(helper) and previous is None:
                # Not a link (a package's file): replacing it could lose another installation's helper.
                pytest.fail(f"{helper} is a file of another installation, not a link: remove it (or run "
                            "`bash scripts/setup.sh --test`, which links it to this checkout)", pytrace=False)
            try:
                if previous is not None:
                    os.unlink(helper)
                os.symlink(ROOT / "mount.vfsnap", helper)
            except PermissionError:
                pytest.fail(f"cannot install {helper}: the tests run as root (scripts/test.sh)", pytrace=False)
            restore.append((helper, previous))
        yield
    finally:
        for helper, previous in restore:
            os.unlink(helper)
            if previous is not None:
                os.symlink(previous, helper)


@pytest.fixture
def volume(share: Path) -> bytes:
    data = os.urandom(64 << 10) + bytes(192 << 10)
    (share / "vol1").write_bytes(data)
    return data


class MountCall:
    """`mount ...` run under a subreaper: the result now, the daemon's exit status later."""

    def __init__(self, args: list[str], mountpoint: Path):
        self.mountpoint = mountpoint
        # Unbuffered: readline must not read ahead into what communicate() reads later.
        self.process = subprocess.Popen([sys.executable, "-c", REAPER, *args], stdout=subprocess.PIPE, bufsize=0)
        first = json.loads(self.process.stdout.readline())
        self.returncode: int = first["rc"]
        self.stderr: str = first["stderr"]

    def daemon_exit_codes(self, timeout: float = 30) -> list[int]:
        out, _ = self.process.communicate(timeout=timeout)
        return json.loads(out)["daemons"]

    def cleanup(self) -> None:
        if os.path.ismount(self.mountpoint):
            unmount(self.mountpoint) or unmount(self.mountpoint, lazy=True)
        try:
            self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def mount_cmd(helpers_installed, mountpoint):
    calls: list[MountCall] = []

    def run(*args: str) -> MountCall:
        call = MountCall(["mount", *args], mountpoint)
        calls.append(call)
        return call

    yield run
    for call in calls:
        call.cleanup()


def _assert_clean_log(log: Path) -> None:
    text = log.read_text() if log.exists() else ""
    assert "Traceback" not in text and " ERROR " not in text, text


@requires_fuse
def test_mount_t_vfsnap_returns_once_usable_and_umount_ends_the_daemon(mount_cmd, share, mountpoint, volume,
                                                                       tmp_path):
    log = tmp_path / "vfsnap.log"
    call = mount_cmd("-t", "vfsnap", str(share), str(mountpoint),
                     "-o", f"rw,_netdev,nofail,noatime,x-systemd.automount,log_file={log}")
    assert call.returncode == 0, call.stderr
    # Usable the moment mount(8) returned: no polling.
    assert os.listdir(mountpoint / "volumes") == ["vol1"]
    assert (mountpoint / "volumes" / "vol1").read_bytes() == volume
    with open("/proc/mounts") as mounts:
        entry = [line.split() for line in mounts if line.split()[1] == str(mountpoint)]
    assert entry and entry[0][0] == str(share) and entry[0][2] == "fuse.vfsnap"
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert not os.path.ismount(mountpoint)
    assert call.daemon_exit_codes() == [0]
    _assert_clean_log(log)


@requires_fuse
def test_fstab_lines_of_type_vfsnap_and_fuse_vfsnap(mount_cmd, share, mountpoint, volume, tmp_path):
    for fstype in ("vfsnap", "fuse.vfsnap"):
        fstab = tmp_path / f"fstab.{fstype}"
        fstab.write_text(f"# vfsnap over a local share\n{share} {mountpoint} {fstype} "
                         f"_netdev,nofail,x-systemd.requires-mounts-for={share},ro,log_file={tmp_path / 'log'} 0 0\n")
        call = mount_cmd("--fstab", str(fstab), str(mountpoint))
        assert call.returncode == 0, call.stderr
        assert (mountpoint / "volumes" / "vol1").read_bytes() == volume
        with pytest.raises(OSError):  # ro from the fstab line reached vfsnap
            (mountpoint / "volumes" / "vol1").write_bytes(b"x")
        subprocess.run(["umount", str(mountpoint)], check=True)
        assert call.daemon_exit_codes() == [0]
    _assert_clean_log(tmp_path / "log")


@requires_fuse
def test_unknown_option_is_refused_with_a_message(mount_cmd, share, mountpoint):
    call = mount_cmd("-t", "vfsnap", str(share), str(mountpoint), "-o", "_netdev,bogus=1")
    assert call.returncode == 1
    assert "mount.vfsnap: unknown mount option 'bogus=1'" in call.stderr
    assert not os.path.ismount(mountpoint)
    assert call.daemon_exit_codes() == []


@requires_fuse
def test_sloppy_mount_drops_unknown_option_with_a_warning(mount_cmd, share, mountpoint, volume):
    call = mount_cmd("-s", "-t", "vfsnap", str(share), str(mountpoint), "-o", "bogus")
    assert call.returncode == 0, call.stderr
    assert "ignoring unknown option 'bogus'" in call.stderr
    assert (mountpoint / "volumes" / "vol1").read_bytes() == volume
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert call.daemon_exit_codes() == [0]


@requires_fuse
def test_fake_mount_checks_options_and_mounts_nothing(mount_cmd, share, mountpoint):
    call = mount_cmd("-f", "-v", "-t", "vfsnap", str(share), str(mountpoint), "-o", "ro")
    assert call.returncode == 0, call.stderr
    assert "would mount" in call.stderr
    assert not os.path.ismount(mountpoint)
    assert call.daemon_exit_codes() == []
    call = mount_cmd("-f", "-t", "vfsnap", str(share), str(mountpoint), "-o", "bogus")
    assert call.returncode == 1


@requires_fuse
def test_failed_mount_exits_3_with_the_reason_and_leaves_nothing(mount_cmd, tmp_path, mountpoint):
    call = mount_cmd("-t", "vfsnap", str(tmp_path / "no-such-share"), str(mountpoint))
    assert call.returncode == 3
    assert "is not a directory" in call.stderr
    assert not os.path.ismount(mountpoint)
    assert call.daemon_exit_codes() == []


@requires_fuse
def test_repository_script_works_without_path(helpers_installed, share, mountpoint, volume):
    """mount(8) runs helpers with no PATH at all; ./mount.vfsnap must not need one."""
    call = MountCall(["env", "-i", str(ROOT / "mount.vfsnap"), str(share), str(mountpoint), "-o", "ro"], mountpoint)
    try:
        assert call.returncode == 0, call.stderr
        assert (mountpoint / "volumes" / "vol1").read_bytes() == volume
        subprocess.run(["umount", str(mountpoint)], check=True)
        assert call.daemon_exit_codes() == [0]
    finally:
        call.cleanup()


@requires_fuse
@requires_commands("unshare", "nsenter")
def test_mount_into_another_namespace_with_N(helpers_installed, share, mountpoint, volume):
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "60"])
    call = None
    try:
        ns = f"/proc/{holder.pid}/ns/mnt"
        for _ in range(100):  # until unshare has exec'd sleep in the new namespace
            if os.readlink(ns) != os.readlink("/proc/self/ns/mnt"):
                break
            time.sleep(0.02)
        call = MountCall([str(ROOT / "mount.vfsnap"), str(share), str(mountpoint), "-N", str(holder.pid)],
                         mountpoint)
        assert call.returncode == 0, call.stderr
        assert not os.path.ismount(mountpoint)  # not in ours
        listing = subprocess.run(["nsenter", "-t", str(holder.pid), "-m", "ls", f"{mountpoint}/volumes"],
                                 capture_output=True, text=True, check=True)
        assert listing.stdout.split() == ["vol1"]
        subprocess.run(["nsenter", "-t", str(holder.pid), "-m", "umount", str(mountpoint)], check=True)
        assert call.daemon_exit_codes() == [0]
    finally:
        holder.kill()
        holder.wait()
        if call is not None:
            call.cleanup()


def test_contrib_fstab_and_systemd_examples_are_valid_for_the_helper():
    lines = [line.lstrip("#").split() for line in (ROOT / "contrib" / "fstab.example").read_text().splitlines()]
    entries = [fields for fields in lines if len(fields) == 6 and fields[2] in ("vfsnap", "fuse.vfsnap")]
    assert len(entries) == 4
    for _spec, _mountpoint, _fstype, options, _dump, _pass in entries:
        normalise_options(options, sloppy=False)
    unit = (ROOT / "contrib" / "srv-vfsnap.mount").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["Type"] in ("vfsnap", "fuse.vfsnap")
    normalise_options(settings["Options"], sloppy=False)
