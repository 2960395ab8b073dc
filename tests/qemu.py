"""QEMU's tools as the oracle: build chains with qemu-img/qemu-io, and read them back flat."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import subprocess
from pathlib import Path


def run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, **kwargs)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("qemu-img", *args, check=check)


def qemu_io(image: Path | str, *commands: str, fmt: str = "qcow2", extra: tuple[str, ...] = ()) -> str:
    """Run qemu-io commands on an image; raise if any of them failed."""
    args = ["qemu-io", "-f", fmt, *extra]
    for command in commands:
        args += ["-c", command]
    args.append(str(image))
    result = run(*args)
    # qemu-io reports failed commands on stdout and still exits 0.
    for line in (result.stdout + result.stderr).splitlines():
        if "failed" in line.lower() or "error" in line.lower():
            raise AssertionError(f"qemu-io {commands}: {line}")
    return result.stdout


def create(path: Path | str, size: int | str, *, fmt: str = "qcow2", backing: str | None = None,
           backing_fmt: str | None = None, options: str | None = None) -> None:
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    if options:
        args += ["-o", options]
    args += [str(path), str(size)]
    qemu_img(*args)


def convert_raw(top: Path | str, out: Path | str, *, fmt: str = "qcow2") -> Path:
    qemu_img("convert", "-f", fmt, "-O", "raw", str(top), str(out))
    return Path(out)


def flat_bytes(top: Path | str, tmp_path: Path, *, fmt: str = "qcow2") -> bytes:
    out = tmp_path / f"oracle-{os.getpid()}-{Path(top).name}.raw"
    convert_raw(top, out, fmt=fmt)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def oracle_sha256(top: Path | str, tmp_path: Path, *, fmt: str = "qcow2") -> str:
    out = tmp_path / f"oracle-{Path(top).name}.raw"
    convert_raw(top, out, fmt=fmt)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def check(image: Path | str) -> dict:
    """`qemu-img check --output=json`; returns the document (exit status in 'exit')."""
    result = run("qemu-img", "check", "--output=json", str(image), check=False)
    document = json.loads(result.stdout) if result.stdout.strip() else {}
    document["exit"] = result.returncode
    document["stderr"] = result.stderr
    return document


def info(image: Path | str, *, chain: bool = False) -> dict | list:
    args = ["info", "--output=json", "-U"]
    if chain:
        args.append("--backing-chain")
    return json.loads(qemu_img(*args, str(image)).stdout)


def write_info(share: Path, volume: str, active: str, snapshots: dict[str, str]) -> None:
    """Write `<vol>.info` exactly as Cinder does."""
    with open(share / f"{volume}.info", "w") as f:
        json.dump({"active": active, **snapshots}, f, indent=1, sort_keys=True)


def make_chain(share: Path, volume: str, *, size: int, depth: int, base_fmt: str = "raw",
               cluster_size: int | None = None, writes=None, base_options: str | None = None,
               overlay_options: str | None = None) -> list[str]:
    """Build a Cinder chain `vol <- vol.s1 <- ... <- vol.s<depth>` with qemu tools.

    `writes(level, path, fmt)` is called for every image, bottom first, to put data in it.
    Snapshot `s<i>` maps to overlay `vol.s<i>`; the last overlay is active. Returns file names.
    """
    opts = [o for o in (f"cluster_size={cluster_size}" if cluster_size and base_fmt == "qcow2" else None,
                        base_options) if o]
    create(share / volume, size, fmt=base_fmt, options=",".join(opts) or None)
    names = [volume]
    if writes:
        writes(0, share / volume, base_fmt)
    for level in range(1, depth + 1):
        name = f"{volume}.s{level}"
        opts = [o for o in (f"cluster_size={cluster_size}" if cluster_size else None, overlay_options) if o]
        create(share / name, size, backing=names[-1], backing_fmt=base_fmt if level == 1 else "qcow2",
               options=",".join(opts) or None)
        names.append(name)
        if writes:
            writes(level, share / name, "qcow2")
    if depth:
        write_info(share, volume, names[-1], {f"s{i}": names[i] for i in range(1, depth + 1)})
    return names


# -- Helpers of the read-path acceptance tests (tests/test_read_*.py, tests/test_format_*.py) ------------------

def chain_views(names: list[str], base_fmt: str) -> list[tuple[str, str, str]]:
    """`(view, top file, top format)` for the live view and every snapshot view of a `make_chain` chain.

    The live view is the whole chain; snapshot `s<i>` is the chain *below* overlay `names[i]`,
    i.e. the chain ending at `names[i-1]`.
    """
    views = [("live", names[-1], base_fmt if len(names) == 1 else "qcow2")]
    for i in range(1, len(names)):
        views.append((f"s{i}", names[i - 1], base_fmt if i == 1 else "qcow2"))
    return views


def view_path(mnt, volume: str, view: str) -> Path:
    """The mounted file of `view` ("live" or a snapshot id) of `volume`."""
    return mnt.volume(volume) if view == "live" else mnt.snapshot(volume, view)


def first_mismatch(actual: Path | str, expected: Path | str, chunk: int = 1 << 20) -> str | None:
    """None when both files hold the same bytes; else where and how they first differ (with sha256s)."""
    size_a, size_e = os.path.getsize(actual), os.path.getsize(expected)
    digest_a, digest_e = hashlib.sha256(), hashlib.sha256()
    where = None
    with open(actual, "rb") as fa, open(expected, "rb") as fe:
        pos = 0
        while True:
            a, e = fa.read(chunk), fe.read(chunk)
            if not a and not e:
                break
            digest_a.update(a)
            digest_e.update(e)
            if where is None and a != e:
                n = next((i for i, (x, y) in enumerate(zip(a, e)) if x != y), min(len(a), len(e)))
                where = (f"first difference at byte {pos + n:#x}: "
                         f"got {a[n:n + 16].hex()} expected {e[n:n + 16].hex()}")
            pos += max(len(a), len(e))
    if where is None and size_a == size_e:
        return None
    return (f"size {size_a} vs oracle {size_e}; sha256 {digest_a.hexdigest()} vs {digest_e.hexdigest()}; "
            f"{where or 'common prefix identical'}")


def boundary_offsets(size: int, units: list[int], *, extra: tuple[int, ...] = (), per_unit: int = 4) -> list[int]:
    """Interesting boundaries of a disk of `size` bytes: the first multiples of every unit (cluster
    size, L2-table span), one in the middle, the last one, plus `extra` and the end of the disk."""
    found = set(extra) | {size}
    for unit in units:
        if unit >= size:
            continue
        last = (size - 1) // unit * unit
        found.update(unit * i for i in range(1, per_unit + 1) if unit * i < size)
        found.update({(size // 2) // unit * unit, last})
    return sorted(b for b in found if 0 < b <= size)


def unaligned_read_mismatches(path: Path | str, oracle: bytes | memoryview, boundaries: list[int],
                              ks: tuple[int, ...] = (1, 3, 511, 512, 513, 4095, 4097), *,
                              direct: bool = True, limit: int = 10) -> list[str]:
    """Unaligned preads around each boundary (offset = boundary - k, spanning it) compared with the oracle.

    With `direct` the file is opened O_DIRECT, so the kernel passes the exact offset and length to
    the daemon instead of page-aligned readahead. Returns descriptions of up to `limit` mismatches.
    """
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    bad = []
    try:
        for b in boundaries:
            for k in ks:
                off = b - k
                if off < 0:
                    continue
                for length in (k + 1, 2 * k, k + 65536 + 7):
                    got = os.pread(fd, length, off)
                    want = bytes(oracle[off:off + length])
                    if got != want:
                        n = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
                        bad.append(f"pread({length}, {off:#x}) [boundary {b:#x}]: {len(got)} bytes vs {len(want)}, "
                                   f"first difference at +{n}: got {got[n:n + 8].hex()} expected {want[n:n + 8].hex()}")
                        if len(bad) >= limit:
                            return bad
    finally:
        os.close(fd)
    return bad


def chain_files(share: Path, top: str, top_fmt: str) -> list[dict]:
    """The chain ending at `top`, top first, as qemu-img sees it: for each image its file `name`,
    `format`, `virtual-size` and `units` (cluster size and L2-table span; empty for raw)."""
    if top_fmt == "raw":
        return [{"name": top, "format": "raw", "virtual-size": os.path.getsize(share / top), "units": []}]
    out = []
    for image in info(share / top, chain=True):
        units = []
        if image["format"] == "qcow2":
            cluster = image["cluster-size"]
            extended = image.get("format-specific", {}).get("data", {}).get("extended-l2", False)
            units = [cluster, cluster * (cluster // (16 if extended else 8))]
        out.append({"name": Path(image["filename"]).name, "format": image["format"],
                    "virtual-size": image["virtual-size"], "units": units})
    return out


class ViewOracle:
    """QEMU's answer for one view, computed *before* mounting (so vfsnap's image locks, if any,
    can't get in the way): the flat raw file and the boundaries worth reading across."""

    def __init__(self, volume: str, view: str, raw: Path, boundaries: list[int]):
        self.volume = volume
        self.view = view
        self.raw = raw
        self.size = os.path.getsize(raw)
        self.boundaries = boundaries


