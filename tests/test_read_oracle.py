"""Acceptance tests of the read path (issue #2): every view equals `qemu-img convert -O raw`.

DESIGN.md invariant 1 over real mounts. Each case builds one or more volumes on a share with
qemu-img/qemu-io, mounts the share once, and compares for every volume the live view and every
snapshot view (the chain *below* the snapshot's overlay) with QEMU's flattening of the same chain:
st_size, the whole content (sha256, with the first differing byte on failure), and unaligned
O_DIRECT preads straddling the cluster and L2-table boundaries of every image of the chain, the
ends of shorter backing files and the end of the disk (QCOW2-NOTES checklist (a) 9-17).

The data written is random bytes mixed with runs and unique text, so a cluster read from the
wrong place, or at the wrong offset inside the right place, never looks right by accident,
and qcow2 compression still finds clusters worth compressing.
"""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import requires_fuse
from tests.qemu import (
    chain_oracles,
    check,
    convert_raw,
    create,
    drop_extension,
    info,
    insert_extension,
    make_chain,
    oracle_mismatches,
    qcow2_header,
    qemu_img,
    qemu_io,
    rewrite_v3_header_length,
    set_header_field,
    unaligned_read_mismatches,
    view_oracle,
    write_info,
)

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20


# -- data --------------------------------------------------------------------------------------


