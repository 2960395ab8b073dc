"""Write benchmark (issue #3): vfsnap against qemu-storage-daemon (writable=on) and a bare pyfuse3
passthrough.

    .venv/bin/python bench/write_bench.py [--runtime 4] [--reps 3] [--depths 1,32] [--size 1G]

The chain of each depth has a top (active) overlay whose first quarter is allocated and whose
rest is empty. Every run gets a fresh copy of it (top image and .info copied, the read-only
images below hard-linked; the ceiling gets a fresh copy of the flattened raw file), a fresh
mount, the same page cache (dropped, then the read-only images below the top read once in full;
`--drop-caches`: dropped only), a check that the target serves the bytes of `qemu-img convert`, one fio job with
`end_fsync=1` (the time to make the writes durable counts), an unmount and a `qemu-img check`
of the written top image. Workloads:

- seqwrite-1M:        1 MiB sequential writes over the empty three quarters (whole clusters:
                      allocation, no copy-on-write); one pass or --runtime, whichever ends first;
- randwrite-4k-cow:   4 KiB writes, each into a different empty cluster of the top overlay, at a
                      random 4 KiB position in it (allocation + copy-on-write from the backing
                      chain); an iolog replayed identically on every target, capped at --runtime;
- randwrite-4k-alloc: 4 KiB random writes into the allocated first quarter, for --runtime.

Before measuring, each depth runs the same deterministic writes of all three kinds through every
target (each 4 KiB block holds its own offset; fio reads them back through the target), then
`qemu-img compare`s the targets' disks: vfsnap must hold exactly what QEMU and the raw
passthrough hold (--no-write-check skips this). `--profile py-spy` then samples vfsnap and the
passthrough on the 4 KiB writes.

Until vfsnap supports writes (opening volumes/<vol> for writing gives EROFS), vfsnap is reported
as "unsupported (EROFS)" and the others are still measured.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h
import profiling
from harness import KiB, MiB, Workload

WORKLOAD_NAMES = ["seqwrite-1M", "randwrite-4k-cow", "randwrite-4k-alloc"]


def cow_offsets(chain: h.Chain) -> list[int]:
    """Every empty cluster of the top overlay once, in random order, at a random 4 KiB position."""
    spec = chain.spec
    cluster = spec.cluster_size
    rng = random.Random(spec.seed + 77)
    clusters = list(range(spec.top_allocated // cluster, spec.size // cluster))
    rng.shuffle(clusters)
    return [c * cluster + rng.randrange(cluster // (4 * KiB)) * 4 * KiB for c in clusters]


def workloads_for(chain: h.Chain, workdir: Path) -> list[Workload]:
    spec = chain.spec
    alloc = spec.top_allocated
    (workdir / "iologs").mkdir(parents=True, exist_ok=True)
    iolog = h.write_replay_log(workdir / "iologs" / f"cow-{spec.key}.log", cow_offsets(chain), 4 * KiB)
    return [
        Workload("seqwrite-1M", "write", MiB, time_based=False, offset=alloc, end_fsync=True),
        Workload("randwrite-4k-cow", "replay", 4 * KiB, time_based=False, iolog=iolog, end_fsync=True),
        Workload("randwrite-4k-alloc", "randwrite", 4 * KiB, time_based=True, offset=0, size=alloc,
                 end_fsync=True),
    ]


def check_workloads(chain: h.Chain, workdir: Path) -> list[Workload]:
    """Deterministic writes of every kind, each 4 KiB block holding its own offset (fio verify
    pattern %o), read back and verified by fio through the target itself."""
    spec = chain.spec
    alloc = spec.top_allocated
    iolog = h.write_replay_log(workdir / "iologs" / f"cow-check-{spec.key}.log", cow_offsets(chain)[:1024], 4 * KiB)
    verify = ("--verify=pattern", "--verify_pattern=%o", "--do_verify=1")
    return [
        Workload("check-cow", "replay", 4 * KiB, time_based=False, iolog=iolog, end_fsync=True,
                 extra=("--verify=pattern", "--verify_pattern=%o", "--do_verify=0")),
        Workload("check-seq", "write", MiB, time_based=False, offset=alloc, size=min(16 * MiB, spec.size - alloc),
                 end_fsync=True, extra=verify),
        Workload("check-alloc", "randwrite", 4 * KiB, time_based=False, offset=0, size=alloc, end_fsync=True,
                 extra=verify + ("--number_ios=2000",)),
    ]


def write_check(chain: h.Chain, names: list[str], workdir: Path, depth: int, args) -> dict[str, str]:
    """Run the same deterministic writes on every target, then compare the whole disks with
    `qemu-img compare` (which reads qcow2 chains the QEMU way): vfsnap must hold exactly what QEMU
    and the raw passthrough hold. Returns the verdict per target; raises on a difference."""
    images: dict[str, tuple[Path, str]] = {}
    try:
        for name in names:
            target = fresh_target(name, chain, workdir, depth, args.vfsnap_options)
            with target:
                h.verify(target.path, chain)
                for wl in check_workloads(chain, workdir):
                    h.fio(target, wl, runtime=120, disk_size=chain.spec.size)
            check_image(target)
            copy = getattr(target, "copy", None)
            images[name] = (copy.top, copy.top_format) if copy else (target.image, "raw")
        verdicts: dict[str, str] = {}
        reference = next((n for n in ("ceiling", "ceiling-xattr", "qsd") if n in images), None)
        for name, (image, fmt) in images.items():
            if name == reference:
                continue
            ref_image, ref_fmt = images[reference]
            result = h.run("qemu-img", "compare", "-f", fmt, "-F", ref_fmt, image, ref_image, check=False)
            verdicts[name] = f"identical to {reference}" if result.returncode == 0 else \
                (result.stdout + result.stderr).strip()
        bad = {n: v for n, v in verdicts.items() if not v.startswith("identical")}
        if bad:
            raise RuntimeError(f"depth {depth}: the targets hold different bytes after the same writes: {bad}")
        h.log(f"depth {depth}: after the same writes, {', '.join(images)} hold identical disks (qemu-img compare)")
        return verdicts
    finally:
        for name in names:
            shutil.rmtree(workdir / "runs" / f"write-d{depth}-{name}", ignore_errors=True)


def fresh_target(name: str, chain: h.Chain, workdir: Path, depth: int, vfsnap_options: str) -> h.Target:
    """A target over its own fresh copy of the chain (not started)."""
    rdir = workdir / "runs" / f"write-d{depth}-{name}"
    logs = workdir / "logs"
    if name in ("ceiling", "ceiling-xattr"):
        if rdir.exists():
            shutil.rmtree(rdir)
        rdir.mkdir(parents=True)
        image = rdir / "flat.raw"
        shutil.copyfile(chain.flat, image)
        return h.CeilingTarget(image, rdir / "mnt", logs / f"write-d{depth}-{name}.log",
                               xattr=name == "ceiling-xattr")
    copy = h.copy_chain(chain, rdir)
    if name == "vfsnap":
        target = h.VfsnapTarget(copy.share, rdir / "mnt", logs / f"write-d{depth}-vfsnap.log", vfsnap_options)
    else:
        target = h.QsdTarget(copy.top, copy.top_format, rdir / "export.raw", logs / f"write-d{depth}-qsd.log",
                             writable=True)
    target.copy = copy  # type: ignore[attr-defined]
    return target


def vfsnap_write_support(chain: h.Chain, workdir: Path, depth: int, options: str) -> str | None:
    """None if vfsnap lets volumes/<vol> be opened for writing, else why not."""
    target = fresh_target("vfsnap", chain, workdir, depth, options)
    with target:
        h.verify(target.path, chain)
        try:
            fd = os.open(target.path, os.O_WRONLY | os.O_DIRECT)
        except OSError as exc:
            return f"unsupported ({errno.errorcode.get(exc.errno, exc.errno)})"
        os.close(fd)
    return None


def check_image(target: h.Target) -> dict | None:
    copy = getattr(target, "copy", None)
    if copy is None or copy.top_format != "qcow2":
        return None
    result = h.run("qemu-img", "check", "--output=json", copy.top, check=False)
    doc = json.loads(result.stdout) if result.stdout.strip() else {}
    out = {"exit": result.returncode, "corruptions": doc.get("corruptions", 0), "leaks": doc.get("leaks", 0)}
    if result.returncode not in (0, 3):  # 3: leaked clusters only
        raise RuntimeError(f"qemu-img check of {copy.top} after {target.name}: {result.stdout}{result.stderr}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    h.common_arguments(parser, runtime=4, reps=3, ramp=0)
    parser.add_argument("--allocated", type=float, default=0.25,
                        help="share of the top overlay allocated before writing (default 0.25)")
    parser.add_argument("--profile", choices=["py-spy"], default=None,
                        help="after measuring, profile the vfsnap daemon and the passthrough with py-spy")
    parser.add_argument("--profile-workloads", default="randwrite-4k-alloc,randwrite-4k-cow",
                        help="workloads run while profiling (default randwrite-4k-alloc,randwrite-4k-cow)")
    parser.add_argument("--no-write-check", action="store_true",
                        help="skip the check that every target holds the same bytes after the same writes")
    args = parser.parse_args(argv)

    h.exit_on_signals()
    h.check_tools("fio", "qemu-img", "qemu-io", "qemu-storage-daemon", h.FUSERMOUNT)
    h.check_workdir(args.workdir)
    size = h.parse_size(args.size)
    depths = [int(d) for d in args.depths.split(",")]
    if min(depths) < 1:
        raise SystemExit("the write benchmark needs depth >= 1 (a qcow2 top overlay)")
    names = h.split_list(args.targets, h.TARGETS, "targets")
    wanted = h.split_list(args.workloads, WORKLOAD_NAMES, "workloads") if args.workloads else WORKLOAD_NAMES
    started_at = time.time()
    document = {"kind": "write", "argv": sys.argv, "started": time.ctime(started_at), "env": h.environment(),
                "params": {"size": size, "depths": depths, "runtime": args.runtime, "reps": args.reps,
                           "targets": names, "workloads": wanted, "drop_caches": args.drop_caches,
                           "overlay_fraction": args.overlay_fraction, "allocated": args.allocated,
                           "fio": "psync, direct=1, numjobs=1, iodepth=1, end_fsync=1"},
                "chains": {}, "runs": [], "unsupported": {}}
    runs = document["runs"]
    unsupported: dict[str, str] = {}
    errors = 0
    try:
        for depth in depths:
            errors += measure_depth(depth, size, names, wanted, args, document, unsupported)
    except (Exception, KeyboardInterrupt) as exc:
        document["aborted"] = repr(exc)
        h.log(f"ABORTED: {exc!r}; saving what was measured")
        errors += 1
        raise
    finally:
        shutil.rmtree(args.workdir / "runs", ignore_errors=True)
        summary = h.summarize(runs)
        ratio = h.ratios(summary)
        document.update(summary=summary, ratios=ratio, errors=errors, seconds=round(time.time() - started_at, 1))
        document["env"]["loadavg_end"] = os.getloadavg()
        print()
        print(f"write benchmark: {h.human(size)} disk, fio psync direct=1 QD1 end_fsync=1, {args.runtime:g} s per "
              f"run (cap), median of {args.reps}; MB/s = 10^6 B/s; lat = mean completion latency; "
              f"cpu us/io = the daemon's CPU time per request")
        document["table"] = h.print_table(summary, ratio, [w for w in WORKLOAD_NAMES if w in wanted], depths,
                                          names, unsupported=unsupported)
        path = h.save_results("write", document, args.output)
        print(f"results: {path}  ({document['seconds']:.0f} s)" + (f"; {errors} FAILED" if errors else ""))
    return 1 if errors else 0


def measure_depth(depth: int, size: int, names: list[str], wanted: list[str], args, document: dict,
                  unsupported: dict[str, str]) -> int:
    errors = 0
    cluster = 64 * KiB
    alloc = max(cluster, int(size * args.allocated) // cluster * cluster)
    spec = h.ChainSpec(size=size, depth=depth, overlay_fraction=args.overlay_fraction, top_allocated=alloc,
                       cluster_size=cluster)
    chain = h.build_chain(args.workdir, spec, rebuild=args.rebuild)
    workloads = [w for w in workloads_for(chain, args.workdir) if w.name in wanted]
    document["chains"][str(depth)] = {"key": spec.key, "top_allocated": alloc, "samples": chain.samples}
    active = list(names)
    if "vfsnap" in active:
        why = vfsnap_write_support(chain, args.workdir, depth, args.vfsnap_options)
        if why:
            h.log(f"depth {depth}: vfsnap {why}; measuring the others")
            unsupported["vfsnap"] = why
            document["unsupported"][str(depth)] = why
            active.remove("vfsnap")
    if not args.no_write_check:
        try:
            document.setdefault("write_check", {})[str(depth)] = write_check(chain, active, args.workdir, depth, args)
        except RuntimeError as exc:
            errors += 1
            document.setdefault("write_check", {})[str(depth)] = {"error": str(exc)}
            h.log(f"WRITE CHECK FAILED: {exc}")
    for rep in range(args.reps):
        for wl in workloads:
            for name in active:
                record = {"depth": depth, "workload": wl.name, "target": name, "rep": rep}
                try:
                    target = fresh_target(name, chain, args.workdir, depth, args.vfsnap_options)
                    os.sync()
                    if args.drop_caches:
                        h.drop_caches()
                    else:
                        # Every run from the same page cache: the read-only images below the
                        # top cached by one sequential read, the files written not cached at
                        # all. Without this, 1 MiB writes into fresh clusters ran at 250 MB/s
                        # (qsd and vfsnap alike, 3.5 ms of CPU per request in the copy into
                        # new page cache folios) after the other workloads had run, and at
                        # 900 MB/s after a drop, while the ceiling overwrote pages its copy
                        # had just cached.
                        h.level_page_cache([chain.share / name for name in chain.names[:-1]])
                    with target:
                        h.verify(target.path, chain)
                        r = h.fio(target, wl, runtime=args.runtime, disk_size=size, ramp=args.ramp)
                    record.update(r, image_check=check_image(target))
                    bad = h.log_errors(target)
                    if bad:
                        record["daemon_errors"] = bad[:20]
                        h.log(f"{name} logged errors (see {target.log_path}):\n  " + "\n  ".join(bad[:10]))
                    h.log(f"depth {depth} rep {rep} {wl.name:<18} {name:<8} {r['MBps']:9.1f} MB/s "
                          f"{r['iops']:9.0f} IOPS  daemon {r.get('daemon_cpu_us_per_io', 0):6.1f} us/IO")
                except RuntimeError as exc:
                    errors += 1
                    record["error"] = str(exc)
                    h.log(f"depth {depth} rep {rep} {wl.name} {name}: FAILED {exc}")
                document["runs"].append(record)
    if args.profile:
        for wl in [w for w in workloads_for(chain, args.workdir)
                   if w.name in h.split_list(args.profile_workloads, WORKLOAD_NAMES, "workloads")]:
            for name in [n for n in active if n in ("vfsnap", "ceiling", "ceiling-xattr")]:
                h.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
                out = h.RESULTS_DIR / f"profile-write-d{depth}-{name}-{wl.name}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
                with fresh_target(name, chain, args.workdir, depth, args.vfsnap_options) as target:
                    h.verify(target.path, chain)
                    analysis = profiling.profile_pyspy(target, wl, max(args.runtime, 5), size, out, ramp=args.ramp)
                document.setdefault("profiles", {}).setdefault(str(depth), {})[f"{name}/{wl.name}"] = \
                    {**analysis, "report": str(out)}
                print(f"\n== depth {depth}: " + out.read_text())
    return errors


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc})", file=sys.stderr)
        sys.exit(130)
