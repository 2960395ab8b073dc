"""`vfsnap map` against `qemu-img map` (issue 14, DESIGN.md section 4), QEMU as the oracle.

Chains are built with qemu-img/qemu-io: raw bases with holes (found with SEEK_DATA), qcow2
bases, zero clusters (`write -z`), discards, compressed clusters (`write -c`), subclusters
(`extended_l2=on`), shorter backing files, at depths 0, 1 and 8. `qemu-img map --output=json`
of every view's chain is taken before mounting; `vfsnap map --output=json` of the same view
through the mount must classify every byte the same way: data or not, and also zero, present
and depth (0 = the view's top image), entries covering the whole disk without gaps.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, requires_fuse
from tests.qemu import chain_views, create, make_chain, qemu_img, qemu_io, view_path, write_info

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20
FLAGS = ("data", "zero", "present", "depth")


def vfsnap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vfsnap", *args], capture_output=True, text=True, cwd=ROOT)


def qemu_map(path: Path, fmt: str) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", "-f", fmt, str(path)).stdout)


def vfsnap_map(path: Path) -> list[dict]:
    result = vfsnap("map", "--output=json", str(path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def by_flags(entries: list[dict], keys: tuple[str, ...]) -> list[tuple[int, int, tuple]]:
    """The map as (start, end, flags) with only `keys` kept, adjacent equal ranges merged.

    `zero` counts only where `data` is false: QEMU also sets it on the parts of data clusters
    that are holes in the image file when it guesses metadata preallocation (it does after its
    own copy-on-write punched the untouched part of a cluster: `qcow2_detect_metadata_preallocation`),
    a guess vfsnap does not make (docs/backup.md)."""
    out: list[tuple[int, int, tuple]] = []
    for e in entries:
        flags = tuple(e[k] and not e["data"] if k == "zero" else e[k] for k in keys)
        start, end = e["start"], e["start"] + e["length"]
        if out and out[-1][1] == start and out[-1][2] == flags:
            out[-1] = (out[-1][0], end, flags)
        else:
            out.append((start, end, flags))
    return out


def covers(entries: list[dict], size: int) -> bool:
    pos = 0
    for e in entries:
        if e["start"] != pos or e["length"] <= 0:
            return False
        pos += e["length"]
    return pos == size


# -- writing the chains ----------------------------------------------------------------------


def raw_writes(rng: random.Random, path: Path, size: int) -> None:
    """Data at a few places of a sparse raw file; the rest stays holes."""
    with open(path, "r+b") as f:
        for _ in range(5):
            length = rng.choice([512, 4 * KiB, 70 * KiB, 200 * KiB])
            offset = rng.randrange(0, size - length) // 512 * 512
            f.seek(offset)
            f.write(rng.randbytes(length))


def qcow2_writes(rng: random.Random, path: Path, size: int, cluster: int) -> None:
    """Data across cluster boundaries, zeros (aligned and not), a discard, a compressed cluster."""
    # Compressed first: QEMU compresses only into clusters the image does not hold yet.
    commands = [f"write -c -P 7 {rng.randrange(0, size // cluster) * cluster} {cluster}"]
    for _ in range(4):
        length = rng.choice([512, 3 * KiB, cluster + 1536, 3 * cluster])
        offset = rng.randrange(0, size - length) // 512 * 512
        commands.append(f"write -P {rng.randrange(1, 255)} {offset} {length}")
    aligned = rng.randrange(0, size // cluster - 2) * cluster
    commands.append(f"write -z {aligned} {2 * cluster}")
    offset = rng.randrange(0, size - 8 * KiB) // 512 * 512
    commands.append(f"write -z {offset} {rng.choice([2 * KiB, 5 * KiB])}")
    commands.append(f"discard {rng.randrange(0, size // cluster - 1) * cluster} {cluster}")
    qemu_io(path, *commands)


def build(share: Path, volume: str, *, base_fmt: str, depth: int, size: int, cluster: int,
          options: str | None = None, seed: int = 0) -> list[str]:
    rng = random.Random(f"{volume}-{seed}")

    def writes(level: int, path: Path, fmt: str) -> None:
        if fmt == "raw":
            raw_writes(rng, path, size)
        else:
            qcow2_writes(rng, path, size, cluster)

    return make_chain(share, volume, size=size, depth=depth, base_fmt=base_fmt,
                      cluster_size=cluster if cluster != 64 * KiB else None, writes=writes,
                      base_options=options if base_fmt == "qcow2" else None, overlay_options=options)


def expected_maps(share: Path, volume: str, names: list[str], base_fmt: str) -> dict[str, list[dict]]:
    return {view: qemu_map(share / top, fmt) for view, top, fmt in chain_views(names, base_fmt)}


def mismatches(mnt, volume: str, expected: dict[str, list[dict]]) -> list[str]:
    problems = []
    for view, want in expected.items():
        path = view_path(mnt, volume, view)
        got = vfsnap_map(path)
        size = os.stat(path).st_size
        if not covers(got, size):
            problems.append(f"{volume}/{view}: entries do not cover [0, {size}) without gaps")
        for keys in (("data",), FLAGS):
            if by_flags(got, keys) != by_flags(want, keys):
                problems.append(f"{volume}/{view} {keys}: vfsnap {by_flags(got, keys)}\n  qemu-img {by_flags(want, keys)}")
                break
    return problems


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0, 1, 8])
@pytest.mark.parametrize("base_fmt,cluster,options", [
    ("raw", 64 * KiB, None),
    ("qcow2", 4 * KiB, None),
    ("qcow2", 64 * KiB, "extended_l2=on"),
    ("raw", 32 * KiB, "extended_l2=on"),
])
def test_map_classifies_every_byte_as_qemu_img_map_does(share, vfsnap_mount, depth, base_fmt, cluster, options):
    size = 6 * MiB + 64 * KiB
    expected = {}
    for seed in range(2):
        volume = f"v{seed}"
        names = build(share, volume, base_fmt=base_fmt, depth=depth, size=size, cluster=cluster,
                      options=options, seed=seed)
        expected[volume] = expected_maps(share, volume, names, base_fmt)
    mnt = vfsnap_mount()
    problems = [p for volume, maps in expected.items() for p in mismatches(mnt, volume, maps)]
    assert not problems, "\n".join(problems)


def test_map_of_raw_base_with_unaligned_size_and_shorter_backing_files(share, vfsnap_mount):
    """A raw base of 3 MiB + 700 bytes (QEMU counts whole sectors: the last 324 bytes read as
    zeros), data up to its last byte, under overlays that each grow the disk: past the end of a
    shorter backing file an overlay reads zeros (`present` false at the overlay's depth)."""
    base = share / "vol"
    with open(base, "wb") as f:
        f.truncate(3 * MiB + 700)
        f.seek(3 * MiB - 1000)
        f.write(os.urandom(1700))
        f.seek(MiB)
        f.write(os.urandom(5000))
    names = ["vol"]
    for level, size in enumerate([4 * MiB, 4 * MiB + 512, 7 * MiB], start=1):
        name = f"vol.s{level}"
        create(share / name, size, backing=names[-1], backing_fmt="raw" if level == 1 else "qcow2")
        qemu_io(share / name, f"write -P {level} {level * MiB - 4096} 8192")
        names.append(name)
    write_info(share, "vol", names[-1], {f"s{i}": names[i] for i in range(1, len(names))})
    expected = expected_maps(share, "vol", names, "raw")
    mnt = vfsnap_mount()
    problems = mismatches(mnt, "vol", expected)
    assert not problems, "\n".join(problems)


def test_map_sees_writes_made_through_the_mount_before_any_flush(share, vfsnap_mount):
    """The live volume's map includes acknowledged writes still in the writer's tables, and a
    snapshot taken through the mount moves them one level down (depth 1)."""
    create(share / "vol", 4 * MiB, fmt="raw")
    mnt = vfsnap_mount()
    fd = os.open(mnt.volume("vol"), os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        os.mkdir(mnt.snapshot_dir("vol", "one"))
        os.pwrite(fd, b"y" * 100, 2 * MiB + 10)
        live = vfsnap_map(mnt.volume("vol"))
    finally:
        os.close(fd)
    data = [(e["start"], e["length"], e["depth"]) for e in live if e["data"]]
    assert data == [(0, 4096, 1), (2 * MiB, 64 * KiB, 0)], live
    snap = vfsnap_map(mnt.snapshot("vol", "one"))
    assert [(e["start"], e["length"], e["depth"]) for e in snap if e["data"]] == [(0, 4096, 0)]


def test_map_human_output_is_a_table(share, vfsnap_mount):
    make_chain(share, "vol", size=MiB, depth=1, writes=lambda level, path, fmt: qemu_io(path, "write 0 4k", fmt=fmt))
    mnt = vfsnap_mount()
    result = vfsnap("map", str(mnt.volume("vol")))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["Offset", "Length", "Depth", "Type"]
    assert lines[1].split() == ["0x0", "0x10000", "0", "data"]


def test_map_of_a_file_outside_a_vfsnap_mount_fails_with_one_line(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    for path in (plain, tmp_path / "missing"):
        result = vfsnap("map", str(path))
        assert result.returncode == 1
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
        assert str(path) in result.stderr


def test_map_of_1tib_volumes_comes_in_pages_and_matches_qemu_img(share, vfsnap_mount):
    """1 TiB volumes (qcow2 with 700 scattered writes, and a sparse raw file with 400 blocks of
    data): more entries than one 64 KiB xattr page holds, so the CLI joins pages. Times are
    measured by bench/backup_bench.py, not asserted here."""
    size = 1 << 40
    rng = random.Random(1)
    create(share / "big", size)
    commands = [f"write -P 1 {rng.randrange(0, size // (64 * KiB)) * 64 * KiB} 4k" for _ in range(700)]
    qemu_io(share / "big", *commands)
    with open(share / "sparse", "wb") as f:
        f.truncate(size)
        for _ in range(400):
            f.seek(rng.randrange(0, size // (1 * MiB)) * MiB)
            f.write(b"d" * 8192)
    expected = {"big": qemu_map(share / "big", "qcow2"), "sparse": qemu_map(share / "sparse", "raw")}
    assert all(len(entries) > 700 for entries in expected.values())
    mnt = vfsnap_mount()
    problems = [p for volume, want in expected.items() for p in mismatches(mnt, volume, {"live": want})]
    assert not problems, "\n".join(problems)
