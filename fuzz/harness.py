"""The fuzzing harness shared by tests/test_fuzz.py (hypothesis) and fuzz/fuzz_headers.py (atheris).

Seeds are small real images made by qemu-img/qemu-io (v2 and v3 overlays with backing format
extensions, extended L2, deflate and zstd compression, 512-byte clusters, lazy refcounts with the
dirty bit, internal snapshots), laid out as the chain of one Cinder volume: base `vol`, overlay
`vol.s1` (`vol.s2` above it for two-level seeds). A mutation engine changes bytes, bits, 64-bit
table entries, header fields and extension headers, aimed at the regions that matter (header, L1,
L2 tables, refcount table and blocks, snapshot table, compressed data), driven by any source of
choices (hypothesis, random.Random, atheris' FuzzedDataProvider).

`exercise()` then does in-process what the daemon does with a volume's files: parse every header,
open the chain the way `Volume.live_chain` does (`backing_chain` + `ChainRules`), read the whole
virtual disk (or a spread of it when it is large) through `View.read`, run the offline check
(`vfsnap check`), and, for images marked dirty, the refcount rebuild that the mount runs
(`prepare_for_writing`). Only `VfsnapError` (CorruptImage/UnsupportedImage) may come out of
vfsnap; anything else propagates and is a finding. Properties checked on the way:

- a header that parses re-serializes to one that parses to the same fields (the header-rewrite
  rule: unknown fields and extensions are kept byte-exact);
- every read returns exactly the length asked for (short only at the end of the disk);
- closing every image gives the table cache's budget back (no leaked pins);
- a refcount rebuild does not grow the file absurdly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vfsnap.chain.backing import ChainRules, backing_chain
from vfsnap.chain.view import View
from vfsnap.errors import VfsnapError
from vfsnap.format import Qcow2Image, TableCache, open_image
from vfsnap.format.header import parse_header, serialize_header_area

KiB = 1 << 10
MiB = 1 << 20
VOLUME = "vol"
OFFSET_MASK = 0x00FFFFFFFFFFFE00
MAX_FULL_READ = 4 * MiB  # read the whole disk up to this size; a spread of it above
CACHE_BYTES = 1 * MiB  # table_cache_size of the in-process "mount"
MAX_REPAIR_GROWTH = 64 * MiB


class Finding(AssertionError):
    """A property of the reader was violated (not an exception vfsnap raised by itself)."""


class Hang(BaseException):
    """Raised from SIGALRM when an example runs too long: a BaseException, so that no `except
    Exception` on the way can swallow it; `time_limit` turns it into `TimedOut` at its exit."""


class TimedOut(Finding):
    """An example ran longer than its time limit (a hang, or work out of proportion to the input)."""


# -- seeds -------------------------------------------------------------------------------------


@dataclass
class Seed:
    name: str
    files: dict[str, bytes]  # file name on the "share" -> contents
    top: str  # the active image
    base_format: str
    targets: tuple[str, ...]  # the qcow2 files worth mutating
    regions: dict[str, list[tuple[int, int, str]]] = field(default_factory=dict)

    @property
    def top_format(self) -> str:
        return self.base_format if self.top == VOLUME else "qcow2"


def _run(*args: str) -> None:
    result = subprocess.run(args, check=False, capture_output=True, text=True)
    if result.returncode or "error" in (result.stdout + result.stderr).lower():
        raise RuntimeError(f"{' '.join(args)}: {result.stdout}{result.stderr}")


def _img(*args: str) -> None:
    _run("qemu-img", *args)


def _io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    _run(*args, str(path))


def _raw_base(d: Path, size: int = MiB) -> None:
    with open(d / VOLUME, "wb") as f:
        f.write(bytes(range(256)) * (size // 256))


def _overlay(d: Path, name: str, backing: str, backing_fmt: str, options: str | None = None, size: int = MiB) -> Path:
    args = ["create", "-q", "-f", "qcow2", "-b", backing, "-F", backing_fmt]
    if options:
        args += ["-o", options]
    _img(*args, str(d / name), str(size))
    return d / name


def _pattern_source(d: Path, size: int = MiB) -> Path:
    src = d / "src.raw"
    with open(src, "wb") as f:
        f.truncate(size)
        for i in range(0, size, 24 * KiB):
            f.seek(i)
            f.write(bytes([(i // 4096) % 251 + 1]) * 5000)
    return src


def _seed_v3_raw_base(d: Path) -> tuple[str, str]:
    _raw_base(d)
    o = _overlay(d, "vol.s1", VOLUME, "raw", "cluster_size=4k")
    _io(o, "write -P 0x22 0 8k", "write -P 0x23 100k 5k", "write -z 200k 8k", "write -P 0x24 900k 100k")
    return "vol.s1", "raw"


def _seed_v2_qcow2_base(d: Path) -> tuple[str, str]:
    _img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(d / VOLUME), str(MiB))
    _io(d / VOLUME, "write -P 0x31 0 64k", "write -P 0x32 500k 4k")
    o = _overlay(d, "vol.s1", VOLUME, "qcow2", "compat=0.10,cluster_size=4k")
    _io(o, "write -P 0x33 32k 8k", "write -z 500k 4k")
    o2 = _overlay(d, "vol.s2", "vol.s1", "qcow2", "cluster_size=8k")
    _io(o2, "write -P 0x34 60k 10k")
    return "vol.s2", "qcow2"


def _seed_extended_l2(d: Path) -> tuple[str, str]:
    _raw_base(d)
    o = _overlay(d, "vol.s1", VOLUME, "raw", "extended_l2=on,cluster_size=16k")
    _io(o, "write -P 0x41 16k 2k", "write -P 0x42 33k 1k", "write -z 48k 1k", "write -P 0x43 64k 16k")
    return "vol.s1", "raw"


def _seed_compressed(d: Path, compression: str, cluster: str) -> tuple[str, str]:
    _raw_base(d)
    src = _pattern_source(d)
    _img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o",
         f"compression_type={compression},cluster_size={cluster}", str(src), str(d / "vol.s1"))
    _img("rebase", "-u", "-b", VOLUME, "-F", "raw", str(d / "vol.s1"))
    src.unlink()
    return "vol.s1", "raw"


def _seed_512_clusters(d: Path) -> tuple[str, str]:
    _raw_base(d)
    o = _overlay(d, "vol.s1", VOLUME, "raw", "cluster_size=512")
    _io(o, "write -P 0x51 0 1k", "write -P 0x52 40k 512", "write -P 0x53 300k 3k", "write -z 600k 2k")
    return "vol.s1", "raw"


def _seed_dirty(d: Path) -> tuple[str, str]:
    _raw_base(d)
    o = _overlay(d, "vol.s1", VOLUME, "raw", "cluster_size=4k,lazy_refcounts=on")
    _io(o, "write -P 0x61 0 12k", "write -P 0x62 256k 4k")
    with open(o, "r+b") as f:
        f.seek(72)
        incompat = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", incompat | 1))
    return "vol.s1", "raw"


def _seed_internal_snapshot(d: Path) -> tuple[str, str]:
    _img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", str(d / VOLUME), str(MiB))
    _io(d / VOLUME, "write -P 0x71 0 16k")
    _img("snapshot", "-c", "snap1", str(d / VOLUME))
    _io(d / VOLUME, "write -P 0x72 4k 4k", "write -c -P 0x73 64k 4k")
    return VOLUME, "qcow2"


SEED_BUILDERS: dict[str, Callable[[Path], tuple[str, str]]] = {
    "v3-raw-base": _seed_v3_raw_base,
    "v2-qcow2-base-2-levels": _seed_v2_qcow2_base,
    "extended-l2": _seed_extended_l2,
    "deflate-4k": lambda d: _seed_compressed(d, "zlib", "4k"),
    "zstd-4k": lambda d: _seed_compressed(d, "zstd", "4k"),
    "clusters-512": _seed_512_clusters,
    "lazy-dirty": _seed_dirty,
    "internal-snapshot": _seed_internal_snapshot,
}


def build_seeds(workdir: Path | None = None) -> list[Seed]:
    """Make every seed with qemu-img (about a second); files stay in memory."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="vfsnap-seeds-")) if own else workdir
    seeds = []
    try:
        for name, builder in SEED_BUILDERS.items():
            d = workdir / name
            d.mkdir(parents=True)
            top, base_format = builder(d)
            files = {p.name: p.read_bytes() for p in d.iterdir()}
            targets = tuple(sorted(n for n, data in files.items() if data[:4] == b"QFI\xfb"))
            seed = Seed(name, files, top, base_format, targets)
            seed.regions = {n: regions(files[n]) for n in targets}
            seeds.append(seed)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return seeds


