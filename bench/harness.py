"""Shared code of the benchmarks: chains, the three targets, fio, and the result table.

The targets, all serving the same guest bytes as one file:

- ``vfsnap``:  ``python -m vfsnap mount -f SHARE MNT``, file ``MNT/volumes/vol``;
- ``qsd``:     ``qemu-storage-daemon`` with a FUSE export of the chain's top image (a file
  mountpoint), the QEMU reference;
- ``ceiling``: ``bench/passthrough.py`` over the chain flattened by ``qemu-img convert -O raw``,
  the most any Python FUSE filesystem can do here.

Chains are built once per shape under the work directory (local disk, not tmpfs) and reused by
later runs; ``chain.json`` is written last and marks a finished build.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_WORKDIR = Path("/var/tmp/vfsnap-bench")
VOLUME = "vol"
PYTHON = sys.executable
FUSERMOUNT = shutil.which("fusermount3") or shutil.which("fusermount") or "fusermount3"
TARGETS = ("vfsnap", "qsd", "ceiling", "ceiling-xattr")  # ceiling-xattr: passthrough.py --xattr
DEFAULT_TARGETS = ("vfsnap", "qsd", "ceiling")

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHAIN_FORMAT = 2  # bump when the way chains are built changes, so cached chains are rebuilt


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def human(n: int) -> str:
    for unit, size in (("G", GiB), ("M", MiB), ("k", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def run(*args, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], check=False, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}{result.stdout}")
    return result


def qemu_io(image: Path, commands: list[str], fmt: str = "qcow2") -> None:
    """Run qemu-io commands (in batches); qemu-io reports failures on stdout and exits 0."""
    for i in range(0, len(commands), 500):
        args = ["qemu-io", "-f", fmt]
        for command in commands[i:i + 500]:
            args += ["-c", command]
        result = run(*args, image)
        for line in (result.stdout + result.stderr).splitlines():
            if "failed" in line.lower() or "error" in line.lower():
                raise RuntimeError(f"qemu-io on {image}: {line}")


# -- chains ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainSpec:
    """The shape of a benchmark chain: ``vol`` (raw, random data) <- ``vol.s1`` <- ... <- ``vol.sN``.

    Every overlay but a write chain's top holds scattered writes (4 KiB .. 1 MiB, a few zero
    writes) covering about ``overlay_fraction`` of the disk. A write chain (``top_allocated`` > 0)
    has a top overlay whose first ``top_allocated`` bytes are allocated and the rest empty.
    """

    size: int
    depth: int
    overlay_fraction: float = 0.02
    top_allocated: int = 0
    cluster_size: int = 64 * KiB
    seed: int = 1

    @property
    def key(self) -> str:
        kind = f"w{human(self.top_allocated)}" if self.top_allocated else "r"
        return (f"{kind}-{human(self.size)}-d{self.depth}-f{self.overlay_fraction:g}"
                f"-c{human(self.cluster_size)}-seed{self.seed}-v{CHAIN_FORMAT}")


@dataclass
class Chain:
    spec: ChainSpec
    dir: Path
    share: Path          # the Cinder share directory (only the volume's files)
    names: list[str]     # image files, bottom first
    flat: Path           # qemu-img convert -O raw of the whole chain (the oracle)
    samples: list[tuple[int, int, str]]  # (offset, length, sha256) of the oracle

    @property
    def full_sha256(self) -> str:
        """sha256 of the whole oracle (computed once, kept in chain.json)."""
        stamp = self.dir / "chain.json"
        doc = json.loads(stamp.read_text())
        if "full_sha256" not in doc:
            doc["full_sha256"] = sha256_range(self.flat, 0, self.spec.size)
            stamp.write_text(json.dumps(doc, indent=1))
        return doc["full_sha256"]

    @property
    def top(self) -> Path:
        return self.share / self.names[-1]

    @property
    def top_format(self) -> str:
        return "qcow2" if self.spec.depth else "raw"


def sample_regions(size: int) -> list[tuple[int, int]]:
    """Where targets are compared with the oracle: the first 64 MiB and the last 16 MiB."""
    first = min(size, 64 * MiB)
    regions = [(0, first)]
    last = min(16 * MiB, size - first)
    if last > 0:
        regions.append((size - last, last))
    return regions


def sha256_range(path: Path, offset: int, length: int, *, direct: bool = False) -> str:
    """sha256 of bytes [offset, offset+length) of a file; `direct`: O_DIRECT reads of 1 MiB (as fio
    does: nothing lands in the FUSE file's page cache), offset and length 4 KiB aligned."""
    digest = hashlib.sha256()
    block = MiB if direct else 4 * MiB
    buf = mmap.mmap(-1, block)  # page aligned, as O_DIRECT wants
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        pos, end = offset, offset + length
        while pos < end:
            n = os.preadv(fd, [view[:min(block, end - pos)]], pos)
            if n <= 0:
                raise RuntimeError(f"{path}: short read at {pos}")
            digest.update(view[:n])
            pos += n
    finally:
        view.release()
        buf.close()
        os.close(fd)
    return digest.hexdigest()


def _make_base(workdir: Path, spec: ChainSpec) -> Path:
    """A raw base filled with pseudo-random bytes, shared (hard-linked) by every chain of its size."""
    path = workdir / "bases" / f"base-{human(spec.size)}-seed{spec.seed}.raw"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"writing a {human(spec.size)} random base {path}")
    rng = random.Random(spec.seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = spec.size
        while left:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(path)
    return path


def _scattered_writes(rng: random.Random, spec: ChainSpec, pattern: Path) -> list[str]:
    lengths = [4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB]
    weights = [30, 20, 25, 15, 10]
    target = int(spec.size * spec.overlay_fraction)
    commands, written = [], 0
    while written < target:
        length = rng.choices(lengths, weights)[0]
        offset = rng.randrange(0, (spec.size - length) // (4 * KiB) + 1) * 4 * KiB
        if rng.random() < 0.05:
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"write -s {pattern} {offset} {length}")
        written += length
    return commands


def build_chain(workdir: Path, spec: ChainSpec, *, rebuild: bool = False) -> Chain:
    """Build (or reuse) the chain `spec` under `workdir/chains/<key>`."""
    cdir = workdir / "chains" / spec.key
    stamp = cdir / "chain.json"
    if stamp.exists() and not rebuild:
        doc = json.loads(stamp.read_text())
        return Chain(spec, cdir, cdir / "share", doc["names"], cdir / "flat.raw",
                     [tuple(s) for s in doc["samples"]])
    if cdir.exists():
        shutil.rmtree(cdir)
    share = cdir / "share"
    share.mkdir(parents=True)
    t0 = time.monotonic()
    base = _make_base(workdir, spec)
    os.link(base, share / VOLUME)
    log(f"building chain {spec.key} (depth {spec.depth})")
    names = [VOLUME]
    pattern = cdir / "pattern"
    for level in range(1, spec.depth + 1):
        name = f"{VOLUME}.s{level}"
        backing_fmt = "raw" if level == 1 else "qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={spec.cluster_size}",
            "-b", names[-1], "-F", backing_fmt, share / name, spec.size)
        names.append(name)
        rng = random.Random(spec.seed * 1_000_003 + level)
        pattern.write_bytes(rng.randbytes(MiB))
        if spec.top_allocated and level == spec.depth:
            commands = [f"write -s {pattern} {off} {min(MiB, spec.top_allocated - off)}"
                        for off in range(0, spec.top_allocated, MiB)]
        else:
            commands = _scattered_writes(rng, spec, pattern)
        qemu_io(share / name, commands)
    pattern.unlink()
    if spec.depth:
        info = {"active": names[-1], **{f"s{i}": names[i] for i in range(1, spec.depth + 1)}}
        with open(share / f"{VOLUME}.info", "w") as f:
            json.dump(info, f, indent=1, sort_keys=True)
    top_fmt = "qcow2" if spec.depth else "raw"
    check = run("qemu-img", "check", "-f", top_fmt, share / names[-1], check=False) if spec.depth else None
    if check is not None and check.returncode != 0:
        raise RuntimeError(f"qemu-img check of the new chain failed:\n{check.stdout}{check.stderr}")
    flat = cdir / "flat.raw"
    run("qemu-img", "convert", "-f", top_fmt, "-O", "raw", share / names[-1], flat)
    samples = [(off, n, sha256_range(flat, off, n)) for off, n in sample_regions(spec.size)]
    full = sha256_range(flat, 0, spec.size)
    os.sync()
    stamp.write_text(json.dumps({"spec": asdict(spec), "names": names, "samples": samples, "full_sha256": full},
                                indent=1))
    log(f"chain {spec.key} built in {time.monotonic() - t0:.1f} s")
    return Chain(spec, cdir, share, names, flat, samples)


