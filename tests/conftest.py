"""Fixtures: a share directory, and a real vfsnap mount of it run in a subprocess.

The daemon never runs in the test's own thread: the kernel would wait for the daemon while the
daemon waits for the test. Teardown always unmounts (`fusermount3 -u`, `-z` as a last resort),
and a mount whose log shows an unexpected error fails the test that used it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# The GlusterFS fixtures are session-wide: registered once here, so that every module shares one
# volume (imported into two modules, a session fixture would be set up twice).
pytest_plugins = ["tests.gluster"]

ROOT = Path(__file__).resolve().parent.parent
FUSERMOUNT = shutil.which("fusermount3") or shutil.which("fusermount")


def fuse_usable() -> bool:
    return os.path.exists("/dev/fuse") and FUSERMOUNT is not None


# A test that mounts fails (never skips) where FUSE cannot be used: a CI run without /dev/fuse must
# go red, not report a green run that tested nothing (`pytest_runtest_setup` below).
requires_fuse = pytest.mark.requires_fuse


def requires_commands(*commands: str) -> pytest.MarkDecorator:
    """Mark a test that runs these programs: it fails (never skips) where one is missing, since
    scripts/setup.sh --test installs every one of them (`pytest_runtest_setup` below)."""
    return pytest.mark.requires_commands(*commands)


def mount_tmpfs(path: Path, size: int | str) -> None:
    """Mount a tmpfs of `size` (bytes, or `8m`) on `path`. Mounting needs root, which the suite has
    (scripts/test.sh runs as root, as GlusterFS needs): where it cannot, the test fails, never skips."""
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "vfsnap-test", str(path)],
                            check=False, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs on {path} (euid {os.geteuid()}; the tests run as root): "
                    f"{result.stderr.strip()}", pytrace=False)


def unmount(mountpoint: Path | str, *, lazy: bool = False) -> bool:
    args = [FUSERMOUNT, "-u", "-q"] + (["-z"] if lazy else []) + [str(mountpoint)]
    return subprocess.run(args, capture_output=True).returncode == 0


def wait_for(condition, what: str, timeout: float = 5.0, interval: float = 0.02):
    """Poll `condition()` until it returns something true (returned), failing the test after
    `timeout` seconds: tests wait on the state they need, never for a guessed time."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class Mount:
    """A running `vfsnap mount -f` and its mountpoint."""

    def __init__(self, share: Path | list[Path], mountpoint: Path, options: str = "", log_path: Path | None = None,
                 spec: str | None = None, module: str = "vfsnap"):
        self.shares = share if isinstance(share, list) else [share]
        self.spec = spec or str(self.shares[0])
        self.path = mountpoint
        self.options = options
        self.module = module  # what `python -m` runs: vfsnap, or tests.fault_launcher (tests/faults.py)
        self.log_path = log_path or mountpoint.parent / f"{mountpoint.name}.log"
        self.process: subprocess.Popen | None = None
        self.allowed_log_errors: list[str] = []

    # Paths in the tree.
    def volume(self, name: str) -> Path:
        return self.path / "volumes" / name

    def snapshot_dir(self, volume: str, snap: str | None = None) -> Path:
        base = self.path / "snapshots" / volume
        return base if snap is None else base / snap

    def snapshot(self, volume: str, snap: str) -> Path:
        return self.path / "snapshots" / volume / snap / volume

    def start(self, timeout: float = 20.0) -> "Mount":
        self.path.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", self.module, "mount", "-f"]
        opts = ",".join(o for o in ("log_level=debug" if os.environ.get("VFSNAP_TEST_DEBUG") else "", self.options) if o)
        if opts:
            args += ["-o", opts]
        args += [self.spec, str(self.path)]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.path):
            if self.process.poll() is not None:
                raise RuntimeError(f"vfsnap mount exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"vfsnap mount did not appear within {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if os.path.ismount(self.path):
            unmount(self.path)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            unmount(self.path, lazy=True)
            self.process.kill()
            self.process.wait(10)
        if os.path.ismount(self.path):
            unmount(self.path, lazy=True)
        self._log.close()
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL the daemon (a crash), then clean up the dead mount."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        unmount(self.path, lazy=True)
        self._log.close()
        self.process = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def unexpected_errors(self) -> list[str]:
        bad = []
        for line in self.log().splitlines():
            if "Traceback" in line or "unexpected error" in line or " CRITICAL " in line:
                if not any(allowed in line for allowed in self.allowed_log_errors):
                    bad.append(line)
        return bad


@pytest.fixture
def share(tmp_path: Path) -> Path:
    path = tmp_path / "share"
    path.mkdir()
    return path


@pytest.fixture
def mountpoint(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


@pytest.fixture
def vfsnap_mount(share: Path, mountpoint: Path, request):
    """A factory: `vfsnap_mount(options="")` mounts `share` and returns the Mount.

    Every mount made through it is stopped at teardown, and its log checked for tracebacks.
    """
    mounts: list[Mount] = []

    def start(options: str = "", *, path: Path | None = None, share_path: Path | list[Path] | None = None,
              spec: str | None = None) -> Mount:
        mnt = Mount(share_path or share, path or mountpoint, options, spec=spec)
        mounts.append(mnt)
        return mnt.start()

    yield start
    errors = []
    for mnt in mounts:
        mnt.stop()
        errors += mnt.unexpected_errors()
    if errors and not request.node.get_closest_marker("allow_daemon_errors"):
        pytest.fail("vfsnap logged unexpected errors:\n" + "\n".join(errors[:20]))


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_daemon_errors: the test provokes daemon-side errors on purpose")
    config.addinivalue_line("markers", "requires_fuse: the test mounts vfsnap; fails when /dev/fuse is unusable")
    config.addinivalue_line("markers", "requires_commands(*names): the test runs these programs; fails when one is "
                            "missing")


def pytest_runtest_setup(item):
    if item.get_closest_marker("requires_fuse") and not fuse_usable():
        pytest.fail("this test mounts vfsnap but FUSE cannot be used here: "
                    f"/dev/fuse {'exists' if os.path.exists('/dev/fuse') else 'is missing'}, "
                    f"fusermount3 {'found' if FUSERMOUNT else 'not found'}", pytrace=False)
    needed = [name for marker in item.iter_markers("requires_commands") for name in marker.args]
    missing = [name for name in needed if shutil.which(name) is None]
    if missing:
        pytest.fail(f"this test runs {', '.join(missing)}, not installed here (scripts/setup.sh --test installs "
                    "them)", pytrace=False)


# VFSNAP_FAIL_ON_SKIP=1 (set by scripts/test.sh, so CI): a skipped test is reported as failed, so that a
# run that did not test something can never be green. The suite itself never skips (a setup that cannot
# be done fails); this catches a skip added later or raised by a plugin (an empty parametrization).
FAIL_ON_SKIP = os.environ.get("VFSNAP_FAIL_ON_SKIP") == "1"


def _skip_as_failure(report) -> None:
    if FAIL_ON_SKIP and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but this run allows no skips (VFSNAP_FAIL_ON_SKIP=1): {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _skip_as_failure(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _skip_as_failure(report)
    return report
