"""Large shares (issue 13): listing 10,000 volumes, memory of 100 open 1 TiB volumes, and reads
through a 1000-deep chain. Not part of CI; run as root:

    .venv/bin/python bench/scale_bench.py                      # all three parts, ~10 min
    .venv/bin/python bench/scale_bench.py --parts listing --volumes 1000

Parts:

- ``listing``: shares of N volumes (1 GiB sparse raw files) built directly on a local disk
  (``WORKDIR/plain-N``), and the same N volumes with a ``.info`` and a 3-deep qcow2 chain each
  (``WORKDIR/chains-N``). For each: how long ``vfsnap mount -f`` takes to answer, then, each on a
  fresh mount, ``ls volumes/`` (cold: the first listing of the mount), ``ls -l volumes/`` and
  ``ls snapshots/``, and whether any sidecar appeared on the share (none may). These run with the
  share's files in the page cache (read once before: ``read_heads_s``, what reading the head of
  every file costs without vfsnap); ``ls_volumes_disk_cold_s`` is the first listing after
  ``drop_caches``, the disk's share of a truly cold start, reported for the record.
- ``memory``: 100 volumes of 1 TiB created through a mount (``-o volume_format=qcow2`` and raw),
  all open at once, each written and read (4 KiB, O_DIRECT) at 64 scattered offsets: the
  daemon's RSS idle after mounting, after the I/O, and its peak (VmHWM), with the default
  memory budget; and what `vfsnap status` reports of the budget.
- ``depth``: a 1 GiB raw base under 1 overlay and under 1000 overlays (each holding one cluster),
  default mount options: fio ``randread`` 4 KiB, psync, direct=1, alternating the two chains
  ``--reps`` times; the ratio of median IOPS (target >= 0.9), and the time the first open takes.

The machine the figures come from matters: on a shared 2-core machine, compare only the figures
of one run with each other. Results go to ``bench/results/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    FUSERMOUNT,
    PYTHON,
    ROOT,
    drop_caches,
    GiB,
    MiB,
    environment,
    fio,
    is_mounted,
    log,
    run,
    save_results,
    Workload,
)

DEFAULT_WORKDIR = Path("/var/tmp/vfsnap-scale")
TiB = 1 << 40
SIDECAR = ".vfsnap.json"


class Daemon:
    """`python -m vfsnap mount -f SHARE MNT`, timed until the mount answers."""

    def __init__(self, share: Path, mountpoint: Path, options: str = ""):
        self.share, self.mountpoint, self.options = share, mountpoint, options
        self.process: subprocess.Popen | None = None
        self.mount_seconds = 0.0

    def __enter__(self) -> "Daemon":
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        args = [PYTHON, "-m", "vfsnap", "mount", "-f"] + (["-o", self.options] if self.options else [])
        log_file = open(self.mountpoint.parent / "daemon.log", "ab")  # noqa: SIM115 - closed by the child's end
        t0 = time.monotonic()
        self.process = subprocess.Popen(args + [str(self.share), str(self.mountpoint)], stdout=log_file,
                                        stderr=subprocess.STDOUT, cwd=ROOT)
        log_file.close()
        while not is_mounted(self.mountpoint):
            if self.process.poll() is not None:
                raise RuntimeError(f"vfsnap exited with {self.process.returncode}")
            if time.monotonic() - t0 > 600:
                raise RuntimeError("vfsnap did not mount within 600 s")
            time.sleep(0.005)
        os.stat(self.mountpoint / "volumes")  # answers
        self.mount_seconds = time.monotonic() - t0
        return self

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        subprocess.run([FUSERMOUNT, "-u", str(self.mountpoint)], capture_output=True)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            subprocess.run([FUSERMOUNT, "-u", "-z", str(self.mountpoint)], capture_output=True)
            self.process.kill()
            self.process.wait()

    def rss(self) -> dict:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def timed(*args) -> float:
    t0 = time.monotonic()
    result = subprocess.run([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode:
        raise RuntimeError(f"{args} failed: {result.stderr.decode()}")
    return time.monotonic() - t0


# -- listing ---------------------------------------------------------------------------------------


def name_of(i: int) -> str:
    return f"volume-{i:06d}"


def overlay_templates(workdir: Path, depth: int) -> list[bytes]:
    """qcow2 overlays made by qemu-img for volume `name_of(0)`, level 1..depth: copied with the
    (same length) names patched, they give every volume its chain without 3N qemu-img runs."""
    tmp = workdir / "templates"
    tmp.mkdir(parents=True, exist_ok=True)
    base = name_of(0)
    out = []
    for level in range(1, depth + 1):
        backing, fmt = (base, "raw") if level == 1 else (f"{base}.s{level - 1}", "qcow2")
        path = tmp / f"{base}.s{level}"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", fmt, path, str(GiB))
        out.append(path.read_bytes())
    return out


def build_share(workdir: Path, volumes: int, chains: bool) -> Path:
    share = workdir / f"{'chains' if chains else 'plain'}-{volumes}"
    done = share.parent / f"{share.name}.done"
    if done.exists():
        return share
    log(f"building {share} ...")
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir(parents=True)
    templates = overlay_templates(workdir, 3) if chains else []
    for i in range(volumes):
        name = name_of(i)
        fd = os.open(share / name, os.O_CREAT | os.O_WRONLY, 0o644)
        os.ftruncate(fd, GiB)
        os.close(fd)
        if chains:
            for level, template in enumerate(templates, start=1):
                (share / f"{name}.s{level}").write_bytes(template.replace(name_of(0).encode(), name.encode()))
            info = {"active": f"{name}.s3", **{f"s{level}": f"{name}.s{level}" for level in (1, 2, 3)}}
            (share / f"{name}.info").write_text(json.dumps(info, indent=1, sort_keys=True))
    done.write_text("")
    return share


def sidecars(share: Path) -> int:
    return sum(1 for name in os.listdir(share) if name.endswith(SIDECAR))


def warm_page_cache(share: Path) -> float:
    """Read the head of every file of the share (what a listing reads: `.info` files, image
    headers), so that "cold" measures a fresh daemon, not the disk: on this machine the page
    cache loses files untouched for a few minutes, and a first listing then waits ~1 ms per file
    on the disk. Returns the seconds it took (the floor any reader of those files pays)."""
    t0 = time.monotonic()
    fd = os.open(share, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in os.listdir(fd):
            file_fd = os.open(name, os.O_RDONLY, dir_fd=fd)
            try:
                os.pread(file_fd, 4096, 0)
            finally:
                os.close(file_fd)
    finally:
        os.close(fd)
    return time.monotonic() - t0


def listing(workdir: Path, volumes: int) -> dict:
    results = {}
    mnt = workdir / "mnt"
    for chains in (False, True):
        share = build_share(workdir, volumes, chains)
        kind = "info+3-deep chain" if chains else "plain"
        before = sidecars(share)
        row: dict = {"volumes": volumes}
        # First with nothing of the share in the page cache (the disk's cost, for the record),
        # then the figures the targets are about: a fresh daemon over a share whose small files
        # the page cache holds, as on a share in use.
        drop_caches()
        with Daemon(share, mnt) as daemon:
            row["ls_volumes_disk_cold_s"] = timed("ls", mnt / "volumes")
        row["read_heads_s"] = warm_page_cache(share)
        with Daemon(share, mnt) as daemon:
            row["mount_s"] = daemon.mount_seconds
            row["ls_volumes_cold_s"] = timed("ls", mnt / "volumes")
            row["ls_volumes_warm_s"] = timed("ls", mnt / "volumes")
            listed = len(os.listdir(mnt / "volumes"))
        with Daemon(share, mnt) as daemon:
            row["ls_l_volumes_s"] = timed("ls", "-l", mnt / "volumes")
        with Daemon(share, mnt) as daemon:
            row["ls_snapshots_s"] = timed("ls", mnt / "snapshots")
            row["rss_after_listing"] = daemon.rss()["VmRSS"]
        row["listed"] = listed
        row["sidecars_written"] = sidecars(share) - before
        log(f"listing {kind}: {row}")
        results[kind] = row
    return results


# -- memory ----------------------------------------------------------------------------------------


def memory(workdir: Path, count: int, offsets: int, volume_format: str) -> dict:
    share = workdir / f"memory-{volume_format}"
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir(parents=True)
    mnt = workdir / "mnt"
    rng = random.Random(13)
    block = os.urandom(4096)
    # 100 TiB of thin volumes: past the share's oversubscription limit, which is not measured here.
    with Daemon(share, mnt, f"volume_format={volume_format},max_over_subscription_ratio=100000") as daemon:
        idle = daemon.rss()
        fds = []
        for i in range(count):
            path = mnt / "volumes" / f"v{i:03d}"
            with open(path, "wb") as f:
                f.truncate(TiB)
            fds.append(os.open(path, os.O_RDWR | os.O_DIRECT))
        after_open = daemon.rss()
        page = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
        page.write(block)
        places = {fd: sorted(rng.randrange(TiB // 4096) * 4096 for _ in range(offsets)) for fd in fds}
        for fd, where in places.items():
            for offset in where:
                os.pwritev(fd, [page], offset)
        for fd, where in places.items():
            for offset in where:
                got = mmap.mmap(-1, 4096)
                os.preadv(fd, [got], offset)
                if got[:] != block:
                    raise RuntimeError("read back something else")
                got.close()
        after_io = daemon.rss()
        status = json.loads(subprocess.run([PYTHON, "-m", "vfsnap", "status", "--json", str(mnt)], cwd=ROOT,
                                           capture_output=True, text=True, check=True).stdout)
        for fd in fds:
            os.close(fd)
    row = {"format": volume_format, "volumes": count, "offsets": offsets, "idle_rss": idle["VmRSS"],
           "open_rss": after_open["VmRSS"], "io_rss": after_io["VmRSS"], "peak_rss": after_io["VmHWM"],
           "budget": status.get("memory")}
    log(f"memory {volume_format}: RSS idle {idle['VmRSS'] / MiB:.1f} MiB, {count} open "
        f"{after_open['VmRSS'] / MiB:.1f} MiB, after I/O {after_io['VmRSS'] / MiB:.1f} MiB "
        f"(peak {after_io['VmHWM'] / MiB:.1f} MiB); budget {status.get('memory')}")
    shutil.rmtree(share, ignore_errors=True)
    return row


# -- depth -----------------------------------------------------------------------------------------


def build_deep(workdir: Path, depth: int) -> Path:
    share = workdir / f"depth-{depth}"
    done = share.parent / f"{share.name}.done"
    if done.exists():
        return share
    log(f"building a {depth}-deep chain in {share} ...")
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir(parents=True)
    base = share / "vol"
    run("qemu-img", "create", "-q", "-f", "raw", base, str(GiB))
    run("qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {64 * MiB}", base)
    names = ["vol"] + [f"vol.s{level:04d}" for level in range(1, depth + 1)]
    tmp = workdir / "templates-depth"
    tmp.mkdir(parents=True, exist_ok=True)
    first, later = tmp / "first", tmp / "later"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "vol", "-F", "raw", first, str(GiB))
    run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "vol.s0000", "-F", "qcow2", later, str(GiB))
    rng = random.Random(depth)
    for level in range(1, depth + 1):
        path = share / names[level]
        if level == 1:
            shutil.copyfile(first, path)
        else:
            path.write_bytes(later.read_bytes().replace(b"vol.s0000", names[level - 1].encode(), 1))
        # One cluster of data per overlay, somewhere: every level holds something.
        alone = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None})
        run("qemu-io", "-c", f"write -P {level % 250 + 1} {rng.randrange(GiB // 65536) * 65536} 65536", f"json:{alone}")
    info = {"active": names[-1], **{f"s{level:04d}": names[level] for level in range(1, depth + 1)}}
    (share / "vol.info").write_text(json.dumps(info, indent=1, sort_keys=True))
    done.write_text("")
    return share


class _Target:
    """What harness.fio needs of a target."""

    def __init__(self, daemon: Daemon, name: str):
        self.daemon, self.name = daemon, name
        self.mountpoint = daemon.mountpoint
        self.path = daemon.mountpoint / "volumes" / "vol"
        self.process = daemon.process
        self.pid = daemon.process.pid

    def log_tail(self) -> str:
        return ""


def depth(workdir: Path, deep: int, reps: int, runtime: float) -> dict:
    shares = {1: build_deep(workdir, 1), deep: build_deep(workdir, deep)}
    workload = Workload("randread-4k", "randread", 4096)
    iops: dict[int, list[float]] = {1: [], deep: []}
    first_open: dict[int, float] = {}
    for rep in range(reps):
        for level, share in shares.items():
            with Daemon(share, workdir / "mnt") as daemon:
                t0 = time.monotonic()
                fd = os.open(daemon.mountpoint / "volumes" / "vol", os.O_RDONLY)
                os.pread(fd, 4096, 0)
                first_open.setdefault(level, time.monotonic() - t0)
                # The first pass resolves the chain once per chunk of guest space (its cost
                # grows with the depth); what is compared is the cost per request after it.
                while os.read(fd, 1 << 20):
                    pass
                os.close(fd)
                result = fio(_Target(daemon, f"depth-{level}"), workload, runtime=runtime, disk_size=GiB, ramp=1)
                iops[level].append(result["iops"])
                log(f"depth {level} rep {rep + 1}: {result['iops']:.0f} IOPS")
    medians = {level: statistics.median(values) for level, values in iops.items()}
    row = {"iops": iops, "median_iops": medians, "ratio": medians[deep] / medians[1], "first_open_s": first_open}
    log(f"depth: median IOPS depth 1 {medians[1]:.0f}, depth {deep} {medians[deep]:.0f}, "
        f"ratio {row['ratio']:.2f}; first open+read {first_open}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--parts", default="listing,memory,depth")
    parser.add_argument("--volumes", type=int, default=10000, help="volumes of the listing shares")
    parser.add_argument("--open-volumes", type=int, default=100)
    parser.add_argument("--offsets", type=int, default=64)
    parser.add_argument("--formats", default="qcow2,raw", help="formats of the memory part")
    parser.add_argument("--depth", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=10.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("scale_bench: run as root (FUSE mounts, O_DIRECT on the mount)", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    document: dict = {"environment": environment(), "arguments": {k: str(v) for k, v in vars(args).items()}}
    if "listing" in parts:
        document["listing"] = listing(args.workdir, args.volumes)
    if "memory" in parts:
        document["memory"] = [memory(args.workdir, args.open_volumes, args.offsets, fmt)
                              for fmt in args.formats.split(",")]
    if "depth" in parts:
        document["depth"] = depth(args.workdir, args.depth, args.reps, args.runtime)
    path = save_results("scale", document)
    print(json.dumps({k: v for k, v in document.items() if k != "environment"}, indent=1, default=str))
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
