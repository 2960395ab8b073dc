"""A single-node GlusterFS volume for the tests, made here from nothing.

`gluster_volume` (session scope) installs glusterfs-server and glusterfs-client when they are
missing, starts glusterd when it is not running (there is no systemd here: glusterd is started
directly and daemonizes), creates a volume with one brick in a temporary directory and starts it.
Teardown unmounts every client mount of the volume, stops and deletes it, and stops glusterd if
this session started it and no other session's test volume is left. A setup that cannot be done
(packages not installable, daemon not starting, volume not created) fails every test that needs
the volume, loudly: a CI run must never turn green by skipping the multi-host tests.

Bricks must be named by a host that is not a loopback name or address (`gluster volume create`
refuses localhost and 127.0.0.1); the machine's hostname is accepted even where it resolves to
127.0.0.1, and a non-loopback address of the machine is tried next. Clients may use either.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import attrs
import pytest

PACKAGES = ("glusterfs-server", "glusterfs-client")
VOLUME_PREFIX = "vfsnap-test-"
# The client-side caches of a GlusterFS volume (on by default), off for VM images.
CLIENT_CACHES = ("performance.quick-read", "performance.io-cache", "performance.read-ahead",
                 "performance.stat-prefetch", "performance.open-behind", "performance.write-behind",
                 "performance.readdir-ahead")
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@attrs.frozen
class GlusterVolume:
    host: str
    name: str
    brick: Path
    setup_seconds: float

    @property
    def spec(self) -> str:
        return f"{self.host}:/{self.name}"


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join(p for p in (os.environ.get("PATH"), SBIN_PATH) if p))


def _run(*args: str, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=check,
                          stdin=subprocess.DEVNULL)


def gluster(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return _run(_which("gluster") or "gluster", "--mode=script", *args, timeout=timeout)


def ensure_installed() -> None:
    if _which("glusterd") and _which("gluster") and _which("mount.glusterfs"):
        return
    if os.geteuid() != 0:
        pytest.fail("GlusterFS is not installed and installing it needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", *PACKAGES]
    result = subprocess.run(install, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:  # an old or empty package list: refresh it once
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, stdin=subprocess.DEVNULL,
                       check=False)
        result = subprocess.run(install, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0 or not _which("glusterd"):
        pytest.fail(f"cannot install {' '.join(PACKAGES)}: {result.stderr.strip()[-500:]}")


def _glusterd_answers() -> bool:
    try:
        return gluster("volume", "list", timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def ensure_glusterd(pid_file: Path) -> int | None:
    """Start glusterd unless one answers already; the PID of the one started here, else None."""
    if _glusterd_answers():
        return None
    result = _run(_which("glusterd") or "glusterd", "-p", str(pid_file), "--log-level", "WARNING", timeout=60)
    if result.returncode != 0:
        pytest.fail(f"glusterd does not start here: {(result.stderr or result.stdout).strip()}")
    deadline = time.monotonic() + 30
    while not _glusterd_answers():
        if time.monotonic() > deadline:
            pytest.fail("glusterd started but does not answer `gluster volume list` within 30 s")
        time.sleep(0.1)
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _brick_hosts() -> list[str]:
    hosts = [socket.gethostname()]
    result = _run("ip", "-4", "-o", "addr", "show", "scope", "global", timeout=10) if _which("ip") else None
    if result is not None and result.returncode == 0:
        hosts += re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", result.stdout)
    return hosts


def _remove_stale_volumes() -> None:
    """Test volumes of earlier sessions that died without their teardown."""
    listed = gluster("volume", "list")
    for name in listed.stdout.split():
        match = re.fullmatch(re.escape(VOLUME_PREFIX) + r"(\d+)", name)
        if match and not os.path.exists(f"/proc/{match.group(1)}"):
            _unmount_clients(name)
            gluster("volume", "stop", name, "force")
            gluster("volume", "delete", name)


def _other_test_volumes(ours: str) -> list[str]:
    listed = gluster("volume", "list")
    return [name for name in listed.stdout.split() if name.startswith(VOLUME_PREFIX) and name != ours]


def _unmount_clients(name: str) -> None:
    """Unmount every glusterfs client mount of volume `name` (vfsnap never unmounts its shares)."""
    with open("/proc/mounts") as mounts:
        targets = [fields[1] for fields in (line.split() for line in mounts)
                   if fields[2] == "fuse.glusterfs" and fields[0].endswith(f":/{name}")]
    for target in reversed(targets):
        if _run("umount", target, timeout=30).returncode != 0:
            _run("umount", "-l", target, timeout=30)


def create_volume(root: Path, name: str | None = None) -> GlusterVolume:
    started = time.monotonic()
    name = name or f"{VOLUME_PREFIX}{os.getpid()}"
    brick = root / "brick"
    errors = []
    for host in _brick_hosts():
        created = gluster("volume", "create", name, f"{host}:{brick}", "force")
        if created.returncode == 0:
            break
        errors.append(f"{host}: {(created.stderr or created.stdout).strip()}")
    else:
        pytest.fail("gluster volume create failed for every host name of this machine: " + "; ".join(errors))
    # As a deployment serving VM images must (oVirt and Cinder docs: `gluster volume set VOL
    # group virt`): no client-side caches that let one client read stale data another wrote.
    for option in CLIENT_CACHES:
        gluster("volume", "set", name, option, "off")
    started_volume = gluster("volume", "start", name)
    if started_volume.returncode != 0:
        gluster("volume", "delete", name)
        pytest.fail(f"gluster volume start failed: {(started_volume.stderr or started_volume.stdout).strip()}")
    return GlusterVolume(host=host, name=name, brick=brick, setup_seconds=time.monotonic() - started)


@pytest.fixture(scope="session")
def gluster_volume(tmp_path_factory):
    """A started single-brick GlusterFS volume; yields a GlusterVolume (`.spec` is `host:/name`)."""
    started = time.monotonic()
    ensure_installed()
    installed = time.monotonic()
    root = tmp_path_factory.mktemp("gluster")
    glusterd_pid = ensure_glusterd(root / "glusterd.pid")
    _remove_stale_volumes()
    volume = create_volume(root)
    volume = attrs.evolve(volume, setup_seconds=time.monotonic() - started)
    print(f"\nGlusterFS test volume {volume.spec}: ready in {volume.setup_seconds:.1f} s "
          f"(install check {installed - started:.1f} s, glusterd {'started' if glusterd_pid else 'running'})")
    yield volume
    _unmount_clients(volume.name)
    gluster("volume", "stop", volume.name, "force")
    gluster("volume", "delete", volume.name)
    if glusterd_pid is not None and not _other_test_volumes(volume.name):
        try:
            os.kill(glusterd_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


@pytest.fixture
def gluster_client(gluster_volume, tmp_path):
    """The volume mounted with the glusterfs FUSE client, as a Cinder host sees it; empty at the
    start (tests that mount the session's volume themselves, such as the hung-share ones, may
    leave files on it) and emptied at teardown."""
    path = tmp_path / "gluster-client"
    path.mkdir()
    result = _run("mount", "-t", "glusterfs", gluster_volume.spec, str(path), timeout=60)
    if result.returncode != 0:
        pytest.fail(f"mount -t glusterfs {gluster_volume.spec} failed: {result.stderr.strip()}")
    _empty(path)
    yield path
    _empty(path)
    if _run("umount", str(path), timeout=30).returncode != 0:
        _run("umount", "-l", str(path), timeout=30)


def _empty(path: Path) -> None:
    for entry in path.iterdir():
        if entry.name == ".trashcan":  # GlusterFS's own
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def remove_volume(name: str) -> None:
    """Unmount the clients of a volume made by `create_volume`, stop and delete it."""
    _unmount_clients(name)
    gluster("volume", "stop", name, "force")
    gluster("volume", "delete", name)


def brick_pid(name: str) -> int:
    """The PID of the brick process (glusterfsd) of a single-brick volume."""
    status = gluster("volume", "status", name, "--xml")
    match = re.search(r"<node>.*?<pid>(\d+)</pid>", status.stdout, re.S)  # bricks come first
    if match is None or int(match.group(1)) <= 0:
        raise AssertionError(f"no brick PID in `gluster volume status {name} --xml`:\n{status.stdout}")
    return int(match.group(1))


def mount_client(volume: GlusterVolume, path: Path) -> None:
    path.mkdir(exist_ok=True)
    result = _run("mount", "-t", "glusterfs", volume.spec, str(path), timeout=60)
    if result.returncode != 0:
        pytest.fail(f"mount -t glusterfs {volume.spec} failed: {result.stderr.strip()}")
