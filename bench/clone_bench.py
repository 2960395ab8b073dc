"""Clone benchmark (issue 15): `vfsnap clone` of a snapshot against `qemu-img convert` of it.

    .venv/bin/python bench/clone_bench.py [--size 4G] [--allocated 2G] [--reps 2]

A raw volume of `--size` with `--allocated` bytes of data (1 MiB extents, every other MiB) and
one snapshot s1 over it (`vol` <- `vol.s1`, Cinder's layout). Cinder's NFS driver makes a volume
from a snapshot with `qemu-img convert -O raw` of the snapshot's image (`vol`) into the new
volume's file; vfsnap with `vfsnap clone MNT/snapshots/vol/s1 NEW`, which returns with NEW usable,
and copies the data in the background: `vfsnap sync` returns when NEW depends on nothing of vol.
Times: QEMU's convert (wall; with `-t none` as Cinder runs it, and with QEMU's default cache
mode, whose writes may still be in the page cache when it returns), vfsnap's clone command (wall, until it returns) and clone + sync
(until the clone is independent). Each rep starts both sides with the page cache dropped (and
the programs themselves loaded once after that).
Afterwards `qemu-img compare` checks that the clone holds the convert's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import drop_caches  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
WORKDIR = Path("/var/tmp/vfsnap-clone-bench")
MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=True, capture_output=True, text=True, cwd=ROOT, **kwargs)



def build(share: Path, size: int, allocated: int) -> None:
    share.mkdir(parents=True)
    chunk = bytearray(os.urandom(MiB))
    with open(share / "vol", "wb") as f:
        f.truncate(size)
        for i in range(allocated // MiB):
            chunk[:8] = i.to_bytes(8, "little")  # every extent different
            f.seek(2 * i * MiB)
            f.write(chunk)
        os.fsync(f.fileno())
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "vol", "-F", "raw", str(share / "vol.s1"), str(size))
    (share / "vol.info").write_text(json.dumps({"active": "vol.s1", "s1": "vol.s1"}, indent=1, sort_keys=True))


def qemu_side(share: Path, *cache: str) -> float:
    """`qemu-img convert` of the snapshot's image into a new volume file, as Cinder runs it
    (`-t none` where the share takes O_DIRECT: image_utils.convert_image), or with QEMU's own
    default cache mode (its writes may still be in the page cache when it returns)."""
    out = share / "new-qemu"
    if out.exists():
        out.unlink()
    drop_caches()
    run("qemu-img", "--version")  # the program itself warm, as vfsnap's below
    start = time.perf_counter()
    run("qemu-img", "convert", "-O", "raw", *cache, "-f", "raw", str(share / "vol"), str(out))
    elapsed = time.perf_counter() - start
    return elapsed


def vfsnap_side(share: Path, mnt: Path, name: str) -> tuple[float, float]:
    mnt.mkdir(exist_ok=True)
    daemon = subprocess.Popen([PYTHON, "-m", "vfsnap", "mount", "-f", str(share), str(mnt)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=open(share.parent / "mount.log", "ab"))
    try:
        while not os.path.ismount(mnt):
            if daemon.poll() is not None:
                raise RuntimeError("vfsnap mount failed; see mount.log")
            time.sleep(0.05)
        drop_caches()
        run(PYTHON, "-m", "vfsnap", "status", str(mnt))  # the CLI's modules warm; the data cold
        start = time.perf_counter()
        run(PYTHON, "-m", "vfsnap", "clone", str(mnt / "snapshots" / "vol" / "s1"), name)
        returned = time.perf_counter() - start
        run(PYTHON, "-m", "vfsnap", "sync", str(mnt))
        synced = time.perf_counter() - start
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        daemon.wait(timeout=60)
    return returned, synced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="4G")
    parser.add_argument("--allocated", default="2G")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=WORKDIR)
    args = parser.parse_args()
    size, allocated = parse_size(args.size), parse_size(args.allocated)
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    share = args.workdir / "share"
    build(share, size, allocated)
    rows = []
    for rep in range(args.reps):
        qemu_default = qemu_side(share)
        qemu = qemu_side(share, "-t", "none")
        returned, synced = vfsnap_side(share, args.workdir / "mnt", f"clone{rep}")
        compare = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(share / f"clone{rep}"),
                                  str(share / "new-qemu")], capture_output=True, text=True)
        if compare.returncode != 0:
            raise SystemExit(f"clone{rep} differs from qemu-img convert: {compare.stdout}{compare.stderr}")
        (share / "new-qemu").unlink()
        rows.append({"qemu_convert_s": qemu, "qemu_convert_default_cache_s": qemu_default,
                     "vfsnap_clone_s": returned, "vfsnap_clone_sync_s": synced})
        print(f"rep {rep}: qemu-img convert -t none {qemu:.2f} s (default cache {qemu_default:.2f} s); "
              f"vfsnap clone {returned:.3f} s, "
              f"clone + sync {synced:.2f} s", flush=True)
    median = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    print(json.dumps({"size": size, "allocated": allocated, "reps": args.reps, "median": median,
                      "clone_vs_convert": median["qemu_convert_s"] / median["vfsnap_clone_s"],
                      "clone_sync_vs_convert": median["qemu_convert_s"] / median["vfsnap_clone_sync_s"]}, indent=1))
    shutil.rmtree(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