def view_oracle(share: Path, volume: str, view: str, top: str, top_fmt: str, workdir: Path, *,
                extra_boundaries: tuple[int, ...] = ()) -> ViewOracle:
    """`qemu-img convert -O raw` of the chain ending at `top`, and its interesting boundaries: the
    cluster and L2-table boundaries of every image of the chain, the ends of shorter images, the
    end of the disk, and `extra_boundaries`."""
    raw = convert_raw(share / top, workdir / f"oracle-{volume}-{view}.raw", fmt=top_fmt)
    size = os.path.getsize(raw)
    units: set[int] = {4096}
    ends: set[int] = set()
    for image in chain_files(share, top, top_fmt):
        units.update(image["units"])
        ends.add(image["virtual-size"])
    boundaries = boundary_offsets(size, sorted(units), extra=tuple(e for e in ends if e < size)
                                  + tuple(b for b in extra_boundaries if b <= size))
    return ViewOracle(volume, view, raw, boundaries)


def chain_oracles(share: Path, volume: str, names: list[str], base_fmt: str, workdir: Path,
                  **kwargs) -> list[ViewOracle]:
    """`view_oracle` for the live view and every snapshot view of a `make_chain` chain."""
    return [view_oracle(share, volume, view, top, fmt, workdir, **kwargs)
            for view, top, fmt in chain_views(names, base_fmt)]