def copy_chain(chain: Chain, dest: Path) -> Chain:
    """A fresh copy of the chain for a writing run: the top image and `.info` copied, the
    images below hard-linked (nothing writes them: QEMU and vfsnap open backing files read-only).
    """
    if dest.exists():
        shutil.rmtree(dest)
    share = dest / "share"
    share.mkdir(parents=True)
    for name in chain.names[:-1]:
        os.link(chain.share / name, share / name)
    shutil.copyfile(chain.top, share / chain.names[-1])
    if (chain.share / f"{VOLUME}.info").exists():
        shutil.copyfile(chain.share / f"{VOLUME}.info", share / f"{VOLUME}.info")
    return Chain(chain.spec, dest, share, chain.names, chain.flat, chain.samples)


def verify(path: Path, chain: Chain, *, full: bool = False) -> None:
    """Fail unless `path` has the oracle's size and serves its bytes: in the sample regions (the
    first 64 MiB and the last 16 MiB), or with `full` the whole disk (read with O_DIRECT)."""
    size = os.stat(path).st_size
    if size != chain.spec.size:
        raise RuntimeError(f"{path}: size {size}, expected {chain.spec.size}")
    checks = [(0, size, chain.full_sha256)] if full else chain.samples
    for off, n, want in checks:
        got = sha256_range(path, off, n, direct=True)
        if got != want:
            raise RuntimeError(f"{path}: bytes {off}+{n} differ from qemu-img convert (sha256 {got} != {want})")


