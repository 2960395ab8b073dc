"""Read benchmark (issue #2): vfsnap against qemu-storage-daemon and a bare pyfuse3 passthrough.

    .venv/bin/python bench/read_bench.py [--runtime 3] [--ramp 1] [--reps 3] [--depths 1,32] [--size 1G]
                                         [--drop-caches] [--profile py-spy|cprofile]

For each chain depth it builds (or reuses) a chain under /var/tmp/vfsnap-bench, mounts the three
targets over it side by side, checks that each serves exactly the bytes `qemu-img convert -O raw`
gives for the whole disk (that pass is also the warm-up: host page cache, QEMU's qcow2 caches,
vfsnap's resolved maps) and measures what a fresh open costs (one 4 KiB read per MiB of the disk
right after open, then again), then runs every workload on the targets in turn (vfsnap, qsd,
ceiling, vfsnap, ...) `--reps` times, each fio run with a `--ramp` that is not counted, and
reports medians. Results go to bench/results/read-*.json;
`--profile py-spy` then samples the vfsnap daemon and the passthrough on randread-4k.
"""

from __future__ import annotations

import argparse
import io
import mmap
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h
import profiling
from harness import KiB, MiB, Workload

WORKLOADS = [
    Workload("seqread-1M", "read", MiB),
    Workload("seqread-128k", "read", 128 * KiB),
    Workload("randread-4k", "randread", 4 * KiB),
]
GOALS = {(1, "vfsnap/qsd"): 1.0, (32, "vfsnap/qsd"): 1.25,
         (1, "vfsnap/ceiling"): 0.9, (32, "vfsnap/ceiling"): 0.9}


def make_targets(chain: h.Chain, names: list[str], workdir: Path, depth: int, vfsnap_options: str,
                 cprofile: Path | None = None) -> list[h.Target]:
    mdir = workdir / "mnt" / f"read-d{depth}"
    logs = workdir / "logs"
    targets: list[h.Target] = []
    for name in names:
        if name == "vfsnap":
            targets.append(h.VfsnapTarget(chain.share, mdir / "vfsnap", logs / f"read-d{depth}-vfsnap.log",
                                          vfsnap_options, cprofile=cprofile))
        elif name == "qsd":
            targets.append(h.QsdTarget(chain.top, chain.top_format, mdir / "qsd.raw",
                                       logs / f"read-d{depth}-qsd.log", writable=False))
        elif name in ("ceiling", "ceiling-xattr"):
            targets.append(h.CeilingTarget(chain.flat, mdir / name, logs / f"read-d{depth}-{name}.log",
                                           xattr=name == "ceiling-xattr"))
    return targets


def warm_up(target: h.Target, size: int) -> None:
    """One sequential pass over the whole disk: page cache, qcow2 caches and vfsnap's maps warm."""
    h.fio(target, Workload("warmup", "read", MiB, time_based=False), runtime=300, disk_size=size)


def reopen_cost(target: h.Target, size: int, stride: int = MiB) -> dict:
    """One 4 KiB O_DIRECT read per `stride` of the disk right after open, then the same again:
    the first pass also pays what the target does per open (vfsnap revalidates the active image
    and resolves its maps anew), the second is the warm reference."""
    buf = mmap.mmap(-1, 4 * KiB)
    fd = os.open(target.path, os.O_RDONLY | os.O_DIRECT)
    try:
        passes = []
        for _ in range(2):
            t0 = time.perf_counter()
            for offset in range(0, size, stride):
                os.preadv(fd, [buf], offset)
            passes.append((time.perf_counter() - t0) * 1e3)
    finally:
        os.close(fd)
        buf.close()
    return {"reads": size // stride, "first_ms": passes[0], "second_ms": passes[1],
            "open_cost_ms": passes[0] - passes[1]}


def measure_reopen(targets: list[h.Target], size: int, depth: int, reps: int) -> dict:
    """Median of `reps` reopen_cost runs per target, targets alternating."""
    samples: dict[str, list[dict]] = {t.name: [] for t in targets}
    for _ in range(max(1, reps)):
        for t in targets:
            samples[t.name].append(reopen_cost(t, size))
    out = {}
    for name, runs in samples.items():
        out[name] = {k: h.median_of(runs, k) for k in ("first_ms", "second_ms", "open_cost_ms")}
        out[name]["reads"] = runs[0]["reads"]
        h.log(f"depth {depth}: {name:<8} after open: {out[name]['first_ms']:7.1f} ms for one 4 KiB read per MiB "
              f"({out[name]['reads']} reads), then {out[name]['second_ms']:7.1f} ms again")
    return out