# -- where the metadata lies (computed independently of vfsnap) --------------------------------


def _u(fmt: str, data: bytes, offset: int) -> int:
    if offset + struct.calcsize(fmt) > len(data):
        return 0
    return struct.unpack_from(fmt, data, offset)[0]


def extension_headers(data: bytes) -> list[int]:
    """File offsets of the extension headers (type, length) of a qcow2 image, END marker included."""
    version = _u(">I", data, 4)
    cluster = 1 << min(max(_u(">I", data, 20), 9), 21)
    start = 72 if version == 2 else _u(">I", data, 100)
    backing = _u(">Q", data, 8)
    end = min(backing or cluster, cluster, len(data))
    out, offset = [], start
    while 0 < offset and offset + 8 <= end and len(out) < 64:
        out.append(offset)
        ext_type, length = struct.unpack_from(">II", data, offset)
        if ext_type == 0:
            break
        offset += 8 + ((length + 7) & ~7)
    return out


def regions(data: bytes) -> list[tuple[int, int, str]]:
    """(start, end, kind) of the metadata of a qcow2 image made by QEMU (kind: header, l1, l2,
    reftable, refblock, snapshots, compressed, data)."""
    cb = _u(">I", data, 20)
    cs = 1 << cb
    out: list[tuple[int, int, str]] = []
    backing_off, backing_len = _u(">Q", data, 8), _u(">I", data, 16)
    header_end = max(backing_off + backing_len, (extension_headers(data) or [104])[-1] + 8, 112)
    out.append((0, min(header_end, len(data)), "header"))
    l1_size, l1_off = _u(">I", data, 36), _u(">Q", data, 40)
    out.append((l1_off, l1_off + l1_size * 8, "l1"))
    extended = _u(">I", data, 4) >= 3 and _u(">Q", data, 72) & (1 << 4)
    for i in range(l1_size):
        l2 = _u(">Q", data, l1_off + 8 * i) & OFFSET_MASK
        if l2 and l2 + cs <= len(data):
            out.append((l2, l2 + cs, "l2"))
            step = 16 if extended else 8
            for j in range(0, cs, step):
                entry = _u(">Q", data, l2 + j)
                if entry & (1 << 62):
                    host = entry & ((1 << (62 - (cb - 8))) - 1)
                    out.append((host, min(host + 512, len(data)), "compressed"))
                elif entry & OFFSET_MASK:
                    host = entry & OFFSET_MASK
                    out.append((host, min(host + cs, len(data)), "data"))
    rt_off, rt_clusters = _u(">Q", data, 48), _u(">I", data, 56)
    out.append((rt_off, rt_off + min(rt_clusters * cs, 512), "reftable"))
    for i in range(min(rt_clusters * cs // 8, 64)):
        block = _u(">Q", data, rt_off + 8 * i) & OFFSET_MASK
        if block and block < len(data):
            out.append((block, min(block + 512, len(data)), "refblock"))
    if _u(">I", data, 60):
        snap = _u(">Q", data, 64)
        out.append((snap, min(snap + 256, len(data)), "snapshots"))
    return [(s, e, k) for s, e, k in out if 0 <= s < e <= len(data)]


# -- mutations ---------------------------------------------------------------------------------


class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...

    def choice(self, options: list): ...


class RandomChooser:
    def __init__(self, rng):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options: list):
        return options[self.rng.randrange(len(options))]


HEADER_FIELDS = {  # name: (offset, struct format), QCOW2-NOTES 1.1
    "version": (4, ">I"), "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"), "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"), "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"), "compression_type": (104, ">B"),
}
EXTENSION_TYPES = [0, 0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77, 0x44415441, 0x12345678]