# -- mounts -------------------------------------------------------------------------------


def is_mounted(path: Path) -> bool:
    """True if `path` (a directory or, for a QSD export, a file) is a mountpoint."""
    want = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].encode().decode("unicode_escape")
            if point == want:
                return True
    return False


def fusermount_u(path: Path, lazy: bool = False) -> bool:
    args = [FUSERMOUNT, "-u", "-q"] + (["-z"] if lazy else []) + [str(path)]
    return subprocess.run(args, check=False, capture_output=True).returncode == 0


def fio_job(result, what: str) -> dict:
    """The one job of fio's JSON output (`--output-format=json`, `--group_reporting`); a failed
    run raises, naming `what`."""
    try:
        doc = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        raise RuntimeError(f"fio failed ({result.returncode}):\n{result.stderr}{result.stdout}") from None
    job = doc["jobs"][0]
    if result.returncode != 0 or job.get("error"):
        raise RuntimeError(f"{what}: error {job.get('error')}\n{result.stderr}")
    return job


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Target:
    """A daemon serving one file; a context manager that always cleans up."""

    kind = ""

    def __init__(self, name: str, mountpoint: Path, log_path: Path):
        self.name = name
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def path(self) -> Path:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 30.0) -> Target:
        if is_mounted(self.mountpoint):
            fusermount_u(self.mountpoint, lazy=True)
        self.prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open while the daemon runs, closed in stop()
        self._log.write(f"\n=== {time.ctime()} {' '.join(self.command())}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=ROOT, env=self.env())
        deadline = time.monotonic() + timeout
        while not (is_mounted(self.mountpoint) and os.path.exists(self.path)):
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not mount within {timeout} s:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def env(self) -> dict:
        return dict(os.environ)

    def stop(self, timeout: float = 30.0) -> None:
        proc = self.process
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self.request_stop()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log(f"{self.name} did not stop within {timeout} s; lazy unmount and kill")
                    fusermount_u(self.mountpoint, lazy=True)
                    proc.kill()
                    proc.wait(10)
        finally:
            if is_mounted(self.mountpoint):
                fusermount_u(self.mountpoint, lazy=True)
            if self._log:
                self._log.close()
                self._log = None
            self.process = None

    def request_stop(self) -> None:
        if not fusermount_u(self.mountpoint):
            time.sleep(0.5)
            if not fusermount_u(self.mountpoint):
                fusermount_u(self.mountpoint, lazy=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Target:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def log_errors(target: Target) -> list[str]:
    """Lines of the daemon's log (this run's part) that show a traceback or an error."""
    try:
        text = target.log_path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    text = text[text.rfind("\n=== "):]
    return [line for line in text.splitlines()
            if "Traceback" in line or " ERROR " in line or " CRITICAL " in line or "unexpected error" in line]


class VfsnapTarget(Target):
    kind = "vfsnap"

    def __init__(self, share: Path, mountpoint: Path, log_path: Path, options: str = "",
                 cprofile: Path | None = None):
        super().__init__("vfsnap", mountpoint, log_path)
        self.share = share
        self.options = options
        if cprofile is None and os.environ.get("VFSNAP_BENCH_CPROFILE"):
            # Every vfsnap mount of the benchmarks then writes a cProfile dump into that directory.
            pdir = Path(os.environ["VFSNAP_BENCH_CPROFILE"])
            pdir.mkdir(parents=True, exist_ok=True)
            cprofile = pdir / f"{log_path.stem}-{time.strftime('%H%M%S')}-{id(self):x}.prof"
        self.cprofile = cprofile

    @property
    def path(self) -> Path:
        return self.mountpoint / "volumes" / VOLUME

    def command(self) -> list[str]:
        args = [PYTHON]
        if self.cprofile:
            args += ["-m", "cProfile", "-o", str(self.cprofile)]
        args += ["-m", "vfsnap", "mount", "-f"]
        if self.options:
            args += ["-o", self.options]
        return args + [str(self.share), str(self.mountpoint)]


class QsdTarget(Target):
    kind = "qsd"

    def __init__(self, top: Path, fmt: str, export: Path, log_path: Path, writable: bool):
        super().__init__("qsd", export, log_path)
        self.top = top
        self.fmt = fmt
        self.writable = writable

    @property
    def path(self) -> Path:
        return self.mountpoint

    def prepare(self) -> None:
        self.mountpoint.parent.mkdir(parents=True, exist_ok=True)
        self.mountpoint.touch()  # a FUSE export's mountpoint is a regular file

    def command(self) -> list[str]:
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={self.top}",
                "--blockdev", f"driver={self.fmt},node-name=q,file=f",
                "--export", (f"type=fuse,id=e,node-name=q,mountpoint={self.mountpoint},"
                             f"writable={'on' if self.writable else 'off'}")]

    def request_stop(self) -> None:
        # QSD flushes and removes its export on SIGTERM.
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)