def print_reopen(reopen: dict) -> str:
    if not reopen:
        return ""
    lines = ["cost of an open: ms for one 4 KiB read per MiB right after open / the same again (median)"]
    for depth, targets in reopen.items():
        row = "  ".join(f"{name} {e['first_ms']:.0f} / {e['second_ms']:.0f}" for name, e in targets.items())
        lines.append(f"{depth:>5}  {row}")
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def verify_and_warm_up(targets: list[h.Target], chain: h.Chain, depth: int, full: bool) -> None:
    """Check every target against `qemu-img convert`; the full check (O_DIRECT reads of the whole
    disk) doubles as the warm-up: host page cache, QEMU's qcow2 caches, vfsnap's resolved maps."""
    for t in targets:
        h.verify(t.path, chain, full=full)
        what = "the whole disk" if full else "the first 64 MiB and the last 16 MiB"
        h.log(f"depth {depth}: {t.name} serves the bytes of qemu-img convert ({what}; {t.path})")
        if not full:
            warm_up(t, chain.spec.size)


# -- profiling ------------------------------------------------------------------------------


def profile_cprofile(chain: h.Chain, workdir: Path, depth: int, workload: Workload, args, out: Path) -> str:
    """Run a separate vfsnap mount under cProfile (full verification pass + the workload)."""
    prof = out.with_suffix(".prof")
    targets = make_targets(chain, ["vfsnap"], workdir, depth, args.vfsnap_options, cprofile=prof)
    with h.started(targets) as (target,):
        h.verify(target.path, chain, full=True)
        h.fio(target, workload, runtime=args.runtime, disk_size=chain.spec.size, ramp=args.ramp)
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)
    report = (f"cProfile of a vfsnap mount that read the whole disk once, then ran {workload.name} "
              f"({args.runtime:g} s); {prof}\n{buf.getvalue()}")
    out.write_text(report)
    return report


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    h.common_arguments(parser, runtime=3, reps=3, ramp=1)
    parser.add_argument("--profile", choices=["py-spy", "cprofile"], default=None,
                        help="after measuring, profile the vfsnap daemon (py-spy: and the passthrough)")
    parser.add_argument("--profile-workload", default="randread-4k", choices=[w.name for w in WORKLOADS],
                        help="workload run while profiling (default randread-4k)")
    parser.add_argument("--quick-verify", action="store_true",
                        help="compare only the first 64 MiB and the last 16 MiB of each target with the "
                             "oracle, not the whole disk (which is also the warm-up)")
    args = parser.parse_args(argv)

    h.exit_on_signals()
    h.check_tools("fio", "qemu-img", "qemu-io", "qemu-storage-daemon", h.FUSERMOUNT)
    h.check_workdir(args.workdir)
    size = h.parse_size(args.size)
    depths = [int(d) for d in args.depths.split(",")]
    names = h.split_list(args.targets, h.TARGETS, "targets")
    workloads = [w for w in WORKLOADS
                 if args.workloads is None or w.name in h.split_list(args.workloads, [x.name for x in WORKLOADS],
                                                                      "workloads")]
    started_at = time.time()
    document = {"kind": "read", "argv": sys.argv, "started": time.ctime(started_at), "env": h.environment(),
                "params": {"size": size, "depths": depths, "runtime": args.runtime, "reps": args.reps,
                           "targets": names, "workloads": [w.name for w in workloads],
                           "drop_caches": args.drop_caches, "overlay_fraction": args.overlay_fraction,
                           "fio": "psync, direct=1, numjobs=1, iodepth=1, time_based"},
                "chains": {}, "runs": [], "profiles": {}}
    runs = document["runs"]
    errors = 0
    try:
        for depth in depths:
            errors += measure_depth(depth, size, names, workloads, args, document)
    except (Exception, KeyboardInterrupt) as exc:
        document["aborted"] = repr(exc)
        h.log(f"ABORTED: {exc!r}; saving what was measured")
        errors += 1
        raise
    finally:
        summary = h.summarize(runs)
        ratio = h.ratios(summary)
        document.update(summary=summary, ratios=ratio, errors=errors, seconds=round(time.time() - started_at, 1))
        document["env"]["loadavg_end"] = os.getloadavg()
        print()
        print(f"read benchmark: {h.human(size)} disk, fio psync direct=1 QD1, {args.runtime:g} s per run, "
              f"median of {args.reps}; MB/s = 10^6 B/s; lat = mean completion latency; "
              f"cpu us/io = the daemon's CPU time per request")
        document["table"] = h.print_table(summary, ratio, [w.name for w in workloads], depths, names, goals=GOALS)
        document["table"] += print_reopen(document.get("reopen", {}))
        path = h.save_results("read", document, args.output)
        print(f"results: {path}  ({document['seconds']:.0f} s)" + (f"; {errors} FAILED" if errors else ""))
    return 1 if errors else 0