def oracle_mismatches(mnt, oracles: list[ViewOracle], *, ks: tuple[int, ...] | None = None,
                      direct: bool = True) -> list[str]:
    """Everything in which mounted views differ from their oracles: st_size, the whole content
    (sha256, and the first differing byte), and unaligned reads across every boundary (O_DIRECT
    unless `direct` is false, so the daemon sees the exact offsets and lengths)."""
    problems = []
    for oracle in oracles:
        where = f"{oracle.volume}/{oracle.view}"
        path = view_path(mnt, oracle.volume, oracle.view)
        try:
            st_size = os.stat(path).st_size
        except OSError as exc:
            problems.append(f"{where}: stat failed: {exc!r}")
            continue
        if st_size != oracle.size:
            problems.append(f"{where}: st_size {st_size}, qemu-img says {oracle.size}")
        try:
            mismatch = first_mismatch(path, oracle.raw)
        except OSError as exc:
            mismatch = f"reading failed: {exc!r}"
        if mismatch:
            problems.append(f"{where}: content differs from the oracle: {mismatch}")
        with open(oracle.raw, "rb") as f:
            with (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if oracle.size else memoryview(b"")) as data:
                try:
                    bad = unaligned_read_mismatches(path, data, oracle.boundaries, direct=direct,
                                                    **({"ks": ks} if ks else {}))
                except OSError as exc:
                    bad = [f"unaligned read failed: {exc!r}"]
        problems += [f"{where}: {b}" for b in bad]
    return problems


# -- Building malformed qcow2 images (QCOW2-NOTES 1.1 offsets) --------------------------------------------------

HEADER_FIELDS = {  # name: (offset, struct format)
    "magic": (0, ">I"), "version": (4, ">I"), "backing_file_offset": (8, ">Q"), "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"), "size": (24, ">Q"), "crypt_method": (32, ">I"), "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"), "refcount_table_offset": (48, ">Q"), "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"), "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
    "compatible_features": (80, ">Q"), "autoclear_features": (88, ">Q"), "refcount_order": (96, ">I"),
    "header_length": (100, ">I"),
}


def qcow2_header(path: Path | str) -> dict:
    """The header fields of a qcow2 image, read with struct (independently of vfsnap)."""
    with open(path, "rb") as f:
        data = f.read(104)
    return {name: struct.unpack_from(fmt, data, off)[0] for name, (off, fmt) in HEADER_FIELDS.items()
            if off + struct.calcsize(fmt) <= len(data)}


