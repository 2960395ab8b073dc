"""Profiling a FUSE daemon while fio runs on it: py-spy samples, summarised per layer.

py-spy (`.venv/bin/pip install py-spy`) samples the daemon's threads with native frames and idle
time included, so the summary shows where the FUSE thread's wall time goes per request: waiting
for the kernel, libfuse's read()/writev() of /dev/fuse, the filesystem's own Python code and its
system calls on the images, pyfuse3's Cython glue, trio's scheduler.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import harness as h
from harness import Workload


def profile_pyspy(target: h.Target, workload: Workload, runtime: float, size: int, out: Path,
                  ramp: float = 0) -> dict:
    """Sample a daemon with py-spy (native frames, idle time included) while fio runs on it."""
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists():
        pyspy = Path(shutil.which("py-spy") or "")
    if not pyspy.name:
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    duration = max(1, int(runtime) - 1)
    raw = out.with_suffix(".collapsed.txt")
    # --native needs the blocking mode: py-spy stops the daemon for each sample (slower, same shares).
    command = [str(pyspy), "record", "--pid", str(target.pid), "--duration", str(duration), "--rate",
               str(PROFILE_RATE), "--format", "raw", "--native", "--idle", "--output", str(raw)]
    # py-spy starts after fio's ramp and samples for runtime-1 s, all of it inside the measured run.
    proc = subprocess.Popen(["sh", "-c", f'sleep {ramp + 0.3:.1f} && exec "$@"', "sh", *command],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        result = h.fio(target, workload, runtime=runtime + 0.5, disk_size=size, ramp=ramp)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err}")
    analysis = analyse_collapsed(raw)
    analysis.update(target=target.name, workload=workload.name, iops=result["iops"],
                    daemon_cpu_us_per_io=result.get("daemon_cpu_us_per_io"), stacks=str(raw))
    out.write_text(format_profile(analysis))
    return analysis


PROFILE_RATE = 500
BUCKETS = [
    "idle: waiting for the next request (epoll_wait)",
    "libfuse: read() of the request from /dev/fuse",
    "libfuse: writev() of the reply to /dev/fuse",
    "filesystem: system calls on the images (pread, pwrite, fsync, ...)",
    "filesystem: Python code of the handlers, and the copies it makes",
    "pyfuse3: Cython dispatch, coroutine and refcount glue",
    "trio: scheduler, parking lots, locks, epoll_ctl",
    "other",
]
IMAGE_SYSCALLS = {"pread", "pread64", "preadv", "preadv64", "preadv2", "pwrite", "pwrite64", "pwritev", "pwritev64",
                  "pwritev2", "fsync", "fdatasync", "fallocate", "fallocate64", "ftruncate", "ftruncate64",
                  "fstat", "fstat64", "__fstat64", "fstatat64", "lseek", "lseek64", "copy_file_range", "fcntl",
                  "fcntl64", "__fcntl64_nocancel", "openat", "openat64", "close", "__close", "rename", "renameat",
                  "os_pread", "os_pread_impl", "os_pwrite", "os_pwrite_impl"}


def _split(frame: str) -> tuple[str, str]:
    """'func (file:line)' -> (func, file)."""
    func, _, rest = frame.strip().rpartition(" (")
    return func, rest.rsplit(":", 1)[0]


def is_fs_frame(frame: str) -> bool:
    func, file = _split(frame)
    if func.startswith("Passthrough."):
        return True
    return (file.startswith("vfsnap/") or "/vfsnap/" in file) and "/cli/" not in file \
        and not file.startswith("vfsnap/cli/") and not file.endswith("__main__.py")


def bucket_of(frames: list[str]) -> str:
    """What the FUSE thread was doing in one sample: the innermost frame that tells."""
    if not frames:
        return "other"
    leaf, _ = _split(frames[-1])
    fs = any(is_fs_frame(f) for f in frames)
    if fs:
        return BUCKETS[3] if leaf in IMAGE_SYSCALLS else BUCKETS[4]
    if leaf == "epoll_wait":
        return BUCKETS[0]
    names = [_split(f) for f in frames]
    if any(func.startswith("fuse_reply") for func, _ in names):
        return BUCKETS[2]
    if leaf == "read" or any("receive_buf" in func for func, _ in names):
        return BUCKETS[1]
    for func, file in reversed(names):
        if "/trio/" in file or file.startswith("trio/") or "outcome" in file or "selectmodule" in file:
            return BUCKETS[6]
        if file.endswith((".pyx", ".pxi")) or "pyfuse3" in file:
            return BUCKETS[5]
        if file.endswith(".py"):
            break
    if any("pyfuse3" in file or file.endswith((".pyx", ".pxi")) for _, file in names):
        return BUCKETS[5]
    return BUCKETS[7]


def analyse_collapsed(path: Path, top: int = 25) -> dict:
    """Summarise py-spy raw (collapsed) stacks: where the daemon's wall time goes."""
    stacks: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    total = sum(stacks.values()) or 1
    self_time: Counter = Counter()
    fs_incl: Counter = Counter()
    buckets: Counter = Counter()
    for stack, n in stacks.items():
        frames = [f for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        self_time[frames[-1]] += n
        for f in set(frames):
            if is_fs_frame(f):
                fs_incl[f] += n
        buckets[bucket_of(frames)] += n
    share = {b: buckets[b] / total for b in BUCKETS if buckets[b]}
    return {"samples": total, "buckets": share,
            "self": [(f, n / total) for f, n in self_time.most_common(top)],
            "fs_inclusive": [(f, n / total) for f, n in fs_incl.most_common(top)]}


def format_profile(a: dict) -> str:
    wall_us = 1e6 / a["iops"] if a["iops"] else 0
    lines = [(f"py-spy profile of the {a['target']} daemon on {a['workload']}: {a['iops']:.0f} IOPS while sampled "
              f"(py-spy slows it), {wall_us:.1f} us of wall time per request, daemon CPU "
              f"{a['daemon_cpu_us_per_io'] or 0:.1f} us/IO; {a['samples']} samples at {PROFILE_RATE} Hz"),
             f"stacks: {a['stacks']}", "", "where the FUSE thread's wall time goes (share, us per request):"]
    for name, frac in a["buckets"].items():
        lines.append(f"  {100 * frac:5.1f}%  {frac * wall_us:6.1f} us  {name}")
    lines += ["", "leaf frames (self time):"]
    lines += [f"  {100 * frac:5.1f}%  {f}" for f, frac in a["self"]]
    lines += ["", "filesystem frames (inclusive time):"]
    lines += [f"  {100 * frac:5.1f}%  {f}" for f, frac in a["fs_inclusive"]]
    return "\n".join(lines) + "\n"