def interesting_values(data: bytes) -> list[int]:
    cs = 1 << min(max(_u(">I", data, 20), 9), 21)
    size = len(data)
    offsets = [_u(">Q", data, 40), _u(">Q", data, 48), _u(">Q", data, 64), size, size - 8, size + cs, cs, 2 * cs]
    values = [0, 1, 2, 3, 4, 7, 8, 9, 12, 14, 16, 21, 22, 31, 63, 64, 72, 104, 105, 111, 112, 0x1FF, 0x200, 0x201,
              cs - 1, cs + 1, 1023, 1024, 0xFFFF, 1 << 31, (1 << 32) - 1, 1 << 32, (1 << 40), 1 << 55, 1 << 56,
              1 << 61, 1 << 62, 1 << 63, (1 << 63) - 1, (1 << 64) - 1, OFFSET_MASK]
    for off in offsets:
        values += [off, off | (1 << 63), off | (1 << 62), off | 1, off + 512, (off - cs) & ((1 << 64) - 1)]
    return [v & ((1 << 64) - 1) for v in values]


def mutate(data: bytes, spans: list[tuple[int, int, str]], choose: Chooser, count: int) -> bytes:
    """Apply `count` mutations to a copy of `data`, mostly inside `spans`."""
    buf = bytearray(data)
    for _ in range(count):
        if not buf:
            break
        kind = choose.choice(["byte", "bit", "u64", "u64", "u32", "field", "field", "extension", "copy", "resize"])
        start, end, _label = choose.choice(spans) if spans else (0, len(buf), "any")
        start, end = min(start, len(buf) - 1), min(max(end, start + 1), len(buf))
        if kind == "byte":
            buf[choose.integer(start, end - 1)] = choose.integer(0, 255)
        elif kind == "bit":
            at = choose.integer(start, end - 1)
            buf[at] ^= 1 << choose.integer(0, 7)
        elif kind in ("u64", "u32"):
            width = 8 if kind == "u64" else 4
            at = choose.integer(start // width, max(start, end - width) // width) * width
            if at + width > len(buf):
                continue
            if choose.integer(0, 3):
                value = choose.choice(interesting_values(buf))
            else:
                value = choose.integer(0, (1 << 64) - 1)
            buf[at:at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
        elif kind == "field":
            offset, fmt = HEADER_FIELDS[choose.choice(sorted(HEADER_FIELDS))]
            width = struct.calcsize(fmt)
            if offset + width <= len(buf):
                value = choose.choice(interesting_values(buf)) & ((1 << (8 * width)) - 1)
                buf[offset:offset + width] = value.to_bytes(width, "big")
        elif kind == "extension":
            headers = extension_headers(bytes(buf))
            if not headers:
                continue
            at = choose.choice(headers)
            if choose.integer(0, 1):
                length = choose.choice([0, 1, 4, 7, 8, 9, 16, 47, 48, 384, 1000, 4096, 65536, (1 << 32) - 1])
                buf[at + 4:at + 8] = length.to_bytes(4, "big")
            else:
                buf[at:at + 4] = choose.choice(EXTENSION_TYPES).to_bytes(4, "big")
        elif kind == "copy":
            src = choose.integer(0, max(0, len(buf) - 8)) // 8 * 8
            dst = choose.integer(start // 8, max(start, end - 8) // 8) * 8
            buf[dst:dst + 8] = buf[src:src + 8]
        else:  # resize: cut the file, or grow it with zeros
            if choose.integer(0, 1):
                del buf[choose.integer(0, len(buf) - 1):]
            else:
                buf += bytes(choose.integer(1, 64 * KiB))
    return bytes(buf)


def mutate_seed(seed: Seed, choose: Chooser, *, header_only: bool = False, max_mutations: int = 6) -> dict[str, bytes]:
    """The seed's files with one qcow2 file mutated."""
    target = choose.choice(list(seed.targets))
    spans = seed.regions[target]
    if header_only:
        spans = [s for s in spans if s[2] == "header"]
    files = dict(seed.files)
    files[target] = mutate(files[target], spans, choose, choose.integer(1, max_mutations))
    return files


# -- running the reader on a set of files --------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `Hang` if the block runs longer than `seconds` (main thread only)."""

    def fire(signum, frame):
        raise Hang(f"example ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Hang as exc:
        raise TimedOut(str(exc)) from exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name.replace("/", "_"), os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def check_header(data: bytes, file_size: int | None = None, name: str = "fuzz") -> str:
    """parse_header on the first 2 MiB; the round-trip property on success. Returns an outcome."""
    file_size = len(data) if file_size is None else file_size
    try:
        header = parse_header(data[:2 * MiB], file_size, name=name)
    except VfsnapError as exc:
        return type(exc).__name__
    if not 9 <= header.cluster_bits <= 21 or header.l1_size * 8 > 32 * MiB:
        raise Finding(f"accepted a header with cluster_bits={header.cluster_bits} l1_size={header.l1_size}")
    if header.backing_file is not None and len(header.backing_file.encode()) > 1023:
        raise Finding("accepted a backing file name longer than 1023 bytes")
    if header.l1_size and header.l1_table_offset + header.l1_size * 8 > file_size:
        raise Finding("accepted an L1 table beyond the end of the file")
    try:
        area = serialize_header_area(header, header.cluster_size)
    except VfsnapError:
        return "ok-unserializable"
    again_data = area + data[len(area):header.cluster_size] if len(data) > len(area) else area
    again_data = bytes(again_data) + bytes(max(0, 104 - len(again_data)))
    try:
        again = parse_header(again_data, file_size, name=name)
    except VfsnapError as exc:
        raise Finding(f"a header vfsnap rewrote no longer parses: {exc}") from None
    for attr in ("version", "cluster_bits", "size", "l1_size", "l1_table_offset", "refcount_table_offset",
                 "refcount_table_clusters", "nb_snapshots", "snapshots_offset", "incompatible_features",
                 "compatible_features", "autoclear_features", "refcount_order", "header_length",
                 "compression_type", "unknown_fields", "extensions", "backing_file"):
        if getattr(again, attr) != getattr(header, attr):
            raise Finding(f"header rewrite changed {attr}: {getattr(header, attr)!r} -> {getattr(again, attr)!r}")
    return "ok"


@dataclass
class Outcome:
    headers: list[str] = field(default_factory=list)
    chain: str = ""
    reads_ok: int = 0
    reads_failed: int = 0
    check: str = ""
    repair: str = ""

    def summary(self) -> str:
        return f"chain={self.chain} reads={self.reads_ok}/{self.reads_ok + self.reads_failed} check={self.check} repair={self.repair}"


def _read_plan(size: int) -> list[tuple[int, int]]:
    if size <= MAX_FULL_READ:
        plan = [(off, 64 * KiB) for off in range(0, size, 64 * KiB)]
    else:
        plan = [(off, 64 * KiB) for off in range(0, MiB, 64 * KiB)]
        plan += [(size * i // 9 // 4096 * 4096, 8 * KiB) for i in range(1, 9)] + [(max(0, size - 64 * KiB), 64 * KiB)]
    plan += [(size // 3 | 1, 777), (max(0, size - 100), 4096), (size, 10)]
    return plan


def exercise(files: dict[str, bytes], top: str, top_format: str, base_format: str, *,
             cache_bytes: int = CACHE_BYTES, check: bool = True, repair: bool = True) -> Outcome:
    """Do with `files` what the daemon does with a volume's files (see the module docstring)."""
    outcome = Outcome()
    for name, data in sorted(files.items()):
        if data[:4] == b"QFI\xfb":
            outcome.headers.append(f"{name}:{check_header(data, name=name)}")

    cache = TableCache(cache_bytes)
    opened: list = []

    def open_member(name: str, image_format: str):
        if name not in files:
            from vfsnap.errors import NotFound

            raise NotFound(f"{name}: no such file")
        fd = _memfd(name, files[name])
        try:
            image = open_image(fd, name, image_format, writable=False, table_cache=cache)
        except BaseException:
            os.close(fd)
            raise
        opened.append(image)
        return image

    rules = ChainRules(VOLUME, base_format=base_format, max_depth=8)
    try:
        try:
            chain = backing_chain(top, top_format, rules, open_member)
            view = View(chain, name=VOLUME)
            outcome.chain = f"depth {len(chain)}"
        except VfsnapError as exc:
            outcome.chain = type(exc).__name__
            view = None
        if view is not None:
            size = view.size
            for offset, length in _read_plan(size):
                try:
                    data = view.read(offset, length)
                except VfsnapError:
                    outcome.reads_failed += 1
                    continue
                want = max(0, min(length, size - offset))
                if len(data) != want:
                    raise Finding(f"read({offset}, {length}) of a {size}-byte disk returned {len(data)} bytes")
                outcome.reads_ok += 1
            from vfsnap.format.check import check_image

            for image in view.images if check else ():
                if isinstance(image, Qcow2Image):
                    try:
                        check_image(image)
                        outcome.check += "c"
                    except VfsnapError:
                        outcome.check += "E"
    finally:
        for image in opened:
            image.close()
    if cache.used_bytes:
        raise Finding(f"closing every image left {cache.used_bytes} bytes of the table cache budget in use")
    if repair:
        outcome.repair = repair_dirty(files, cache_bytes=cache_bytes)
    return outcome


def repair_dirty(files: dict[str, bytes], *, cache_bytes: int = CACHE_BYTES) -> str:
    """What `Volume.repair_dirty_images` does at mount to every v3 file with the dirty bit."""
    results = []
    for name, data in sorted(files.items()):
        if len(data) < 80 or data[:4] != b"QFI\xfb" or _u(">I", data, 4) < 3 or not _u(">Q", data, 72) & 1:
            continue
        fd = _memfd(name, data)
        cache = TableCache(cache_bytes)
        try:
            image = open_image(fd, name, "qcow2", writable=True, table_cache=cache)
        except VfsnapError as exc:
            os.close(fd)
            results.append(f"{name}:open-{type(exc).__name__}")
            continue
        try:
            image.prepare_for_writing()
            image.close_writes()
            results.append(f"{name}:repaired")
        except VfsnapError as exc:
            results.append(f"{name}:{type(exc).__name__}")
        finally:
            grown = os.fstat(image.fd).st_size - len(data)
            image.close()
        if grown > MAX_REPAIR_GROWTH:
            raise Finding(f"repairing {name} grew it by {grown} bytes")
    return ",".join(results)


def exercise_seed(seed: Seed, files: dict[str, bytes], **kwargs) -> Outcome:
    return exercise(files, seed.top, seed.top_format, seed.base_format, **kwargs)
