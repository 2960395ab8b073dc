"""Share benchmark (issue 12): vfsnap against qemu-storage-daemon over a real GlusterFS volume.

    .venv/bin/python bench/share_bench.py [--size 512M] [--depth 4] [--runtime 5] [--reps 3]

A single-brick GlusterFS volume on this host (made here, as tests/gluster.py makes the tests'
ones: client-side caches off) is mounted the way vfsnap mounts GlusterFS shares
(`attribute-timeout=0,entry-timeout=0,negative-timeout=0,direct-io-mode=enable`), and a chain
(`bench/harness.py`: raw base with random data, `--depth` qcow2 overlays with scattered writes)
is copied onto it. Then, alternating between the targets, each run on a fresh mount:

- vfsnap: `vfsnap mount -f <gluster mount> MNT`, file `MNT/volumes/vol` (a network share: its
  I/O goes to the share's worker threads, vfsnap/share/io.py);
- qsd: `qemu-storage-daemon` with a FUSE export of the chain's top image on the same mount;
- ceiling, ceiling-threads: bench/passthrough.py, the bare pyfuse3 passthrough, serving a flat raw
  copy of the chain on the same mount (`qemu-img convert`). `ceiling` calls pread/pwrite on the
  loop, one request at a time; `ceiling-threads` hands each call to one of 16 threads the way
  vfsnap does (`ShareIO.run`), so that requests are in flight together. They are what a Python FUSE filesystem can do at most on this share:
  no map, no copy-on-write (their writes go straight into the flat file).
- ceiling-raw: bench/raw_passthrough.py, the same passthrough without pyfuse3, libfuse or trio:
  16 threads each read a request from /dev/fuse, make the call and write the reply, as
  libfuse's multi-threaded loop does. What is left of the gap to qsd is Python's own cost per
  request, not pyfuse3's loop.

Workloads (fio, psync, O_DIRECT, `numjobs` jobs of one request each on the one file):

- randread-4k at 1, 4 and 16 jobs, and seqread-1M at 1;
- randwrite-4k-cow at 1 and 4 jobs and seqwrite-1M at 1, each into a fresh empty overlay over
  the chain (vfsnap: `mkdir MNT/snapshots/vol/<snap>`, the way a user snapshots; qsd: `qemu-img
  create -b <top>` and a writable export of it), with `end_fsync=1`; afterwards the overlay is
  removed and the chain is as before.

Prints the medians and vfsnap/qsd, vfsnap/best ceiling and best ceiling/qsd per workload; the JSON
goes to bench/results/share-*.json. `--targets` picks the targets (default all five).
The machine may be busy: compare the ratios of one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness as h
from harness import KiB, MiB

FLAT = "flat.raw"  # the ceilings' copy of the chain
TARGETS = ("vfsnap", "qsd", "ceiling", "ceiling-threads", "ceiling-raw")
GLUSTER_OPTIONS = "attribute-timeout=0,entry-timeout=0,negative-timeout=0,direct-io-mode=enable"
READS = [("randread-4k", "randread", 4 * KiB, 1), ("randread-4k", "randread", 4 * KiB, 4),
         ("randread-4k", "randread", 4 * KiB, 16), ("seqread-1M", "read", MiB, 1)]
WRITES = [("randwrite-4k-cow", "randwrite", 4 * KiB, 1), ("randwrite-4k-cow", "randwrite", 4 * KiB, 4),
          ("seqwrite-1M", "write", MiB, 1)]


def fio_jobs(path: Path, rw: str, bs: int, jobs: int, *, runtime: float, size: int, end_fsync: bool) -> dict:
    args = ["fio", "--name=share", f"--filename={path}", "--ioengine=psync", "--direct=1", f"--numjobs={jobs}",
            "--iodepth=1", f"--bs={bs}", f"--rw={rw}", f"--size={size}", f"--runtime={int(runtime * 1000)}ms",
            "--time_based", "--group_reporting", "--allow_file_create=0", "--output-format=json",
            "--randrepeat=1", "--norandommap"]
    if end_fsync:
        args.append("--end_fsync=1")
    if rw == "write" and jobs > 1:
        args.append("--offset_increment=" + str(size // jobs))
    result = h.run(*args, check=False)
    job = h.fio_job(result, f"fio on {path}")
    side = job["write" if "write" in rw else "read"]
    return {"iops": side["iops"], "MBps": side["bw_bytes"] / 1e6, "clat_mean_us": side["clat_ns"]["mean"] / 1000}


class GlusterShare:
    """A single-brick volume of this host, mounted as vfsnap mounts GlusterFS shares."""

    def __init__(self, workdir: Path):
        from tests import gluster

        self.gluster = gluster
        gluster.ensure_installed()
        gluster.ensure_glusterd(workdir / "glusterd.pid")
        self.name = f"vfsnap-bench-{os.getpid()}"
        brick_root = workdir / "gluster"
        if brick_root.exists():
            shutil.rmtree(brick_root)
        brick_root.mkdir(parents=True)
        self.volume = gluster.create_volume(brick_root, name=self.name)
        self.path = workdir / "share"
        self.path.mkdir(exist_ok=True)
        h.run("mount", "-t", "glusterfs", "-o", GLUSTER_OPTIONS, self.volume.spec, str(self.path))

    def close(self) -> None:
        self.gluster.remove_volume(self.name)


def copy_onto(chain: h.Chain, share: Path) -> None:
    for name in chain.names:
        h.log(f"copying {name} onto the GlusterFS share")
        shutil.copyfile(chain.share / name, share / name)
    if (chain.share / f"{h.VOLUME}.info").exists():
        shutil.copyfile(chain.share / f"{h.VOLUME}.info", share / f"{h.VOLUME}.info")
    os.sync()


def snapshot_state(share: Path) -> dict[str, bytes]:
    """`.info` and vfsnap's sidecar of the volume, as they are before a writing run."""
    return {name: (share / name).read_bytes() for name in (f"{h.VOLUME}.info", f"{h.VOLUME}.vfsnap.json")
            if (share / name).exists()}


