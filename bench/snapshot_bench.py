"""Snapshot benchmark (issue #4): mkdir latency, and rmdir merge throughput against QEMU.

    .venv/bin/python bench/snapshot_bench.py [--size 1G] [--mkdirs 40] [--fraction 0.25] [--reps 2]

- mkdir latency: `--mkdirs` snapshots of a mounted volume, one after another, with the volume
  idle and then with fio writing 4 KiB blocks to it (O_DIRECT, psync) the whole time. Median and
  p99 (the largest of fewer than 100) in milliseconds.
- merge throughput: a chain `vol` (raw) <- `vol.s1` <- `vol.s2` whose overlays hold `--fraction`
  of the disk each. Deleting snapshot s1 merges `vol.s1` down into `vol` and rebases `vol.s2`
  (what `qemu-img commit vol.s1 && qemu-img rebase -u -b vol -F raw vol.s2` does); deleting s2,
  the newest, merges the active image `vol.s2` into `vol.s1` (`qemu-img commit vol.s2`). Each
  run works on a fresh full copy of the chain; vfsnap's time is from `rmdir` until its status
  (the `.vfsnap` control file, read every 10 ms) shows no merge, QEMU's the commands' wall
  time plus the `rm` of the merged overlay that Cinder runs after them. Throughput = the overlay's allocated bytes / time;
  the ratio vfsnap/QEMU is the issue's target (>= 1.0). Afterwards every copy is checked to hold
  the same bytes as the other (`qemu-img compare`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    PYTHON,
    VOLUME,
    ChainSpec,
    VfsnapTarget,
    build_chain,
    environment,
    level_page_cache,
    log,
    parse_size,
    run,
)

from vfsnap.cli.main import read_status  # noqa: E402

WORKDIR = Path("/var/tmp/vfsnap-bench")


def full_copy(share: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in share.iterdir():
        if item.is_file():
            subprocess.run(["cp", "--sparse=always", str(item), str(dest / item.name)], check=True)
    # Both sides start alike: the copy stored (not written back during the merge), the page
    # cache dropped and the chain's files read once in full (see harness.level_page_cache).
    os.sync()
    level_page_cache(sorted(p for p in dest.iterdir() if p.is_file()))
    return dest


def allocated(image: Path) -> int:
    info = json.loads(run("qemu-img", "map", "-f", "qcow2", "--output=json", str(image)).stdout)
    return sum(e["length"] for e in info if e["depth"] == 0 and (e["data"] or e.get("zero")))


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def mkdir_latency(chain_share: Path, work: Path, count: int, *, writer: bool) -> dict:
    share = full_copy(chain_share, work / "share")
    target = VfsnapTarget(share, work / "mnt", work / "mkdir.log", options="log_level=warning")
    latencies = []
    with target:
        stop = threading.Event()
        fio = None
        if writer:
            fio = subprocess.Popen(
                ["fio", "--name=w", f"--filename={target.path}", "--rw=randwrite", "--bs=4k", "--direct=1",
                 "--ioengine=psync", "--time_based", "--runtime=600", "--size=256M", "--output=/dev/null"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        try:
            for i in range(count):
                path = target.mountpoint / "snapshots" / VOLUME / f"m{i}"
                t0 = time.perf_counter()
                path.mkdir()
                latencies.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.05)
        finally:
            stop.set()
            if fio is not None:
                fio.terminate()
                fio.wait(30)
    return {"writer": writer, "count": count, "median_ms": statistics.median(latencies),
            "p99_ms": percentile(latencies, 0.99), "max_ms": max(latencies), "all_ms": latencies}


def merge_vfsnap(chain_share: Path, work: Path, snapshot: str) -> float:
    share = full_copy(chain_share, work / "vfsnap")
    target = VfsnapTarget(share, work / "mnt", work / "merge.log", options="log_level=warning")
    with target:
        t0 = time.perf_counter()
        (target.mountpoint / "snapshots" / VOLUME / snapshot).rmdir()
        # Timed until the status shows no merge, looked at every 10 ms from here: starting
        # `vfsnap sync` (a Python process, about 75 ms) would be counted against vfsnap alone.
        while any(op.get("state") != "failed" for op in read_status(str(target.mountpoint)).get("operations", [])):
            time.sleep(0.01)
        elapsed = time.perf_counter() - t0
        # Untimed: `vfsnap sync` fails if the merge failed.
        subprocess.run([PYTHON, "-m", "vfsnap", "sync", str(target.mountpoint), "--timeout", "3600"], check=True)
        return elapsed


def merge_qemu(chain_share: Path, work: Path, snapshot: str) -> float:
    share = full_copy(chain_share, work / "qemu")
    t0 = time.perf_counter()
    if snapshot == "s1":
        run("qemu-img", "commit", "-q", "-f", "qcow2", str(share / f"{VOLUME}.s1"))
        run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", VOLUME, "-F", "raw", str(share / f"{VOLUME}.s2"))
    else:
        run("qemu-img", "commit", "-q", "-f", "qcow2", str(share / f"{VOLUME}.s2"))
    # Cinder then removes the merged overlay (`rm`), as vfsnap's deletion does: freeing a
    # 300 MiB file costs ext4 about 0.09 s here.
    os.unlink(share / f"{VOLUME}.{snapshot}")
    return time.perf_counter() - t0


def same_result(work: Path, snapshot: str) -> None:
    """vfsnap's merged chain and QEMU's hold the same live bytes."""
    vfsnap_top = work / "vfsnap" / (f"{VOLUME}.s2" if snapshot == "s1" else f"{VOLUME}.s1")
    qemu_top = work / "qemu" / (f"{VOLUME}.s2" if snapshot == "s1" else f"{VOLUME}.s1")
    result = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(vfsnap_top), str(qemu_top), check=False)
    if result.returncode != 0:
        raise RuntimeError(f"merged chains differ: {result.stdout}{result.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--mkdirs", type=int, default=40)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--workdir", default=str(WORKDIR))
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    size = parse_size(args.size)
    results: dict = {"environment": environment(), "mkdir": [], "merge": []}

    chain = build_chain(workdir, ChainSpec(size=size, depth=1, overlay_fraction=0.02, seed=7))
    for writer in (False, True):
        log(f"mkdir latency, writer={writer}")
        results["mkdir"].append(mkdir_latency(chain.share, workdir / "snapbench" / "mkdir", args.mkdirs, writer=writer))

    chain = build_chain(workdir, ChainSpec(size=size, depth=2, overlay_fraction=args.fraction, seed=11))
    for snapshot in ("s1", "s2"):
        overlay = chain.share / f"{VOLUME}.{snapshot}"
        data = allocated(overlay)
        for rep in range(args.reps):
            work = workdir / "snapbench" / f"merge-{snapshot}"
            log(f"merge of {snapshot} ({data / 2**20:.0f} MiB), run {rep + 1}")
            t_vfsnap = merge_vfsnap(chain.share, work, snapshot)
            t_qemu = merge_qemu(chain.share, work, snapshot)
            same_result(work, snapshot)
            results["merge"].append({"snapshot": snapshot, "bytes": data, "vfsnap_s": t_vfsnap, "qemu_s": t_qemu,
                                     "ratio": t_qemu / t_vfsnap})

    print()
    print(f"{'mkdir':<28} {'median ms':>10} {'p99 ms':>10} {'max ms':>10}")
    for r in results["mkdir"]:
        label = "with a 4k random writer" if r["writer"] else "idle volume"
        print(f"{label:<28} {r['median_ms']:>10.1f} {r['p99_ms']:>10.1f} {r['max_ms']:>10.1f}")
    print()
    print(f"{'merge (rmdir)':<28} {'MiB':>6} {'vfsnap MB/s':>12} {'qemu MB/s':>10} {'vfsnap/qemu':>12}")
    for snapshot in ("s1", "s2"):
        runs = [r for r in results["merge"] if r["snapshot"] == snapshot]
        data = runs[0]["bytes"]
        v = statistics.median(r["vfsnap_s"] for r in runs)
        q = statistics.median(r["qemu_s"] for r in runs)
        label = "oldest (commit + rebase)" if snapshot == "s1" else "newest (active commit)"
        print(f"{label:<28} {data / 2**20:>6.0f} {data / v / 1e6:>12.1f} {data / q / 1e6:>10.1f} {q / v:>12.2f}")
    out = Path(__file__).resolve().parent / "results" / f"snapshot-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
