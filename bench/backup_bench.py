#!/usr/bin/env python3
"""Backup bench (issue 14): a nightly incremental backup against a full read through the mount,
and the time `vfsnap map` takes on 1 TiB volumes.

    python bench/backup_bench.py [--workdir DIR] [--size 16G] [--base-data 2G] [--written 1G]
                                 [--write-size 256K] [--skip-full-read] [--skip-tib]
                                 [--skip-incremental]

Incremental: a raw volume of --size with --base-data in it (1 MiB blocks at random places) is
mounted; snapshot `night1` is taken and backed up in full with contrib/vfsnap-backup (sparse,
copying what `vfsnap map` lists); --written bytes are then written through the mount in random
--write-size writes, snapshot `night2` is taken, and the bench times, side by side in one run:

- `vfsnap diff --from-snap night1` of night2 (metadata only);
- the incremental backup onto the night1 backup (`vfsnap-backup`: diff, then copy the extents);
- a full read of night2 through the mount (1 MiB reads, what a backup tool does without vfsnap),
  whose sha256 must equal the backup's.

1 TiB map: `vfsnap map` (the CLI, Python start included) and `qemu-img map` of a 1 TiB qcow2
volume with 500 scattered 4 KiB writes and of a sparse 1 TiB raw file with 500 data blocks.

The page cache is not dropped (other work shares the machine): the overlay just written is in
it for both the incremental and the full read. Everything runs on the local disk of the work
directory; the daemon runs in the foreground as a subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import FUSERMOUNT, GiB, KiB, MiB, PYTHON, ROOT, log, parse_size  # noqa: E402

SCRIPT = ROOT / "contrib" / "vfsnap-backup"
sys.path.insert(0, str(ROOT))

from vfsnap.cli.extents import list_map  # noqa: E402


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Mount:
    def __init__(self, share: Path, path: Path):
        self.share, self.path = share, path

    def __enter__(self) -> "Mount":
        self.path.mkdir(parents=True, exist_ok=True)
        self.log = open(self.path.parent / "mount.log", "ab")
        self.process = subprocess.Popen([PYTHON, "-m", "vfsnap", "mount", "-f", str(self.share), str(self.path)],
                                        cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.path):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mount failed; see {self.log.name}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([FUSERMOUNT, "-u", str(self.path)], check=False)
        self.process.wait(60)
        self.log.close()


def timed(function, *args, **kwargs):
    started = time.monotonic()
    result = function(*args, **kwargs)
    return result, time.monotonic() - started


def run_backup(source: Path, target: Path) -> tuple[str, int]:
    env = {**os.environ, "VFSNAP": f"{PYTHON} -m vfsnap"}
    result = subprocess.run([PYTHON, str(SCRIPT), str(source), str(target)], capture_output=True, text=True,
                            cwd=ROOT, env=env, check=True)
    line = result.stderr.strip().splitlines()[-1]
    return line, int(line.split(" bytes read")[0].rsplit(" ", 1)[1])


def vfsnap_json(*args: str):
    result = subprocess.run([PYTHON, "-m", "vfsnap", *args], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(result.stdout)


def full_read(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
            total += len(chunk)
    return total, digest.hexdigest()


def sha256_file(path: Path) -> str:
    return full_read(path)[1]


def incremental_bench(workdir: Path, size: int, base_data: int, written: int, write_size: int,
                      skip_full_read: bool) -> list[str]:
    share, mnt, backups = workdir / "share", workdir / "mnt", workdir / "backups"
    for d in (share, backups):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    rng = random.Random(14)
    log(f"building a {human(size)} raw volume with {human(base_data)} of data")
    with open(share / "vol", "wb") as f:
        f.truncate(size)
        block = rng.randbytes(MiB)
        for _ in range(base_data // MiB):
            f.seek(rng.randrange(0, size // MiB) * MiB)
            f.write(block)
    lines = []
    with Mount(share, mnt):
        snapshots = mnt / "snapshots" / "vol"
        os.mkdir(snapshots / "night1")
        target = backups / "vol.raw"
        (line, read), seconds = timed(run_backup, snapshots / "night1" / "vol", target)
        lines.append(f"full backup of night1 via `vfsnap map`: {human(read)} read, {seconds:.2f} s")
        log(lines[-1])
        log(f"writing {human(written)} through the mount in {human(write_size)} writes")
        payload = rng.randbytes(write_size)
        fd = os.open(mnt / "volumes" / "vol", os.O_WRONLY)
        try:
            for _ in range(written // write_size):
                os.pwrite(fd, payload, rng.randrange(0, (size - write_size) // (64 * KiB)) * 64 * KiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.mkdir(snapshots / "night2")
        night2 = snapshots / "night2" / "vol"
        extents, seconds = timed(vfsnap_json, "diff", "--from-snap", "night1", "--output=json", str(night2))
        listed = sum(e["length"] for e in extents)
        lines.append(f"`vfsnap diff --from-snap night1` of night2: {len(extents)} extents, {human(listed)}, "
                     f"{seconds:.2f} s")
        log(lines[-1])
        (line, read), seconds = timed(run_backup, night2, target)
        incremental = (read, seconds)
        lines.append(f"incremental backup (vfsnap-backup): {human(read)} read, {seconds:.2f} s "
                     f"({human(read / seconds)}/s)")
        log(lines[-1])
        if not skip_full_read:
            (total, digest), seconds = timed(full_read, night2)
            lines.append(f"full read of night2 through the mount: {human(total)} read, {seconds:.2f} s "
                         f"({human(total / seconds)}/s)")
            log(lines[-1])
            lines.append(f"ratio: the incremental reads {total / max(1, incremental[0]):.1f}x fewer bytes "
                         f"and takes {seconds / incremental[1]:.1f}x less time")
            same = sha256_file(target) == digest
            lines.append(f"backup sha256 equals the snapshot's: {same}")
            log(lines[-2])
            if not same:
                raise SystemExit("the backup differs from the snapshot")
    shutil.rmtree(workdir / "share", ignore_errors=True)
    shutil.rmtree(backups, ignore_errors=True)
    return lines


def tib_map_bench(workdir: Path) -> list[str]:
    share, mnt = workdir / "tib-share", workdir / "tib-mnt"
    shutil.rmtree(share, ignore_errors=True)
    share.mkdir(parents=True)
    size = 1 << 40
    rng = random.Random(1)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(share / "big"), str(size)], check=True)
    commands = []
    for _ in range(500):
        commands += ["-c", f"write -P 1 {rng.randrange(0, size // (64 * KiB)) * 64 * KiB} 4k"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(share / "big")], check=True, capture_output=True)
    with open(share / "sparse", "wb") as f:
        f.truncate(size)
        for _ in range(500):
            f.seek(rng.randrange(0, size // MiB) * MiB)
            f.write(b"d" * 8192)
    os.sync()  # SEEK_DATA over dirty pages of a file just written is slow; a real volume's are not
    lines = []
    for volume, fmt in (("big", "qcow2"), ("sparse", "raw")):
        qemu_map = ["qemu-img", "map", "--output=json", "-f", fmt, str(share / volume)]
        best_qemu = min(timed(subprocess.run, qemu_map, capture_output=True)[1] for _ in range(3))
        with Mount(share, mnt):
            path = str(mnt / "volumes" / volume)
            # The daemon's answer alone (every page, as the CLI asks them), cold then warm ...
            answers = [timed(list_map, path)[1] for _ in range(3)]
            # ... and the whole command, Python's start and imports included.
            times = []
            for _ in range(3):
                entries, seconds = timed(vfsnap_json, "map", "--output=json", path)
                times.append(seconds)
        lines.append(f"1 TiB {fmt} volume, {len(entries)} map entries: daemon's answer {answers[0]:.3f} s first "
                     f"(after mounting), {min(answers):.3f} s best of 3; `vfsnap map` command "
                     f"{min(times):.2f} s best of 3; `qemu-img map` {best_qemu:.2f} s")
        log(lines[-1])
    shutil.rmtree(share, ignore_errors=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/vfsnap-backup-bench"))
    parser.add_argument("--size", type=parse_size, default=16 * GiB)
    parser.add_argument("--base-data", type=parse_size, default=2 * GiB)
    parser.add_argument("--written", type=parse_size, default=GiB)
    parser.add_argument("--write-size", type=parse_size, default=256 * KiB)
    parser.add_argument("--skip-full-read", action="store_true")
    parser.add_argument("--skip-tib", action="store_true")
    parser.add_argument("--skip-incremental", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    lines = [] if args.skip_incremental else incremental_bench(
        args.workdir, args.size, args.base_data, args.written, args.write_size, args.skip_full_read)
    if not args.skip_tib:
        lines += tib_map_bench(args.workdir)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