class Source:
    """Files of test data for `qemu-io write -s`, kept outside the share."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        self.count = 0

    def file(self, rng: random.Random, length: int) -> Path:
        blocks = []
        for i in range(-(-length // 64)):
            kind = rng.random()
            if kind < 0.5:
                blocks.append(rng.randbytes(64))
            elif kind < 0.75:
                blocks.append(bytes([rng.randrange(256)]) * 64)
            else:
                blocks.append(f"<{self.count}:{i}>".encode().ljust(64, b"."))
        self.count += 1
        path = self.dir / f"src{self.count}"
        path.write_bytes(b"".join(blocks)[:length])
        return path

    def write(self, rng: random.Random, offset: int, length: int) -> str:
        return f"write -s {self.file(rng, length)} {offset} {length}"


def random_writes(src: Source, tag: str, size: int, *, max_len: int, units: tuple[int, ...] = (),
                  zeros: bool = True, base_fill: float = 0.75, count: int = 3):
    """A `make_chain` writes callback: the base gets data over `base_fill` of the disk; every
    overlay gets `count` random writes, one write straddling a random boundary of `units`, and
    (with `zeros`) a zero write (randomly with -u) and a discard over random ranges."""

    def clip(offset: int, length: int) -> tuple[int, int]:
        offset = min(offset, size - 1)
        return offset, max(1, min(length, size - offset))

    def writes(level: int, path: Path, fmt: str) -> None:
        rng = random.Random(f"{tag}/{level}")
        cmds = []
        if level == 0 and base_fill:
            cmds.append(src.write(rng, 0, int(size * base_fill)))
        for _ in range(count):
            cmds.append(src.write(rng, *clip(rng.randrange(size), rng.randint(1, max_len))))
        if units:
            unit = rng.choice(units)
            if unit < size:
                boundary = rng.randrange(1, (size - 1) // unit + 1) * unit
                before = rng.randint(1, min(unit, 16 * KiB))
                cmds.append(src.write(rng, *clip(boundary - before, before + rng.randint(1, min(unit, 16 * KiB)))))
        if zeros and level:
            off, length = clip(rng.randrange(size), rng.randint(1, max_len))
            cmds.append(f"write -z {'-u ' if rng.random() < 0.5 else ''}{off} {length}")
            off, length = clip(rng.randrange(size), rng.randint(1, max_len))
            cmds.append(f"discard {off} {length}")
        qemu_io(path, *cmds, fmt=fmt)

    return writes


def assert_no_mismatch(problems: list[str]) -> None:
    assert not problems, f"{len(problems)} mismatches with qemu-img convert:\n" + "\n".join(problems[:30])


# -- the matrix: base format x depth x cluster size --------------------------------------------

MATRIX = [
    # base, depth, cluster size, virtual size
    ("raw", 0, None, 5 * MiB + 3 * KiB),
    ("qcow2", 0, 512, 1 * MiB),
    ("qcow2", 0, 4 * KiB, 6 * MiB),
    ("qcow2", 0, 64 * KiB, 6 * MiB),
    ("qcow2", 0, 2 * MiB, 9 * MiB),
    ("raw", 1, 64 * KiB, 6 * MiB),
    ("raw", 8, 64 * KiB, 6 * MiB),
    ("raw", 32, 64 * KiB, 4 * MiB),
    ("raw", 8, 512, 1 * MiB),
    ("raw", 8, 4 * KiB, 6 * MiB),
    ("raw", 1, 2 * MiB, 9 * MiB),
    ("raw", 8, 2 * MiB, 9 * MiB),
    ("qcow2", 1, 64 * KiB, 6 * MiB),
    ("qcow2", 8, 512, 1 * MiB),
    ("qcow2", 8, 4 * KiB, 6 * MiB),
    ("qcow2", 32, 4 * KiB, 3 * MiB),
    ("qcow2", 32, 512, 512 * KiB),
    ("qcow2", 8, 64 * KiB, 6 * MiB),
    ("qcow2", 1, 2 * MiB, 9 * MiB),
    ("qcow2", 8, 2 * MiB, 9 * MiB),
]


def _matrix_id(case) -> str:
    base, depth, cluster, size = case
    return f"{base}-depth{depth}-cluster{cluster or 'none'}"


@pytest.mark.parametrize("case", MATRIX, ids=_matrix_id)
def test_matrix_views_equal_qemu(case, share, tmp_path, vfsnap_mount):
    base, depth, cluster, size = case
    src = Source(tmp_path / "src")
    units = (cluster, cluster * (cluster // 8)) if cluster else (4096,)
    max_len = min(3 * (cluster or 4096), 1 * MiB)
    names = make_chain(share, "vol", size=size, depth=depth, base_fmt=base, cluster_size=cluster,
                       writes=random_writes(src, _matrix_id(case), size, max_len=max_len, units=units))
    oracles = chain_oracles(share, "vol", names, base, tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


def test_mixed_cluster_sizes_in_one_chain(share, tmp_path, vfsnap_mount):
    """Every level with its own cluster size (and one extended-L2 level): boundaries of all of them."""
    src = Source(tmp_path / "src")
    size = 5 * MiB
    layers = [("qcow2", "cluster_size=2M"), ("qcow2", "cluster_size=512"), ("qcow2", "cluster_size=64k"),
              ("qcow2", "cluster_size=4k"), ("qcow2", "cluster_size=16k,extended_l2=on"),
              ("qcow2", "cluster_size=128k")]
    names = []
    for level, (fmt, options) in enumerate(layers):
        name = "vol" if level == 0 else f"vol.s{level}"
        create(share / name, size, fmt=fmt, options=options, backing=names[-1] if names else None, backing_fmt="qcow2")
        names.append(name)
        random_writes(src, "mixed", size, max_len=192 * KiB, units=(512, 4096, 16 * KiB, 64 * KiB, 2 * MiB))(
            level, share / name, fmt)
    write_info(share, "vol", names[-1], {f"s{i}": names[i] for i in range(1, len(names))})
    oracles = chain_oracles(share, "vol", names, "qcow2", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


# -- compressed clusters -----------------------------------------------------------------------


def _compressed_clusters(path: Path) -> int:
    return check(path).get("compressed-clusters", 0)


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", [512, 4 * KiB, 64 * KiB, 2 * MiB])
def test_compressed_base_under_overlays(compression, cluster, share, tmp_path, vfsnap_mount):
    """`qemu-img convert -c` base (deflate or zstd), with overlays writing over part of it."""
    src = Source(tmp_path / "src")
    size = 2 * MiB if cluster == 512 else 6 * MiB  # 512-byte clusters: 4096 compressed clusters already
    raw = tmp_path / "plain.raw"
    create(raw, size, fmt="raw")
    random_writes(src, f"cbase-{compression}-{cluster}", size, max_len=256 * KiB, count=6, base_fill=0.9)(0, raw, "raw")
    options = f"cluster_size={cluster}" + (",compression_type=zstd" if compression == "zstd" else "")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, str(raw), str(share / "vol"))
    assert _compressed_clusters(share / "vol") > 0, "the setup should have produced compressed clusters"
    assert info(share / "vol")["format-specific"]["data"]["compression-type"] == compression
    names = ["vol"]
    for level in (1, 2):
        name = f"vol.s{level}"
        create(share / name, size, backing=names[-1], backing_fmt="qcow2", options=f"cluster_size={cluster}")
        names.append(name)
        random_writes(src, f"cover-{compression}-{cluster}", size, max_len=3 * cluster,
                      units=(cluster,), base_fill=0)(level, share / name, "qcow2")
    write_info(share, "vol", names[-1], {"s1": "vol.s1", "s2": "vol.s2"})
    # The same compressed image as a volume of its own (depth 0).
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, str(raw), str(share / "flat"))
    oracles = chain_oracles(share, "vol", names, "qcow2", tmp_path)
    oracles += chain_oracles(share, "flat", ["flat"], "qcow2", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


def test_compressed_overlays_in_a_chain(share, tmp_path, vfsnap_mount):
    """Compressed clusters in overlays: `qemu-io write -c` (deflate and zstd overlays) and
    `qemu-img convert -c -B` (only the clusters that differ from the backing, compressed)."""
    src = Source(tmp_path / "src")
    size = 4 * MiB
    cs = 64 * KiB
    create(share / "vol", size, fmt="raw")
    random_writes(src, "co", size, max_len=cs)(0, share / "vol", "raw")
    rng = random.Random("compressed-overlays")

    def compressed_writes(path: Path, n: int) -> None:
        cmds = []
        for cluster in rng.sample(range(size // cs), n):
            cmds.append(src.write(rng, cluster * cs, cs).replace("write ", "write -c ", 1))
        qemu_io(path, *cmds)

    create(share / "vol.s1", size, backing="vol", backing_fmt="raw")
    compressed_writes(share / "vol.s1", 20)
    create(share / "vol.s2", size, backing="vol.s1", backing_fmt="qcow2", options="compression_type=zstd")
    compressed_writes(share / "vol.s2", 20)
    qemu_io(share / "vol.s2", src.write(rng, 5 * cs + 100, 3 * cs))  # partial overwrites of compressed ones
    # vol.s3: a plain overlay with data, then recompressed against its backing with convert -c -B.
    create(tmp_path / "s3.tmp", size, backing=str(share / "vol.s2"), backing_fmt="qcow2")
    random_writes(src, "co3", size, max_len=3 * cs, zeros=False, count=5)(3, tmp_path / "s3.tmp", "qcow2")
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "-B", "vol.s2", "-F", "qcow2",
             str(tmp_path / "s3.tmp"), str(share / "vol.s3"))
    create(share / "vol.s4", size, backing="vol.s3", backing_fmt="qcow2")
    random_writes(src, "co4", size, max_len=3 * cs)(4, share / "vol.s4", "qcow2")
    for name in ("vol.s1", "vol.s2", "vol.s3"):
        assert _compressed_clusters(share / name) > 0, name
    names = ["vol", "vol.s1", "vol.s2", "vol.s3", "vol.s4"]
    write_info(share, "vol", names[-1], {f"s{i}": names[i] for i in range(1, 5)})
    oracles = chain_oracles(share, "vol", names, "raw", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


# -- zero clusters and discard -----------------------------------------------------------------


def test_zero_clusters_and_discard(share, tmp_path, vfsnap_mount):
    """zero-plain (0x1), zero-alloc, `write -z -u`, partial zero writes and discard, over backing data."""
    src = Source(tmp_path / "src")
    size = 4 * MiB
    cs = 64 * KiB
    rng = random.Random("zeros")
    create(share / "vol", size, fmt="raw")
    qemu_io(share / "vol", src.write(rng, 0, size), fmt="raw")
    create(share / "vol.s1", size, backing="vol", backing_fmt="raw")
    qemu_io(share / "vol.s1", src.write(rng, 0, 16 * cs))  # allocated clusters 0-15
    create(share / "vol.s2", size, backing="vol.s1", backing_fmt="qcow2")
    qemu_io(share / "vol.s2", src.write(rng, 20 * cs, 12 * cs))  # allocated clusters 20-31 in s2
    qemu_io(
        share / "vol.s2",
        f"write -z {2 * cs} {2 * cs}",  # unallocated in s2 (data in s1): zero-plain
        f"write -z {20 * cs} {2 * cs}",  # allocated in s2, no -u: zero-alloc
        f"write -z -u {23 * cs} {2 * cs}",  # allocated, -u: zero-plain, cluster freed
        f"write -z {26 * cs + 1000} 5000",  # partial zero write inside an allocated cluster
        f"write -z {40 * cs + 300} {cs}",  # partial zero write over backing data: allocates
        f"discard {5 * cs} {3 * cs}",  # discard over backing data: zero-plain
        f"discard {28 * cs} {cs}",  # discard of an allocated cluster
        f"discard {30 * cs + 512} 4096",  # partial discard: no-op or zeros, the oracle says which
        f"write -z {50 * cs} {4 * cs}",  # zeros over unallocated backing-only range
    )
    create(share / "vol.s3", size, backing="vol.s2", backing_fmt="qcow2")
    qemu_io(share / "vol.s3", src.write(rng, 3 * cs - 100, 300), src.write(rng, 21 * cs + 7, cs),
            f"write -z -u {10 * cs} {cs}", f"discard {12 * cs} {cs}")
    names = ["vol", "vol.s1", "vol.s2", "vol.s3"]
    write_info(share, "vol", names[-1], {f"s{i}": names[i] for i in range(1, 4)})
    # A qcow2 volume without backing, with zero clusters of every kind.
    create(share / "solo", size)
    qemu_io(share / "solo", src.write(rng, 0, size // 2), f"write -z {cs} {cs}", f"write -z -u {3 * cs} {cs}",
            f"discard {5 * cs} {2 * cs}", f"write -z {size // 2} {cs}")
    oracles = chain_oracles(share, "vol", names, "raw", tmp_path)
    oracles += chain_oracles(share, "solo", ["solo"], "qcow2", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


# -- extended L2 (subclusters) -----------------------------------------------------------------


def test_subclusters_extended_l2(share, tmp_path, vfsnap_mount):
    """`extended_l2=on,cluster_size=128k` overlays: partial writes allocate only their subclusters,
    zero writes set zero bits, the rest of the cluster still comes from the backing chain."""
    src = Source(tmp_path / "src")
    size = 8 * MiB
    rng = random.Random("extl2")
    create(share / "vol", size, fmt="raw")
    qemu_io(share / "vol", src.write(rng, 0, size), fmt="raw")
    create(share / "vol.s1", size, backing="vol", backing_fmt="raw", options="extended_l2=on,cluster_size=128k")
    qemu_io(share / "vol.s1",
            src.write(rng, 1 * MiB, 4 * KiB),  # QCOW2-NOTES 1.3 example: bitmap 0x20000000007
            src.write(rng, 1 * MiB + 4 * KiB, 8 * KiB),
            f"write -z {1 * MiB + 36 * KiB} 4k",
            src.write(rng, 2 * MiB + 100, 1000),  # unaligned inside one subcluster
            src.write(rng, 3 * MiB - 3 * KiB, 70 * KiB),  # across a cluster boundary
            f"write -z {4 * MiB + 4 * KiB} 8k",
            f"write -z -u {5 * MiB} 128k",
            f"discard {5 * MiB + 256 * KiB} 8k",
            src.write(rng, 6 * MiB, 128 * KiB))
    create(share / "vol.s2", size, backing="vol.s1", backing_fmt="qcow2", options="extended_l2=on,cluster_size=64k")
    qemu_io(share / "vol.s2", src.write(rng, 1 * MiB + 2 * KiB, 3 * KiB), f"write -z {6 * MiB + 2 * KiB} 2k",
            src.write(rng, 4 * MiB + 5 * KiB, 1))
    create(share / "vol.s3", size, backing="vol.s2", backing_fmt="qcow2")
    qemu_io(share / "vol.s3", src.write(rng, 1 * MiB + 60 * KiB, 8 * KiB))
    names = ["vol", "vol.s1", "vol.s2", "vol.s3"]
    write_info(share, "vol", names[-1], {f"s{i}": names[i] for i in range(1, 4)})
    # An extended-L2 qcow2 base of its own, and one with preallocation=metadata over a backing file
    # (allowed only with extended L2: allocated-but-unwritten subclusters read from the backing).
    create(share / "xbase", size, options="extended_l2=on,cluster_size=32k")
    qemu_io(share / "xbase", src.write(rng, 1000, 70 * KiB), f"write -z {2 * MiB} 3k", src.write(rng, 7 * MiB, 1 * MiB))
    create(share / "pre", size, fmt="raw")
    qemu_io(share / "pre", src.write(rng, 0, size), fmt="raw")
    create(share / "pre.s1", size, backing="pre", backing_fmt="raw",
           options="extended_l2=on,cluster_size=128k,preallocation=metadata")
    qemu_io(share / "pre.s1", src.write(rng, 512 * KiB + 3 * KiB, 10 * KiB))
    write_info(share, "pre", "pre.s1", {"s1": "pre.s1"})
    assert info(share / "vol.s1")["format-specific"]["data"]["extended-l2"] is True
    oracles = chain_oracles(share, "vol", names, "raw", tmp_path)
    oracles += chain_oracles(share, "xbase", ["xbase"], "qcow2", tmp_path)
    oracles += chain_oracles(share, "pre", ["pre", "pre.s1"], "raw", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


# -- v2 images ---------------------------------------------------------------------------------


def test_v2_images(share, tmp_path, vfsnap_mount):
    """compat=0.10: header of 72 bytes, extensions from byte 72, including a v2 overlay whose
    backing-format extension says "qcow2" (a reader taking v3 fields from it breaks)."""
    src = Source(tmp_path / "src")
    size = 4 * MiB
    names = make_chain(share, "vol", size=size, depth=3, base_fmt="qcow2", base_options="compat=0.10",
                       overlay_options="compat=0.10",
                       writes=random_writes(src, "v2", size, max_len=200 * KiB, units=(64 * KiB,)))
    for name in names:
        assert info(share / name)["format-specific"]["data"]["compat"] == "0.10"
    assert info(share / "vol.s1")["backing-filename-format"] == "qcow2"
    names_raw = make_chain(share, "rawv2", size=size, depth=2, base_fmt="raw", overlay_options="compat=0.10",
                           cluster_size=4096,
                           writes=random_writes(src, "v2raw", size, max_len=20 * KiB, units=(4096, 2 * MiB)))
    oracles = chain_oracles(share, "vol", names, "qcow2", tmp_path)
    oracles += chain_oracles(share, "rawv2", names_raw, "raw", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


# -- backing files of other sizes, odd virtual sizes -------------------------------------------


def _chain_of_sizes(share: Path, src: Source, volume: str, base_fmt: str, sizes: list[int], *, tag: str,
                    options: str | None = None) -> list[str]:
    """A chain whose images have the given virtual sizes, every one written near its own end and
    across the ends of the others."""
    names = []
    ends = sorted(set(sizes))
    for level, size in enumerate(sizes):
        name = volume if level == 0 else f"{volume}.s{level}"
        fmt = base_fmt if level == 0 else "qcow2"
        if fmt == "raw":  # exactly `size` bytes (qemu-img create rounds up to 512)
            with open(share / name, "wb") as f:
                f.truncate(size)
        else:
            create(share / name, size, options=options, backing=names[-1] if names else None,
                   backing_fmt=base_fmt if level == 1 else "qcow2")
        names.append(name)
        rng = random.Random(f"{tag}/{level}")
        size = info(share / name)["virtual-size"] if fmt == "qcow2" else size
        cmds = []
        if level == 0:
            cmds.append(src.write(rng, 0, size))
        for end in ends:
            if end < size and rng.random() < 0.7:
                off = max(0, end - rng.randint(1, 6000))
                cmds.append(src.write(rng, off, min(size - off, rng.randint(1, 12000))))
        off = max(0, size - rng.randint(1, 3000))
        cmds.append(src.write(rng, off, size - off))
        if level:
            cmds.append(f"write -z {rng.randrange(size // 2)} {rng.randint(1, size // 4)}")
        qemu_io(share / name, *cmds, fmt=fmt)
    if len(names) > 1:
        write_info(share, volume, names[-1], {f"s{i}": names[i] for i in range(1, len(names))})
    return names


def test_backing_shorter_and_longer_than_overlay(share, tmp_path, vfsnap_mount):
    """Backing shorter than the overlay reads as zeros past its end (also when an image further
    down is longer again); backing longer than the overlay is clipped to the overlay's size."""
    src = Source(tmp_path / "src")
    chains = {
        "shortraw": ("raw", [2 * MiB + 1536, 6 * MiB, 6 * MiB]),
        "growing": ("qcow2", [3 * MiB, 5 * MiB, 8 * MiB]),
        "middle": ("qcow2", [6 * MiB, 3 * MiB - 512, 6 * MiB]),
        "longer": ("raw", [8 * MiB, 4 * MiB, 4 * MiB]),
        "longq": ("qcow2", [8 * MiB, 3 * MiB + 512, 5 * MiB]),
    }
    built = {vol: (fmt, _chain_of_sizes(share, src, vol, fmt, sizes, tag=vol)) for vol, (fmt, sizes) in chains.items()}
    oracles = []
    for vol, (fmt, names) in built.items():
        oracles += chain_oracles(share, vol, names, fmt, tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


def test_virtual_size_not_cluster_aligned(share, tmp_path, vfsnap_mount):
    """`create ... 1000` stores 1024: st_size and the short read at the end follow qemu-img."""
    src = Source(tmp_path / "src")
    chains = {
        "tiny": ("raw", [1536, 1000, 1000], None),  # overlays of 1000 bytes store 1024: backing clipped
        "tinyq": ("qcow2", [1000], None),
        "odd64k": ("qcow2", [100000, 100000, 150000], None),
        "odd512": ("raw", [5 * MiB + 1536, 5 * MiB + 777], "cluster_size=512"),
        "odd2m": ("qcow2", [3 * MiB + 4608, 3 * MiB + 4608], "cluster_size=2M"),
    }
    built = {}
    for vol, (fmt, sizes, options) in chains.items():
        built[vol] = (fmt, _chain_of_sizes(share, src, vol, fmt, sizes, tag=vol, options=options))
    assert info(share / "tiny.s1")["virtual-size"] == 1024
    assert info(share / "tinyq")["virtual-size"] == 1024
    oracles = []
    for vol, (fmt, names) in built.items():
        oracles += chain_oracles(share, vol, names, fmt, tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))
    # Reads at and past the end: short, then empty.
    fd = os.open(mnt.volume("tiny"), os.O_RDONLY | os.O_DIRECT)
    try:
        assert len(os.pread(fd, 4096, 1000)) == 24
        assert os.pread(fd, 4096, 1024) == b""
        assert os.pread(fd, 10, 1 << 40) == b""
    finally:
        os.close(fd)