def restore(share: Path, names: list[str], saved: dict[str, bytes]) -> None:
    """Remove the overlay a writing run added, put `.info` and the sidecar back."""
    for p in share.iterdir():
        if p.name.startswith(f"{h.VOLUME}.bench"):
            p.unlink()
    for name, data in saved.items():
        (share / name).write_bytes(data)


def run_one(kind: str, workload: tuple, chain: h.Chain, share: Path, workdir: Path, args, serial: int) -> dict:
    name, rw, bs, jobs = workload
    writing = "write" in rw
    logs = workdir / "logs"
    top = share / chain.names[-1]
    saved = snapshot_state(share)
    overlay = None
    if kind == "vfsnap":
        target = h.VfsnapTarget(share, workdir / "mnt", logs / "vfsnap.log", args.vfsnap_options)
    elif kind.startswith("ceiling"):
        target = h.CeilingTarget(share / FLAT, workdir / "mnt", logs / f"{kind}.log",
                                 threads=16 if kind in ("ceiling-threads", "ceiling-raw") else 0,
                                 raw=kind == "ceiling-raw")
    else:
        file = top
        if writing:
            overlay = share / f"{h.VOLUME}.bench{serial}"
            h.run("qemu-img", "create", "-q", "-f", "qcow2", "-b", top.name, "-F", "qcow2", overlay, chain.spec.size)
            file = overlay
        target = h.QsdTarget(file, "qcow2", workdir / "export.raw", logs / "qsd.log", writable=writing)
    try:
        with target:
            if kind == "vfsnap" and writing:
                os.mkdir(target.mountpoint / "snapshots" / h.VOLUME / f"bench{serial}")
            size = chain.spec.size
            result = fio_jobs(target.path, rw, bs, jobs, runtime=args.runtime, size=size, end_fsync=writing)
            errors = h.log_errors(target)
            if errors:
                raise RuntimeError(f"{kind} logged errors: {errors[:5]}")
    finally:
        if writing and not kind.startswith("ceiling"):
            restore(share, chain.names, saved)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512M")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--runtime", type=float, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workloads", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/vfsnap-share-bench"))
    parser.add_argument("--vfsnap-options", default="")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    h.exit_on_signals()
    h.check_tools("fio", "qemu-img", "qemu-storage-daemon", h.FUSERMOUNT)
    args.workdir.mkdir(parents=True, exist_ok=True)
    spec = h.ChainSpec(size=h.parse_size(args.size), depth=args.depth)
    chain = h.build_chain(args.workdir, spec)
    targets = h.split_list(args.targets, TARGETS, "target")
    wanted = None if args.workloads is None else set(args.workloads.split(","))
    workloads = [w for w in READS + WRITES if wanted is None or w[0] in wanted]
    started = time.time()
    document = {"kind": "share", "argv": sys.argv, "started": time.ctime(started), "env": h.environment(),
                "params": {"size": spec.size, "depth": spec.depth, "runtime": args.runtime, "reps": args.reps,
                           "gluster_mount_options": GLUSTER_OPTIONS}, "runs": []}
    share = GlusterShare(args.workdir)
    try:
        copy_onto(chain, share.path)
        if any(t.startswith("ceiling") for t in targets):
            h.log("writing the ceilings' flat copy onto the GlusterFS share")
            h.run("qemu-img", "convert", "-O", "raw", chain.top, share.path / FLAT)
        with h.started([h.VfsnapTarget(share.path, args.workdir / "mnt", args.workdir / "logs" / "vfsnap.log")]) as (t,):
            h.verify(t.path, chain)  # vfsnap serves the chain's bytes (and records the volume)
        serial = 0
        for workload in workloads:
            for rep in range(args.reps):
                for kind in targets if rep % 2 == 0 else targets[::-1]:  # alternated
                    serial += 1
                    result = run_one(kind, workload, chain, share.path, args.workdir, args, serial)
                    result.update(workload=workload[0], jobs=workload[3], target=kind, rep=rep)
                    document["runs"].append(result)
                    h.log(f"{workload[0]} x{workload[3]} {kind}: {result['iops']:.0f} IOPS {result['MBps']:.1f} MB/s")
    finally:
        share.close()
    ceilings = [t for t in targets if t.startswith("ceiling")]
    lines = [f"share benchmark: GlusterFS on localhost ({GLUSTER_OPTIONS}), {h.human(spec.size)} disk, "
             f"depth {spec.depth}, fio psync direct=1, {args.runtime:g} s per run, median of {args.reps}; "
             f"load average at the end {os.getloadavg()[0]:.1f} (a busy machine: compare the ratios)",
             f"{'workload':<18} {'jobs':>4} " + " ".join(f"{t + ' IOPS':>20}" for t in targets)
             + f" {'vfsnap/qsd':>10} {'vfsnap/ceil':>11} {'ceil/qsd':>8}"]
    summary = {}
    for name, _, _, jobs in workloads:
        med = {}
        for kind in targets:
            runs = [r for r in document["runs"] if r["workload"] == name and r["jobs"] == jobs and r["target"] == kind]
            med[kind] = {k: statistics.median(r[k] for r in runs) for k in ("iops", "MBps")} if runs else None
        mbps = {t: med[t]["MBps"] for t in targets if med[t]}
        best = max((mbps[t] for t in ceilings if t in mbps), default=None)

        def ratio(a, b):
            return a / b if a and b else None

        vfsnap, qsd = mbps.get("vfsnap"), mbps.get("qsd")
        row = {"vfsnap/qsd": ratio(vfsnap, qsd), "vfsnap/ceiling": ratio(vfsnap, best), "ceiling/qsd": ratio(best, qsd)}
        summary[f"{name} x{jobs}"] = {**med, **row}
        lines.append(f"{name:<18} {jobs:>4} " + " ".join(f"{med[t]['iops']:>20.0f}" for t in targets) + " "
                     + " ".join(f"{'-' if v is None else f'{v:.2f}':>{w}}" for v, w in zip(row.values(), (10, 11, 8))))
    text = "\n".join(lines)
    print(text)
    document.update(summary=summary, table=text, seconds=round(time.time() - started, 1))
    path = h.save_results("share", document, args.output)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