def measure_depth(depth: int, size: int, names: list[str], workloads: list[Workload], args, document: dict) -> int:
    """Build the chain of `depth`, mount the targets, verify, warm up, measure; the number of failed runs."""
    errors = 0
    spec = h.ChainSpec(size=size, depth=depth, overlay_fraction=args.overlay_fraction)
    chain = h.build_chain(args.workdir, spec, rebuild=args.rebuild)
    document["chains"][str(depth)] = {"key": spec.key, "share": str(chain.share), "flat": str(chain.flat),
                                      "samples": chain.samples}
    targets = make_targets(chain, names, args.workdir, depth, args.vfsnap_options)
    h.level_page_cache([chain.share / name for name in chain.names] + [chain.flat])
    with h.started(targets):
        verify_and_warm_up(targets, chain, depth, full=not args.quick_verify)
        document.setdefault("reopen", {})[str(depth)] = measure_reopen(targets, size, depth, args.reps)
        for rep in range(args.reps):
            for wl in workloads:
                for t in targets:
                    record = {"depth": depth, "workload": wl.name, "target": t.name, "rep": rep}
                    try:
                        if args.drop_caches:
                            h.drop_caches()
                        r = h.fio(t, wl, runtime=args.runtime, disk_size=size, ramp=args.ramp)
                        record.update(r)
                        h.log(f"depth {depth} rep {rep} {wl.name:<13} {t.name:<8} {r['MBps']:9.1f} MB/s "
                              f"{r['iops']:9.0f} IOPS  daemon {r.get('daemon_cpu_us_per_io', 0):6.1f} us/IO")
                    except RuntimeError as exc:
                        errors += 1
                        record["error"] = str(exc)
                        h.log(f"depth {depth} rep {rep} {wl.name} {t.name}: FAILED {exc}")
                    document["runs"].append(record)
        if args.profile == "py-spy":
            # vfsnap, and the passthrough for comparison: what pyfuse3 costs by itself.
            h.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for t in targets:
                if t.name not in ("vfsnap", "ceiling"):
                    continue
                out = h.RESULTS_DIR / f"profile-read-d{depth}-{t.name}-{args.profile_workload}-{stamp}.txt"
                workload = next(w for w in WORKLOADS if w.name == args.profile_workload)
                analysis = profiling.profile_pyspy(t, workload, max(args.runtime, 5), size, out, ramp=args.ramp)
                document["profiles"].setdefault(str(depth), {})[t.name] = {**analysis, "report": str(out)}
                print(f"\n== depth {depth}: " + out.read_text())
    for t in targets:
        bad = h.log_errors(t)
        if bad:
            h.log(f"depth {depth}: {t.name} logged errors (see {t.log_path}):\n  " + "\n  ".join(bad[:10]))
            document.setdefault("daemon_errors", {})[f"{depth}/{t.name}"] = bad[:50]
    if args.profile == "cprofile":
        h.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = h.RESULTS_DIR / f"profile-read-d{depth}-vfsnap-{args.profile_workload}-{stamp}.txt"
        workload = next(w for w in WORKLOADS if w.name == args.profile_workload)
        report = profile_cprofile(chain, args.workdir, depth, workload, args, out)
        document["profiles"][str(depth)] = {"vfsnap": {"report": str(out)}}
        print(f"\n== depth {depth}: {report}")
    return errors


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc})", file=sys.stderr)
        sys.exit(130)