def test_raw_base_size_not_multiple_of_512(share, tmp_path, vfsnap_mount):
    """A raw file of 1000 bytes is a 1024-byte disk to QEMU (sizes are whole 512-byte sectors), so
    `qemu-img convert` of it, and of views ending at it, is 1024 bytes long: the oracle rules."""
    src = Source(tmp_path / "src")
    built = {
        "rawtiny": _chain_of_sizes(share, src, "rawtiny", "raw", [1000, 1000], tag="rawtiny"),
        "rawodd": _chain_of_sizes(share, src, "rawodd", "raw", [2 * MiB + 1000, 6 * MiB], tag="rawodd"),
        "rawflat": _chain_of_sizes(share, src, "rawflat", "raw", [4 * MiB + 1], tag="rawflat"),
    }
    assert os.path.getsize(share / "rawtiny") == 1000
    oracles = []
    for vol, names in built.items():
        oracles += chain_oracles(share, vol, names, "raw", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


def test_qcow2_header_size_not_multiple_of_512(share, tmp_path, vfsnap_mount):
    """qemu-img never writes such a size, but QEMU reads a qcow2 header size of 1000 as a 512-byte
    disk (whole sectors, rounded down), as an overlay and as a base."""
    src = Source(tmp_path / "src")
    names = _chain_of_sizes(share, src, "hq", "qcow2", [64 * KiB + 1024, 64 * KiB + 1024, 64 * KiB + 1024], tag="hq")
    set_header_field(share / "hq", "size", 64 * KiB + 1000)
    set_header_field(share / "hq.s2", "size", 64 * KiB + 1000)
    assert info(share / "hq.s2")["virtual-size"] == 64 * KiB + 512
    oracles = chain_oracles(share, "hq", names, "qcow2", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


# -- L1 tables spanning several L2 tables ------------------------------------------------------


@pytest.mark.parametrize("cluster,extended,size", [(512, False, 1 * MiB + 40 * KiB), (4 * KiB, False, 9 * MiB),
                                                   (16 * KiB, True, 40 * MiB)],
                         ids=["512-l2-32k", "4k-l2-2m", "16k-extl2-16m"])
def test_several_l2_tables(cluster, extended, size, share, tmp_path, vfsnap_mount):
    """Writes straddling every L2-table boundary at different levels; L1 entries left unallocated
    in upper levels fall through to the chain below."""
    src = Source(tmp_path / "src")
    span = cluster * (cluster // (16 if extended else 8))
    boundaries = list(range(span, size, span))
    assert len(boundaries) >= 2
    options = f"cluster_size={cluster}" + (",extended_l2=on" if extended else "")
    names = []
    for level in range(4):
        name = "vol" if level == 0 else f"vol.s{level}"
        create(share / name, size, options=options, backing=names[-1] if names else None, backing_fmt="qcow2")
        names.append(name)
        rng = random.Random(f"l2-{cluster}-{level}")
        cmds = []
        for i, b in enumerate(boundaries):
            if (i + level) % 3 == 0:
                continue  # leave some L2 ranges of this level unallocated
            left, right = rng.randint(1, 3 * cluster), rng.randint(1, 3 * cluster)
            if level % 2:
                cmds.append(src.write(rng, b - left, left + right))
            else:
                cmds += [src.write(rng, b - left, left), src.write(rng, b + 1, right)]
        if level:
            cmds.append(f"write -z {boundaries[0] - cluster} {2 * cluster}")
        qemu_io(share / name, *cmds)
    write_info(share, "vol", names[-1], {f"s{i}": names[i] for i in range(1, 4)})
    oracles = chain_oracles(share, "vol", names, "qcow2", tmp_path, extra_boundaries=tuple(boundaries))
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


def test_l2_boundary_with_64k_clusters(share, tmp_path, vfsnap_mount):
    """64 KiB clusters: one L2 table maps 512 MiB. A sparse 1 GiB + 64 KiB chain with data around
    the 512 MiB and 1 GiB boundaries; compared over windows around them (reading the whole GiB
    through FUSE would only cost time) plus the unaligned boundary reads."""
    src = Source(tmp_path / "src")
    size = 1 * 1024 * MiB + 64 * KiB
    span = 512 * MiB
    rng = random.Random("64k-l2")
    create(share / "vol", size, fmt="raw")
    qemu_io(share / "vol", src.write(rng, span - 200 * KiB, 400 * KiB), src.write(rng, 2 * span - 100, 200),
            fmt="raw")
    create(share / "vol.s1", size, backing="vol", backing_fmt="raw")
    qemu_io(share / "vol.s1", src.write(rng, span - 70 * KiB, 60 * KiB), src.write(rng, span + 5 * KiB, 30 * KiB),
            src.write(rng, size - 1000, 1000))
    create(share / "vol.s2", size, backing="vol.s1", backing_fmt="qcow2")
    qemu_io(share / "vol.s2", src.write(rng, span - 3, 6), f"write -z {span + 64 * KiB} 64k")
    write_info(share, "vol", "vol.s2", {"s1": "vol.s1", "s2": "vol.s2"})
    views = (("live", "vol.s2", "qcow2"), ("s2", "vol.s1", "qcow2"), ("s1", "vol", "raw"))
    oracles = {view: convert_raw(share / top, tmp_path / f"{view}.raw", fmt=fmt) for view, top, fmt in views}
    mnt = vfsnap_mount()
    problems = []
    for view, oracle in oracles.items():
        path = mnt.volume("vol") if view == "live" else mnt.snapshot("vol", view)
        assert os.stat(path).st_size == size
        with open(path, "rb") as got, open(oracle, "rb") as want:
            for centre in (0, span, 2 * span, size):
                start = max(0, centre - 1 * MiB)
                got.seek(start)
                want.seek(start)
                if got.read(2 * MiB) != want.read(2 * MiB):
                    problems.append(f"{view}: window around {centre:#x} differs")
        with open(oracle, "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                problems += [f"{view}: {p}" for p in
                             unaligned_read_mismatches(path, data, [span, span + 64 * KiB, 2 * span, size])]
    assert_no_mismatch(problems)


@pytest.mark.parametrize("cluster", [64 * KiB, 2 * MiB])
def test_huge_sparse_virtual_size(cluster, share, tmp_path, vfsnap_mount):
    """An 8 TiB chain (Cinder volumes are big and sparse): st_size, and reads around data placed at
    4 TiB and in the last GiB, across L2-table boundaries and the end of the disk."""
    src = Source(tmp_path / "src")
    size = 8 << 40
    rng = random.Random("huge")
    create(share / "vol", size, options=f"cluster_size={cluster}")
    qemu_io(share / "vol", src.write(rng, size - (1 << 30), 1 * MiB), src.write(rng, 4 << 40, 70 * KiB),
            src.write(rng, size - 5000, 5000))
    create(share / "vol.s1", size, backing="vol", backing_fmt="qcow2", options=f"cluster_size={cluster}")
    qemu_io(share / "vol.s1", src.write(rng, size - (1 << 30) + 512 * KiB - 3, 64 * KiB),
            f"write -z {(4 << 40) + 4096} 8k", src.write(rng, size - 100, 100))
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    span = cluster * (cluster // 8)
    points = [4 << 40, (4 << 40) + cluster, size - (1 << 30), size - (1 << 30) + 512 * KiB, size - span, size]
    oracles = {view: convert_raw(share / top, tmp_path / f"{view}.raw")
               for view, top in (("live", "vol.s1"), ("s1", "vol"))}
    mnt = vfsnap_mount()
    problems = []
    for view, oracle in oracles.items():
        path = mnt.volume("vol") if view == "live" else mnt.snapshot("vol", view)
        assert os.stat(path).st_size == size
        with open(oracle, "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                problems += [f"{view}: {p}" for p in unaligned_read_mismatches(path, data, points)]
    assert_no_mismatch(problems)


# -- other images qemu-img makes ---------------------------------------------------------------


def test_preallocated_and_internally_snapshotted_base(share, tmp_path, vfsnap_mount):
    """A qcow2 base made with preallocation=metadata (allocated clusters that point at holes of the
    file read as zeros, not as backing data) that also holds an internal snapshot (shared
    clusters, COPIED clear)."""
    src = Source(tmp_path / "src")
    size = 4 * MiB
    rng = random.Random("prealloc")
    create(share / "vol", size, options="preallocation=metadata")
    qemu_io(share / "vol", src.write(rng, 100 * KiB, 300 * KiB))
    qemu_img("snapshot", "-c", "internal1", str(share / "vol"))
    qemu_io(share / "vol", src.write(rng, 200 * KiB, 64 * KiB), f"write -z {1 * MiB} 64k")
    create(share / "vol.s1", size, backing="vol", backing_fmt="qcow2")
    qemu_io(share / "vol.s1", src.write(rng, 3 * MiB - 5, 10), f"discard {2 * MiB} 128k")
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    oracles = chain_oracles(share, "vol", ["vol", "vol.s1"], "qcow2", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


def test_buffered_reads_match_too(share, tmp_path, vfsnap_mount):
    """The same boundary reads through the page cache (what most readers do)."""
    src = Source(tmp_path / "src")
    size = 3 * MiB
    names = make_chain(share, "vol", size=size, depth=3, base_fmt="qcow2", cluster_size=4096,
                       writes=random_writes(src, "buffered", size, max_len=20 * KiB, units=(4096, 2 * MiB)))
    oracles = [view_oracle(share, "vol", view, top, fmt, tmp_path)
               for view, top, fmt in (("live", names[-1], "qcow2"), ("s2", names[1], "qcow2"))]
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles, direct=False))


def test_tiny_caches(share, tmp_path, vfsnap_mount):
    """The same answers when the L2-table cache and the resolved-chunk cache hold almost nothing
    (every read evicts what the previous one loaded)."""
    src = Source(tmp_path / "src")
    size = 3 * MiB
    names = make_chain(share, "vol", size=size, depth=4, base_fmt="qcow2", cluster_size=512,
                       writes=random_writes(src, "tiny-caches", size, max_len=40 * KiB, units=(512, 32 * KiB),
                                            count=6))
    create(share / "zvol", size, options="compression_type=zstd,cluster_size=4k")
    qemu_io(share / "zvol", *(src.write(random.Random(i), i * 4 * KiB, 4 * KiB).replace("write ", "write -c ", 1)
                              for i in range(0, 768, 3)))
    oracles = chain_oracles(share, "vol", names, "qcow2", tmp_path)
    oracles += chain_oracles(share, "zvol", ["zvol"], "qcow2", tmp_path)
    # 8 KiB: room for the L1 tables (5 x 768 bytes) and a handful of 512-byte L2 tables.
    mnt = vfsnap_mount("table_cache_size=8k,map_cache_chunks=1")
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


def test_concurrent_readers(share, tmp_path, vfsnap_mount):
    """Several threads reading different views (and the same one) at once, at random offsets."""
    src = Source(tmp_path / "src")
    size = 4 * MiB
    names = make_chain(share, "vol", size=size, depth=5, base_fmt="raw", cluster_size=4096,
                       writes=random_writes(src, "concurrent", size, max_len=64 * KiB, units=(4096, 2 * MiB)))
    oracles = {o.view: o.raw.read_bytes() for o in chain_oracles(share, "vol", names, "raw", tmp_path)}
    mnt = vfsnap_mount()
    failures: list[str] = []

    def reader(view: str, seed: int) -> None:
        rng = random.Random(seed)
        want = oracles[view]
        fd = os.open(mnt.volume("vol") if view == "live" else mnt.snapshot("vol", view), os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(300):
                offset, length = rng.randrange(size), rng.randint(1, 200 * KiB)
                if os.pread(fd, length, offset) != want[offset:offset + length]:
                    failures.append(f"{view}: pread({length}, {offset:#x})")
        except OSError as exc:
            failures.append(f"{view}: {exc!r}")
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(view, i)) for i, view in enumerate(list(oracles) * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "readers hung"
    assert_no_mismatch(failures)


def test_backing_format_extension_decides_the_format(share, tmp_path, vfsnap_mount):
    """The overlay's backing-format field rules (invariant 4), as it does for QEMU: a qcow2 file
    declared raw is read as raw bytes (its header shows), never interpreted."""
    src = Source(tmp_path / "src")
    size = 2 * MiB
    create(share / "vol", size)
    qemu_io(share / "vol", src.write(random.Random(1), 0, 300 * KiB))
    create(share / "vol.s1", size, backing="vol", backing_fmt="raw")
    qemu_io(share / "vol.s1", src.write(random.Random(2), 100 * KiB, 10 * KiB))
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    oracles = chain_oracles(share, "vol", ["vol", "vol.s1"], "raw", tmp_path)
    assert oracles[0].raw.read_bytes()[:4] == b"QFI\xfb"  # QEMU shows the base's header bytes
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_overlays_without_backing_format_extension(base_fmt, share, tmp_path, vfsnap_mount):
    """Old images without the backing-format extension: QEMU probes, vfsnap uses its record of
    the base (made by probing once, at first meeting) and qcow2 for overlays: the same bytes."""
    src = Source(tmp_path / "src")
    size = 3 * MiB
    names = make_chain(share, "vol", size=size, depth=3, base_fmt=base_fmt,
                       writes=random_writes(src, f"noext-{base_fmt}", size, max_len=150 * KiB, units=(64 * KiB,)))
    for name in names[1:]:
        drop_extension(share / name, 0xE2792ACA)
        assert "backing-filename-format" not in info(share / name)
    oracles = chain_oracles(share, "vol", names, base_fmt, tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


def test_header_variants_in_a_chain(share, tmp_path, vfsnap_mount):
    """header_length 104 (no compression byte) and 120 (unknown fields), unknown extensions, and
    a v2 image in the middle of a v3 chain: all read like QEMU reads them."""
    src = Source(tmp_path / "src")
    size = 3 * MiB
    names = make_chain(share, "vol", size=size, depth=4, base_fmt="qcow2",
                       writes=random_writes(src, "variants", size, max_len=150 * KiB, units=(64 * KiB,)))
    rewrite_v3_header_length(share / "vol", 104)
    rewrite_v3_header_length(share / "vol.s1", 120, bytes(range(1, 9)))
    insert_extension(share / "vol.s2", 0x12345678, b"unknown extension data")
    qemu_img("amend", "-f", "qcow2", "-o", "compat=0.10", str(share / "vol.s3"))
    assert info(share / "vol.s3")["format-specific"]["data"]["compat"] == "0.10"
    insert_extension(share / "vol.s3", 0x0BADF00D, b"\xff" * 16)
    for name in names:
        info(share / name)  # QEMU still opens every one
    oracles = chain_oracles(share, "vol", names, "qcow2", tmp_path)
    mnt = vfsnap_mount()
    assert_no_mismatch(oracle_mismatches(mnt, oracles))


@pytest.mark.parametrize("flag", ["dirty", "corrupt"])
def test_dirty_and_corrupt_marked_images_still_read(flag, share, tmp_path, vfsnap_mount):
    """Incompatible bits 0 (dirty: refcounts may be wrong) and 1 (corrupt: no writes) still allow
    reads (QCOW2-NOTES 1.7), in the active image and below it."""
    src = Source(tmp_path / "src")
    size = 2 * MiB
    names = make_chain(share, "vol", size=size, depth=2, base_fmt="raw", overlay_options="lazy_refcounts=on",
                       writes=random_writes(src, f"flag-{flag}", size // 2, max_len=150 * KiB, units=(64 * KiB,)))
    for name in names[1:]:
        if flag == "dirty":  # a crash after a write with lazy refcounts leaves the dirty bit set
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", src.write(random.Random(name), 3 * size // 4 + 512, 3000),
                            "-c", "abort", str(share / name)], capture_output=True)
        else:
            set_header_field(share / name, "incompatible_features",
                             qcow2_header(share / name)["incompatible_features"] | 2)
        assert qcow2_header(share / name)["incompatible_features"] & (1 if flag == "dirty" else 2)
    oracles = chain_oracles(share, "vol", names, "raw", tmp_path)
    mnt = vfsnap_mount()
    mnt.allowed_log_errors.append("corrupt")
    assert_no_mismatch(oracle_mismatches(mnt, oracles))