class CeilingTarget(Target):
    kind = "ceiling"

    def __init__(self, image: Path, mountpoint: Path, log_path: Path, xattr: bool = False, threads: int = 0,
                 raw: bool = False):
        super().__init__("ceiling-raw" if raw else "ceiling-xattr" if xattr else "ceiling-threads" if threads
                         else "ceiling", mountpoint, log_path)
        self.image = image
        self.xattr = xattr
        self.threads = threads
        self.raw = raw  # bench/raw_passthrough.py: the FUSE protocol without pyfuse3 or trio

    @property
    def path(self) -> Path:
        return self.mountpoint / self.image.name

    def command(self) -> list[str]:
        if self.raw:
            return [PYTHON, str(BENCH_DIR / "raw_passthrough.py"), f"--threads={self.threads or 16}",
                    str(self.image), str(self.mountpoint)]
        return [PYTHON, str(BENCH_DIR / "passthrough.py")] + (["--xattr"] if self.xattr else []) + \
            ([f"--threads={self.threads}"] if self.threads else []) + [str(self.image), str(self.mountpoint)]


@contextmanager
def started(targets: list[Target]):
    """Start every target; stop all of them however the block ends."""
    try:
        for target in targets:
            target.start()
        yield targets
    finally:
        for target in reversed(targets):
            try:
                target.stop()
            except Exception as exc:  # noqa: BLE001 - keep cleaning up the others
                log(f"stopping {target.name}: {exc}")


