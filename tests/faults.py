"""Test-only fault injection: crash, or fail, at the N-th operation vfsnap issues to the share.

It lives with the tests, never in the package: a daemon gets it only when a test starts it
through `tests/fault_launcher.py` (`python -m tests.fault_launcher mount ...`), which installs the
plan named by `VFSNAP_FAULTS` and then runs vfsnap's own `main`. The crash tests use it to stop
the daemon after every single write, fsync and rename of an operation in turn (DESIGN.md
invariant 3), and to make the share fail with ENOSPC or EIO in the middle of a merge or a write.

    VFSNAP_FAULTS=crash:N            SIGKILL the process right after the N-th counted operation
    VFSNAP_FAULTS=error:N:ENOSPC     the N-th counted operation fails with that errno instead
    VFSNAP_FAULTS=count              only count (the total is written to VFSNAP_FAULTS_REPORT)
    VFSNAP_FAULTS=slow:SECONDS       every counted operation first sleeps (a slow share)
    VFSNAP_FAULTS_OPS=pwrite,fsync   which operations count (default: all of OPERATIONS)

Counted operations are the `os` functions through which vfsnap changes files on the share.
"""

from __future__ import annotations

import errno as errno_codes
import os
import signal
import time

OPERATIONS = ("write", "pwrite", "copy_file_range", "fsync", "fdatasync", "rename", "unlink", "ftruncate",
              "posix_fallocate")


class FaultPlan:
    def __init__(self, mode: str, at: int = 0, error: int = errno_codes.EIO, operations=OPERATIONS,
                 counter=None):
        self.mode = mode  # "crash", "error", "count" or "slow"
        self.at = at  # for "slow": the seconds each operation takes longer
        self.error = error
        self.operations = tuple(operations)
        self.count = 0
        self.counter = counter  # optional shared memory (mmap) the count is mirrored into
        self._originals: dict[str, object] = {}

    def install(self) -> "FaultPlan":
        for name in self.operations:
            original = getattr(os, name)
            self._originals[name] = original
            setattr(os, name, self._wrap(name, original))
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(os, name, original)
        self._originals.clear()

    def _wrap(self, name: str, original):
        def counted(*args, **kwargs):
            if self.mode == "slow":
                time.sleep(self.at)
            self.count += 1
            if self.counter is not None:
                self.counter[:8] = self.count.to_bytes(8, "little")
            if self.count == self.at and self.mode == "error":
                raise OSError(self.error, f"{os.strerror(self.error)} (injected at {name} #{self.count})")
            result = original(*args, **kwargs)
            if self.count == self.at and self.mode == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        counted.__name__ = name
        return counted


_installed: FaultPlan | None = None


def install_from_environment() -> FaultPlan | None:
    """Install the plan named by VFSNAP_FAULTS, if any."""
    global _installed
    spec = os.environ.get("VFSNAP_FAULTS")
    if not spec:
        return None
    operations = tuple(o for o in os.environ.get("VFSNAP_FAULTS_OPS", ",".join(OPERATIONS)).split(",") if o)
    parts = spec.split(":")
    if parts[0] == "crash":
        plan = FaultPlan("crash", int(parts[1]), operations=operations)
    elif parts[0] == "error":
        plan = FaultPlan("error", int(parts[1]), getattr(errno_codes, parts[2]), operations=operations)
    elif parts[0] == "count":
        plan = FaultPlan("count", operations=operations)
    elif parts[0] == "slow":
        plan = FaultPlan("slow", float(parts[1]), operations=operations)
    else:
        raise ValueError(f"VFSNAP_FAULTS: unknown plan {spec!r}")
    _installed = plan.install()
    return plan


def report() -> None:
    """At exit: write the number of counted operations where VFSNAP_FAULTS_REPORT says."""
    path = os.environ.get("VFSNAP_FAULTS_REPORT")
    if _installed is not None and path:
        _installed.uninstall()
        with open(path, "w") as f:
            f.write(str(_installed.count))