def set_header_field(path: Path | str, name: str, value: int) -> None:
    offset, fmt = HEADER_FIELDS[name]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def l2_entry_offset(path: Path | str, guest_offset: int) -> int:
    """File offset of the L2 entry mapping `guest_offset` (its L1 entry must be allocated)."""
    h = qcow2_header(path)
    cluster_bits = h["cluster_bits"]
    extended = h["version"] >= 3 and h["incompatible_features"] & (1 << 4)
    entry_size = 16 if extended else 8
    l2_entries = (1 << cluster_bits) // entry_size
    cluster = guest_offset >> cluster_bits
    l1_index, l2_index = divmod(cluster, l2_entries)
    with open(path, "rb") as f:
        f.seek(h["l1_table_offset"] + 8 * l1_index)
        l1_entry = struct.unpack(">Q", f.read(8))[0]
    l2_offset = l1_entry & 0x00FFFFFFFFFFFE00
    assert l2_offset, f"{path}: no L2 table for guest offset {guest_offset:#x}"
    return l2_offset + entry_size * l2_index


def read_u64(path: Path | str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def write_u64(path: Path | str, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def _cluster_size(path: Path | str) -> int:
    return 1 << qcow2_header(path)["cluster_bits"]


def header_area_end(data: bytes, version: int) -> int:
    """End of the header area as QEMU wrote it: the end of the backing name, or else the end of
    the END extension marker (found by walking the extensions, independently of vfsnap)."""
    backing_offset, backing_size = struct.unpack_from(">QI", data, 8)
    if backing_offset:
        return backing_offset + backing_size
    offset = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
    while True:
        ext_type, length = struct.unpack_from(">II", data, offset)
        offset += 8
        if ext_type == 0:
            return offset
        offset += (length + 7) & ~7


def insert_extension(path: Path | str, ext_type: int, payload: bytes) -> None:
    """Add an extension to cluster 0 of an image (before the END marker; the backing name moves)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read(_cluster_size(path)))
        version = struct.unpack_from(">I", data, 4)[0]
        offset = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
        while True:
            t, length = struct.unpack_from(">II", data, offset)
            if t == 0:
                break
            offset += 8 + ((length + 7) & ~7)
        blob = struct.pack(">II", ext_type, len(payload)) + payload + b"\0" * (-len(payload) % 8)
        backing_offset, backing_size = struct.unpack_from(">QI", data, 8)
        name = bytes(data[backing_offset:backing_offset + backing_size]) if backing_offset else b""
        tail_end = offset + 8
        new = data[:offset] + blob + data[offset:tail_end]
        if backing_offset:
            struct.pack_into(">Q", new, 8, len(new))
            new += name
        assert len(new) <= len(data), "the header area no longer fits in cluster 0"
        f.seek(0)
        f.write(new + b"\0" * (len(data) - len(new)))


def rewrite_v3_header_length(path: Path | str, new_length: int, extra: bytes = b"") -> None:
    """Rewrite cluster 0 of a default v3 image with another header_length (104: no compression
    byte; >112: unknown fields `extra`), moving the extensions and the backing name."""
    with open(path, "r+b") as f:
        data = bytearray(f.read(_cluster_size(path)))
        old_length = struct.unpack_from(">I", data, 100)[0]
        backing_offset, backing_size = struct.unpack_from(">QI", data, 8)
        name = bytes(data[backing_offset:backing_offset + backing_size]) if backing_offset else b""
        ext_end = backing_offset if backing_offset else header_area_end(data, 3)
        extensions = bytes(data[old_length:ext_end])
        fixed = bytearray(data[:min(new_length, 112)])
        struct.pack_into(">I", fixed, 100, new_length)
        new = fixed + extra + extensions
        assert len(fixed) + len(extra) == new_length
        if backing_offset:
            struct.pack_into(">Q", new, 8, len(new))
            new += name
        assert len(new) <= len(data), "the header area no longer fits in cluster 0"
        f.seek(0)
        f.write(new + b"\0" * (len(data) - len(new)))


def drop_extension(path: Path | str, ext_type: int) -> None:
    """Remove one header extension from cluster 0 (the backing name moves down)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read(_cluster_size(path)))
        version = struct.unpack_from(">I", data, 4)[0]
        start = 72 if version == 2 else struct.unpack_from(">I", data, 100)[0]
        offset, kept = start, b""
        while True:
            t, length = struct.unpack_from(">II", data, offset)
            size = 8 + ((length + 7) & ~7)
            if t != ext_type:
                kept += bytes(data[offset:offset + (8 if t == 0 else size)])
            if t == 0:
                break
            offset += size
        backing_offset, backing_size = struct.unpack_from(">QI", data, 8)
        name = bytes(data[backing_offset:backing_offset + backing_size]) if backing_offset else b""
        new = data[:start] + kept
        if backing_offset:
            struct.pack_into(">Q", new, 8, len(new))
            new += name
        assert len(new) <= len(data), "the header area no longer fits in cluster 0"
        f.seek(0)
        f.write(new + b"\0" * (len(data) - len(new)))