# -- fio ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str                    # read, randread, write, randwrite, or "replay" of `iolog`
    bs: int
    time_based: bool = True    # False: one pass over [offset, offset+size), capped at the runtime
    offset: int = 0
    size: int | None = None    # None: to the end of the disk
    iolog: Path | None = None  # fio version 2 iolog (file name "X") replayed against the target
    end_fsync: bool = False
    extra: tuple[str, ...] = ()  # more fio options

    @property
    def ddir(self) -> str:
        return "write" if "write" in self.rw or self.iolog else "read"


def fio(target: Target, workload: Workload, *, runtime: float, disk_size: int, seed: int = 4242,
        ramp: float = 0) -> dict:
    """One fio job on the target's file (psync, O_DIRECT, one job, queue depth 1); the parsed
    result, with the CPU time the target's daemon spent during the run. `ramp` seconds of I/O
    before the measured `runtime` are not counted (fio ramp_time)."""
    path, pid = target.path, target.pid
    size = workload.size if workload.size is not None else disk_size - workload.offset
    args = ["fio", f"--name={workload.name}", f"--filename={path}", "--ioengine=psync", "--direct=1",
            "--numjobs=1", "--iodepth=1", f"--bs={workload.bs}", f"--runtime={int(runtime * 1000)}ms",
            "--allow_file_create=0", "--output-format=json", f"--randseed={seed}", "--randrepeat=1"]
    if workload.iolog:
        args += [f"--read_iolog={workload.iolog}", f"--replay_redirect={path}"]
    else:
        args += [f"--rw={workload.rw}", f"--offset={workload.offset}", f"--size={size}"]
        if workload.rw.startswith("rand"):
            args.append("--norandommap")
    if workload.time_based:
        args.append("--time_based")
    if workload.end_fsync:
        args.append("--end_fsync=1")
    if ramp > 0:
        args.append(f"--ramp_time={int(ramp * 1000)}ms")
    args += workload.extra
    if not is_mounted(target.mountpoint) or target.process is None or target.process.poll() is not None:
        raise RuntimeError(f"{target.name} is not mounted any more:\n{target.log_tail()}")
    # The daemon's CPU time over the measured part: sampled when the ramp ends (fio's start-up
    # of a few ms aside) and when fio exits.
    cpu_at: dict[str, float] = {}
    timer = threading.Timer(ramp, lambda: cpu_at.setdefault("start", cpu_seconds(pid)))
    if ramp <= 0:
        cpu_at["start"] = cpu_seconds(pid)
    t0 = time.monotonic()
    if ramp > 0:
        timer.start()
    try:
        result = run(*args, check=False)
    finally:
        timer.cancel()
    wall = time.monotonic() - t0
    cpu0 = cpu_at.get("start")
    cpu1 = cpu_seconds(pid) if target.process.poll() is None else None
    job = fio_job(result, f"fio {workload.name} on {path}")
    side = job[workload.ddir]
    ios = side["total_ios"]
    out = {
        "bytes": side["io_bytes"],
        "ios": ios,
        "runtime_s": side["runtime"] / 1000,
        "wall_s": round(wall, 3),
        "MBps": side["bw_bytes"] / 1e6,
        "iops": side["iops"],
        "clat_mean_us": side["clat_ns"]["mean"] / 1000,
        "clat_p99_us": side["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1000,
        "fio_usr_cpu": job["usr_cpu"],
        "fio_sys_cpu": job["sys_cpu"],
    }
    if cpu0 is not None and cpu1 is not None and ios:
        out["daemon_cpu_s"] = round(cpu1 - cpu0, 3)
        out["daemon_cpu_us_per_io"] = (cpu1 - cpu0) * 1e6 / ios
    return out


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise RuntimeError(f"cannot drop the page cache ({exc}); run as root or without --drop-caches") from None


def level_page_cache(files: list[Path]) -> None:
    """Start every target from the same page cache: dropped, then every file the targets read
    (the chain's images, the flattened file) read once from start to end, the same way.

    How a file came into the cache decides the size of its folios (ext4 has large folios since
    Linux 6.11), and with it the cost of reading it again: on this machine a 1 MiB pread from a
    file cached by a sequential read cost 118 us, from the same file cached by random 4 KiB
    reads 156 us. Left to chance (or to each target's own first pass, which reads a deep chain's
    overlays in scattered pieces and the flat file in one sweep), that alone moved vfsnap/ceiling
    by 0.1 to 0.15. Needs root; without it, a warning and the cache as it is."""
    try:
        drop_caches()
    except RuntimeError as exc:
        log(f"warning: {exc}; targets start from whatever page cache earlier runs left")
        return
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(4 * MiB):
                pass


def write_replay_log(path: Path, offsets: list[int], length: int) -> Path:
    with open(path, "w") as f:
        f.write("fio version 2 iolog\nX add\nX open\n")
        f.writelines(f"X write {off} {length}\n" for off in offsets)
        f.write("X close\n")
    return path


# -- results ------------------------------------------------------------------------------


def environment() -> dict:
    def out(*args):
        try:
            return run(*args, check=False).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return None

    try:
        import pyfuse3
        pyfuse3_version = pyfuse3.__version__
    except Exception:  # noqa: BLE001
        pyfuse3_version = None
    return {
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3_version,
        "qemu": out("qemu-storage-daemon", "--version"),
        "fio": out("fio", "--version"),
        "git": out("git", "-C", str(ROOT), "describe", "--always", "--dirty"),
        "loadavg_start": os.getloadavg(),
    }


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    """Medians per (depth, workload, target) of the runs that measured something."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if "MBps" in r:
            groups.setdefault((r["depth"], r["workload"], r["target"]), []).append(r)
    summary: dict = {}
    for (depth, workload, target), rs in groups.items():
        entry = {k: median_of(rs, k) for k in ("MBps", "iops", "clat_mean_us", "daemon_cpu_us_per_io")}
        entry["MBps_min"] = min(r["MBps"] for r in rs)
        entry["MBps_max"] = max(r["MBps"] for r in rs)
        entry["runs"] = len(rs)
        summary.setdefault(str(depth), {}).setdefault(workload, {})[target] = entry
    return summary


def ratios(summary: dict) -> dict:
    """vfsnap/qsd and vfsnap/ceiling of the median throughput, per depth and workload."""
    out: dict = {}
    for depth, workloads in summary.items():
        for workload, targets in workloads.items():
            v = targets.get("vfsnap", {}).get("MBps")
            entry = {}
            for other in TARGETS[1:]:
                o = targets.get(other, {}).get("MBps")
                if other in targets or other in DEFAULT_TARGETS:
                    entry[f"vfsnap/{other}"] = v / o if v and o else None
            out.setdefault(depth, {})[workload] = entry
    return out


def print_table(summary: dict, ratio: dict, workloads: list[str], depths: list[int], targets: list[str],
                unsupported: dict[str, str] | None = None, goals: dict | None = None) -> str:
    """The result table as text (also printed)."""
    unsupported = unsupported or {}
    names = list(targets)
    lines = []
    width = max(8, *(len(t) for t in names))
    head = (f"{'depth':>5}  {'workload':<18} {'target':<{width}} {'MB/s':>9} {'IOPS':>9} "
            f"{'min..max MB/s':>17} {'lat us':>8} {'cpu us/io':>9}   ratios")
    lines.append(head)
    lines.append("-" * len(head))
    for depth in depths:
        for wl in workloads:
            measured = summary.get(str(depth), {}).get(wl, {})
            for i, t in enumerate(names):
                e = measured.get(t)
                if e is None:
                    why = unsupported.get(t, "not measured")
                    row = f"{depth:>5}  {wl:<18} {t:<{width}} {why:>45}"
                else:
                    cpu = e.get("daemon_cpu_us_per_io")
                    row = (f"{depth:>5}  {wl:<18} {t:<{width}} {e['MBps']:>9.1f} {e['iops']:>9.0f} "
                           f"{e['MBps_min']:>8.1f}..{e['MBps_max']:<8.1f} {e['clat_mean_us']:>8.1f} "
                           f"{cpu if cpu is not None else float('nan'):>9.1f}")
                if i == 0:
                    r = ratio.get(str(depth), {}).get(wl, {})
                    parts = []
                    for key in r:
                        value = r.get(key)
                        goal = (goals or {}).get((depth, key))
                        mark = "" if value is None or goal is None else (" ok" if value >= goal else f" <{goal:g}")
                        parts.append(f"{key} {value:.2f}{mark}" if value is not None else f"{key} -")
                    row += "   " + ", ".join(parts)
                lines.append(row)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    return text


def save_results(kind: str, document: dict, path: Path | None = None) -> Path:
    """Write the JSON document to `path`, or bench/results/<kind>-<time>.json."""
    if path is None:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(document, indent=1, default=str) + "\n")
    return path


def common_arguments(parser, *, runtime: float, reps: int, ramp: float) -> None:
    parser.add_argument("--size", default="1G", help="virtual disk size (default 1G)")
    parser.add_argument("--depths", default="1,32", help="chain depths to measure (default 1,32)")
    parser.add_argument("--runtime", type=float, default=runtime,
                        help=f"seconds per fio run (default {runtime:g})")
    parser.add_argument("--ramp", type=float, default=ramp,
                        help=f"seconds of I/O before each measured run, not counted (default {ramp:g})")
    parser.add_argument("--reps", type=int, default=reps, help=f"repetitions per target, median taken (default {reps})")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated, from {','.join(TARGETS)} (default {','.join(DEFAULT_TARGETS)})")
    parser.add_argument("--workloads", default=None, help="comma-separated subset of the workload names")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"chains, mounts and logs (local disk, not tmpfs; default {DEFAULT_WORKDIR})")
    parser.add_argument("--overlay-fraction", type=float, default=0.02,
                        help="share of the disk each overlay writes (default 0.02)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached chains")
    parser.add_argument("--drop-caches", action="store_true",
                        help="sync and drop the host page cache before every run (cold cache; needs root)")
    parser.add_argument("--vfsnap-options", default="", help="-o options for vfsnap mount")
    parser.add_argument("--output", type=Path, default=None, help="JSON result file (default bench/results/...)")


def split_list(text: str, allowed, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP (and SIGINT even where a shell ignored it) raise KeyboardInterrupt, so the
    `finally` blocks unmount every target and stop every daemon."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupt)


def check_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (bash scripts/setup.sh --test installs them)")
    if not os.path.exists("/dev/fuse"):
        raise SystemExit("needs /dev/fuse")


def check_workdir(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    fstype = run("stat", "-f", "-c", "%T", workdir, check=False).stdout.strip()
    if fstype in ("tmpfs", "ramfs"):
        raise SystemExit(f"{workdir} is on {fstype}; use a directory on a local disk (--workdir)")
