"""How the write path allocates (QCOW2-NOTES checklist 19-24, 31), checked against QEMU.

* A rewrite of a cluster the image owns happens in place: same host offsets, no file growth.
* The same write trace replayed with qemu-io on a copy gives the same guest bytes
  (`qemu-img compare`) and allocates the same guest clusters in the active image (`qemu-img map`).
* Every refcount width (refcount_bits 1 to 64, sub-byte widths packed LSB first), with refcount
  blocks and the refcount table growing: `qemu-img check` clean.
* Allocations are cluster aligned although a fresh image's file is not; freed clusters are reused.
* Internal snapshots: the snapshot table and the snapshots' L1 tables stay byte-exact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest

from tests.conftest import requires_fuse
from tests.qemu import check, create, flat_bytes, info, make_chain, qemu_img, qemu_io, run, write_info

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20


def qemu_map(image: Path) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", "-U", str(image)).stdout)


def top_extents(image: Path) -> list[tuple[int, int, int | None]]:
    """(guest start, length, host offset) of what the image itself (depth 0) holds as data."""
    return [(e["start"], e["length"], e.get("offset")) for e in qemu_map(image) if e["depth"] == 0 and e["data"]]


def allocated_clusters(image: Path, cluster: int) -> set[int]:
    clusters = set()
    for start, length, _ in top_extents(image):
        clusters.update(range(start // cluster, -(-(start + length) // cluster)))
    return clusters


def write_through(path: Path, trace: list[tuple[int, int, int]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, length, pattern in trace:
            assert os.pwrite(fd, bytes([pattern]) * length, offset) == length
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill(level, path, fmt):
    qemu_io(path, f"write -P {0x10 + level} {level * 48}k 100k", fmt=fmt)


# -- 19: rewrites in place ---------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [512, 65536])
def test_rewrite_of_owned_clusters_is_in_place(cluster, share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=4 * MiB, depth=1, cluster_size=cluster, writes=_fill)
    top = share / names[-1]
    first = [(0, 3 * cluster), (cluster * 10 + 7, cluster * 2), (3 * MiB, 200 * KiB)]
    mnt = vfsnap_mount()
    write_through(mnt.volume("vol"), [(o, n, 0x41) for o, n in first])
    mnt.stop()
    extents, size = top_extents(top), os.path.getsize(top)
    assert check(top)["exit"] == 0
    # Rewrite parts of the same clusters: whole clusters, sub-cluster pieces, unaligned ranges.
    second = [(0, cluster), (cluster + 5, 100), (cluster * 10 + 7, cluster * 2), (3 * MiB + 1000, 100 * KiB)]
    mnt = vfsnap_mount()
    write_through(mnt.volume("vol"), [(o, n, 0x42) for o, n in second])
    expected = mnt.volume("vol").read_bytes()
    mnt.stop()
    assert top_extents(top) == extents, "a rewrite of owned clusters moved them"
    assert os.path.getsize(top) == size, "a rewrite of owned clusters grew the image"
    assert check(top)["exit"] == 0
    assert flat_bytes(top, tmp_path) == expected


# -- 17-22: the same trace through QEMU ------------------------------------------------------------------


def random_trace(rng: random.Random, size: int, units: list[int], count: int) -> list[tuple[int, int, int]]:
    trace = []
    for _ in range(count):
        unit = rng.choice(units)
        offset = max(0, min(size - 1, rng.randrange(0, size // unit + 1) * unit + rng.choice([0, -1, 1, -511, 300])))
        length = min(size - offset, rng.choice([1, 511, 512, 4096, unit, unit + 1, 3 * unit - 5, 70000]))
        trace.append((offset, max(1, length), rng.randint(1, 255)))
    return trace


@pytest.mark.parametrize("base_fmt,depth,cluster,snapshot", [
    ("raw", 1, 512, False), ("raw", 2, 4096, False), ("qcow2", 1, 65536, False), ("qcow2", 0, 4096, False),
    ("raw", 1, 4096, True), ("qcow2", 2, 512, True)],
    ids=["raw+1-512", "raw+2-4k", "qcow2+1-64k", "qcow2-4k", "raw+1-4k-intsnap", "qcow2+2-512-intsnap"])
def test_write_trace_matches_qemu(base_fmt, depth, cluster, snapshot, share, tmp_path, vfsnap_mount):
    """Replay one write trace with qemu-io on a copy of the chain and through vfsnap: same bytes,
    and the same guest clusters allocated in the active image (QCOW2-NOTES oracle 17-22)."""
    size = 5 * MiB + 1536  # not cluster aligned
    names = make_chain(share, "vol", size=size, depth=depth, base_fmt=base_fmt, cluster_size=cluster, writes=_fill)
    top_fmt = base_fmt if depth == 0 else "qcow2"
    assert top_fmt == "qcow2"
    if snapshot:
        qemu_img("snapshot", "-c", "s1", str(share / names[-1]))
    reference = tmp_path / "reference"
    shutil.copytree(share, reference)
    rng = random.Random(f"{base_fmt}{depth}{cluster}{snapshot}")
    trace = random_trace(rng, size, [cluster, cluster * (cluster // 8), 4096], 60)
    qemu_io(reference / names[-1], *(f"write -P {p} {o} {n}" for o, n, p in trace))
    mnt = vfsnap_mount()
    write_through(mnt.volume("vol"), trace)
    mnt.stop()
    result = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(reference / names[-1]),
                 str(share / names[-1]), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert allocated_clusters(share / names[-1], cluster) == allocated_clusters(reference / names[-1], cluster)
    for name in names:
        if (share / name).read_bytes()[:4] == b"QFI\xfb":
            assert check(share / name)["exit"] == 0, name


# -- 23: every refcount width, growing refcount blocks and table -----------------------------------------


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_every_refcount_width(refcount_bits, share, tmp_path, vfsnap_mount):
    """512-byte clusters: a refcount block covers 4096 clusters at 1 bit and 64 at 64 bits, and
    the one-cluster refcount table is outgrown at 2 MiB of file with 64-bit refcounts."""
    size = 6 * MiB
    create(share / "vol", size, fmt="raw")
    qemu_io(share / "vol", "write -P 0x11 0 6M", fmt="raw")
    create(share / "vol.s1", size, backing="vol", backing_fmt="raw",
           options=f"cluster_size=512,refcount_bits={refcount_bits}")
    qemu_io(share / "vol.s1", "write -P 0x22 64k 64k")
    if refcount_bits >= 2:
        qemu_img("snapshot", "-c", "before", str(share / "vol.s1"))  # shared clusters: counts of 2
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    before_table = qemu_img("info", "--output=json", str(share / "vol.s1")).stdout
    mnt = vfsnap_mount()
    rng = random.Random(refcount_bits)
    expected = bytearray(mnt.volume("vol").read_bytes())
    fd = os.open(mnt.volume("vol"), os.O_WRONLY)
    try:
        # Scattered small writes first (many L2 tables and refcount entries), then bulk.
        for _ in range(300):
            offset, length = rng.randrange(0, size - 2000), rng.randint(1, 2000)
            data = rng.randbytes(length)
            os.pwrite(fd, data, offset)
            expected[offset:offset + length] = data
        os.fsync(fd)
        data = rng.randbytes(3 * MiB)
        os.pwrite(fd, data, 2 * MiB)
        expected[2 * MiB:5 * MiB] = data
    finally:
        os.close(fd)
    assert mnt.volume("vol").read_bytes() == expected
    mnt.stop()
    result = check(share / "vol.s1")
    assert result["exit"] == 0, result
    assert flat_bytes(share / "vol.s1", tmp_path) == expected
    assert json.loads(before_table)["format-specific"]["data"]["refcount-bits"] == refcount_bits
    assert qemu_img("info", "--output=json", str(share / "vol.s1")).stdout.count(f'"refcount-bits": {refcount_bits}')


def test_refcount_table_growth_keeps_every_count(share, tmp_path, vfsnap_mount):
    """512-byte clusters and 64-bit refcounts: one refcount block covers 64 clusters and the
    one-cluster refcount table 4096, so one 3 MiB write makes the table move; every count must
    survive that (the new table, its blocks, the L2 tables and data allocated around it)."""
    size = 6 * MiB
    create(share / "vol", size, fmt="raw")
    qemu_io(share / "vol", "write -P 0x11 0 6M", fmt="raw")
    create(share / "vol.s1", size, backing="vol", backing_fmt="raw", options="cluster_size=512,refcount_bits=64")
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    mnt = vfsnap_mount()
    expected = bytearray(b"\x11" * size)
    data = random.Random(1).randbytes(3 * MiB)
    expected[2 * MiB:5 * MiB] = data
    with open(mnt.volume("vol"), "r+b") as f:
        f.seek(2 * MiB)
        f.write(data)
    mnt.stop()
    result = check(share / "vol.s1")
    assert result["exit"] == 0, {k: result[k] for k in result if k != "stderr"} | {"stderr": result["stderr"][:500]}
    assert flat_bytes(share / "vol.s1", tmp_path) == expected
    mnt = vfsnap_mount()
    assert mnt.volume("vol").read_bytes() == expected


def test_large_sequential_write_on_512_byte_clusters(share, tmp_path, vfsnap_mount):
    """Default 16-bit refcounts: the one-cluster refcount table covers 8 MiB of a 512-byte-cluster
    image, and one L2 table 32 KiB of guest space, so a 20 MiB copy (dd of an image into the
    volume) moves the refcount table and writes back dirty L2 tables in the middle of a write."""
    size = 24 * MiB
    create(share / "vol", size, fmt="raw")
    create(share / "vol.s1", size, backing="vol", backing_fmt="raw", options="cluster_size=512")
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    mnt = vfsnap_mount()
    data = random.Random(2).randbytes(20 * MiB)
    with open(mnt.volume("vol"), "r+b") as f:
        f.seek(1 * MiB)
        f.write(data)
    expected = bytes(1 * MiB) + data + bytes(3 * MiB)
    assert mnt.volume("vol").read_bytes() == expected
    mnt.stop()
    result = check(share / "vol.s1")
    assert result["exit"] == 0, {k: result[k] for k in result if k != "stderr"} | {"stderr": result["stderr"][:500]}
    assert flat_bytes(share / "vol.s1", tmp_path) == expected


# -- 22: alignment and reuse ---------------------------------------------------------------------------


def test_allocations_are_cluster_aligned_in_an_unaligned_file(share, tmp_path, vfsnap_mount):
    create(share / "vol", 1 << 30, fmt="qcow2")
    assert os.path.getsize(share / "vol") % 65536 != 0  # 196624 bytes, QCOW2-NOTES 1.6
    mnt = vfsnap_mount()
    write_through(mnt.volume("vol"), [(0, 100, 1), (65536 * 5 + 3, 70000, 2), ((1 << 30) - 512, 512, 3)])
    mnt.stop()
    for start, length, offset in top_extents(share / "vol"):
        assert offset % 65536 == start % 65536, (start, length, offset)
    assert check(share / "vol")["exit"] == 0


def test_freed_compressed_clusters_are_reused(share, tmp_path, vfsnap_mount):
    """Overwriting every compressed cluster frees the host clusters that held them; the next
    allocations take those before growing the file."""
    source = tmp_path / "src.qcow2"
    create(source, 4 * MiB)
    qemu_io(source, *(f"write -P {i + 1} {i * 64}k 64k" for i in range(48)))
    qemu_img("convert", "-c", "-O", "qcow2", str(source), str(share / "vol"))
    assert check(share / "vol").get("compressed-clusters", 0) == 48
    mnt = vfsnap_mount()
    write_through(mnt.volume("vol"), [(i * 64 * KiB, 64 * KiB, 0xF0) for i in range(48)])
    mnt.stop()
    size = os.path.getsize(share / "vol")
    assert check(share / "vol")["exit"] == 0
    mnt = vfsnap_mount()
    write_through(mnt.volume("vol"), [(3 * MiB + 512 * KiB, 64 * KiB, 0xF1)])
    mnt.stop()
    assert check(share / "vol")["exit"] == 0
    new = [offset for start, _, offset in top_extents(share / "vol") if start == 3 * MiB + 512 * KiB]
    assert new and new[0] + 64 * KiB <= size, f"new cluster at {new}, file was {size} bytes: freed clusters not reused"
    assert os.path.getsize(share / "vol") == size


# -- 31: internal snapshots untouched ----------------------------------------------------------------------


def snapshot_area(image: Path) -> tuple[bytes, list[bytes]]:
    """The raw snapshot table and every snapshot's L1 table (QCOW2-NOTES 1.5)."""
    with open(image, "rb") as f:
        header = f.read(72)
        nb_snapshots, snapshots_offset = struct.unpack(">IQ", header[60:72])
        f.seek(snapshots_offset)
        pos, l1s, table = snapshots_offset, [], b""
        for _ in range(nb_snapshots):
            f.seek(pos)
            fixed = f.read(40)
            l1_offset, l1_size, id_len, name_len = struct.unpack(">QIHH", fixed[:16])
            extra_size = struct.unpack(">I", fixed[36:40])[0]
            length = 40 + extra_size + id_len + name_len
            f.seek(pos)
            table += f.read(length)  # without the padding: the table may end the file
            pos += length + (-length % 8)
            f.seek(l1_offset)
            l1s.append(f.read(l1_size * 8))
    return table, l1s


def test_internal_snapshots_stay_byte_exact(share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=3 * MiB, depth=1, cluster_size=4096, writes=_fill)
    top = share / names[-1]
    qemu_io(top, "write -P 0x31 0 1M")
    qemu_img("snapshot", "-c", "one", str(top))
    qemu_io(top, "write -P 0x32 512k 1M")
    qemu_img("snapshot", "-c", "two", str(top))
    before = snapshot_area(top)
    views = {s: flat_bytes_snapshot(top, s, tmp_path) for s in ("one", "two")}
    mnt = vfsnap_mount()
    write_through(mnt.volume("vol"), [(o, 70000, 0x50 + i) for i, o in enumerate(range(0, 3 * MiB - 70000, 150000))])
    os.truncate(mnt.volume("vol"), 4 * MiB)
    mnt.stop()
    assert snapshot_area(top) == before
    for snap, content in views.items():
        after = flat_bytes_snapshot(top, snap, tmp_path)
        assert after[:len(content)] == content and not any(after[len(content):]), snap
    assert check(top)["exit"] == 0


def flat_bytes_snapshot(image: Path, snapshot: str, tmp_path: Path) -> bytes:
    out = tmp_path / f"snap-{snapshot}.raw"
    qemu_img("convert", "-l", f"snapshot.name={snapshot}", "-O", "raw", str(image), str(out))
    try:
        return out.read_bytes()
    finally:
        out.unlink()


# -- header rewrites keep what vfsnap does not know (checklist 2, 3, 5) ---------------------------------


def header_extensions(image: Path) -> tuple[dict, list[tuple[int, bytes]], bytes]:
    """(fixed fields, [(type, data)] in order, backing name) of a qcow2 image."""
    with open(image, "rb") as f:
        head = f.read(65536)
    version = struct.unpack(">I", head[4:8])[0]
    backing_offset, backing_size = struct.unpack(">QI", head[8:20])
    fields = {"version": version, "size": struct.unpack(">Q", head[24:32])[0]}
    if version >= 3:
        incompatible, compatible, autoclear = struct.unpack(">QQQ", head[72:96])
        header_length = struct.unpack(">I", head[100:104])[0]
        fields.update(incompatible=incompatible, compatible=compatible, autoclear=autoclear,
                      header_length=header_length, extra=head[104:header_length])
    else:
        header_length = 72
    extensions, pos = [], header_length
    while True:
        ext_type, length = struct.unpack(">II", head[pos:pos + 8])
        if ext_type == 0:
            break
        extensions.append((ext_type, head[pos + 8:pos + 8 + length]))
        pos += 8 + length + (-length % 8)
    return fields, extensions, head[backing_offset:backing_offset + backing_size]


def add_unknown_header_parts(image: Path) -> None:
    """Add an unknown header extension, an unknown compatible bit and an unknown autoclear bit."""
    fields, extensions, backing = header_extensions(image)
    extensions.insert(1, (0x7E57AB1E, b"vfsnap-must-keep-this"))
    area = b""
    for ext_type, data in extensions:
        area += struct.pack(">II", ext_type, len(data)) + data + bytes(-len(data) % 8)
    area += bytes(8)
    with open(image, "r+b") as f:
        head = bytearray(f.read(fields["header_length"]))
        head[80:88] = struct.pack(">Q", fields["compatible"] | 1 << 5)
        head[88:96] = struct.pack(">Q", fields["autoclear"] | 1 << 7)
        backing_offset = fields["header_length"] + len(area)
        head[8:20] = struct.pack(">QI", backing_offset, len(backing))
        f.seek(0)
        f.write(bytes(head) + area + backing)


def test_header_rewrites_keep_unknown_extensions_and_clear_autoclear(share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=2 * MiB, depth=1, cluster_size=4096, writes=_fill)
    top = share / names[-1]
    add_unknown_header_parts(top)
    assert check(top)["exit"] == 0
    fields, extensions, backing = header_extensions(top)
    mnt = vfsnap_mount()
    write_through(mnt.volume("vol"), [(4096 * 7 + 3, 9000, 0x61)])
    os.truncate(mnt.volume("vol"), 3 * MiB)  # a header rewrite with the new size
    expected = mnt.volume("vol").read_bytes()
    mnt.stop()
    after_fields, after_extensions, after_backing = header_extensions(top)
    assert after_extensions == extensions
    assert after_backing == backing == b"vol"
    assert after_fields["compatible"] == fields["compatible"], "an unknown compatible bit was dropped"
    assert after_fields["autoclear"] & 1 << 7 == 0, "an unknown autoclear bit survived a write (QCOW2-NOTES 1.1)"
    assert after_fields["incompatible"] == 0, "the image was left marked dirty after a clean unmount"
    assert after_fields["size"] == 3 * MiB
    assert after_fields["extra"] == fields["extra"]
    assert check(top)["exit"] == 0
    assert flat_bytes(top, tmp_path) == expected


def test_v2_overlay_stays_v2(share, tmp_path, vfsnap_mount):
    names = make_chain(share, "vol", size=2 * MiB, depth=1, cluster_size=4096, overlay_options="compat=0.10",
                       writes=_fill)
    top = share / names[-1]
    fields, extensions, backing = header_extensions(top)
    assert fields["version"] == 2
    mnt = vfsnap_mount()
    write_through(mnt.volume("vol"), [(100, 5000, 0x62), (1 * MiB - 7, 70000, 0x63)])
    os.truncate(mnt.volume("vol"), 5 * MiB)
    write_through(mnt.volume("vol"), [(5 * MiB - 4096, 4096, 0x64)])
    expected = mnt.volume("vol").read_bytes()
    mnt.stop()
    after_fields, after_extensions, after_backing = header_extensions(top)
    assert after_fields["version"] == 2
    assert after_extensions == extensions and after_backing == backing
    assert info(top)["format-specific"]["data"]["compat"] == "0.10"
    assert check(top)["exit"] == 0
    assert flat_bytes(top, tmp_path) == expected


# -- the allocation fast path (whole runs of clusters counted with one slice) --------------------


@pytest.mark.parametrize("refcount_bits", [1, 8, 16, 64])
def test_allocated_runs_skip_stray_counts_and_cross_refcount_blocks(refcount_bits, tmp_path):
    """`Refcounts.allocate` counts a free run in one slice when it lies in one block; runs that
    cross a block, stray counts past the end of the file and sub-byte widths take the slow path.
    Either way every cluster of a run ends with count 1 and no run overlaps another."""
    from vfsnap.format.cache import TableCache
    from vfsnap.format.qcow2 import Qcow2Image

    path = tmp_path / "vol.qcow2"
    create(path, 64 << 20, options=f"cluster_size=512,refcount_bits={refcount_bits}")
    image = Qcow2Image(os.open(path, os.O_RDWR), path.name, writable=True, table_cache=TableCache())
    try:
        refcounts = image.refcounts
        per_block = 1 << refcounts.block_shift
        stray = refcounts.end_cluster + 5
        refcounts.change(stray, +1)  # a count past the end of the file: must be skipped
        runs = [refcounts.allocate(16) for _ in range(3)]
        # Up to the next block boundary, then a run across it.
        boundary = -(-refcounts.end_cluster // per_block) * per_block
        if boundary - refcounts.end_cluster > 4:
            refcounts.allocate(boundary - refcounts.end_cluster - 4)
        runs.append(refcounts.allocate(8))
        clusters = [c for start in runs for c in range(start, start + (8 if start == runs[-1] else 16))]
        assert stray not in clusters
        assert len(set(clusters)) == len(clusters)
        assert all(refcounts.get(c) == 1 for c in clusters)
        assert refcounts.get(stray) == 1
        assert runs[-1] < boundary < runs[-1] + 8, "the last run was meant to cross a block"
    finally:
        image.close()


def test_refcount_blocks_stay_within_the_memory_budget(tmp_path):
    """Refcount blocks are cached in the mount's one budget (issue 13): counting clusters across
    200 refcount blocks with a 16 KiB budget keeps what is cached and held within it once each
    flush has written the changed blocks, and every count is still right when read afresh."""
    import tracemalloc

    from vfsnap.format.cache import TableCache
    from vfsnap.format.qcow2 import Qcow2Image
    from vfsnap.format.refcount import Refcounts

    path = tmp_path / "vol.qcow2"
    create(path, 8 << 20, options="cluster_size=512,refcount_bits=16")  # 256 counts per block; 2 KiB L1
    budget = TableCache(capacity=16 << 10)
    image = Qcow2Image(os.open(path, os.O_RDWR), path.name, writable=True, table_cache=budget)
    try:
        refcounts = image.refcounts
        per_block = 1 << refcounts.block_shift
        first = last = refcounts.allocate(1)
        tracemalloc.start()
        try:
            for _ in range(200):
                for _ in range(per_block):
                    last = refcounts.allocate(1)
                image.flush()
                assert budget.usage()["dirty"] == 0
                assert budget.used_bytes <= budget.capacity, budget.usage()
            # What refcount.py allocated and still holds: the blocks (100 KiB of them were used).
            held = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/format/refcount.py")])
        finally:
            tracemalloc.stop()
        assert sum(stat.size for stat in held.statistics("filename")) <= budget.capacity + 4096
        assert (last >> refcounts.block_shift) - (first >> refcounts.block_shift) >= 200
        fresh = Refcounts(image)  # every cluster from first to last is counted once (data or block)
        assert all(fresh.get(c) == 1 for c in range(first, last + 1))
        fresh.release()
        image.close_writes()
        assert budget.usage()["dirty"] == 0
    finally:
        image.close()
    assert budget.used_bytes == 0, budget.usage()


def test_writes_under_a_tiny_memory_budget_stay_consistent(share, tmp_path, vfsnap_mount):
    """512-byte clusters under a 64 KiB budget: L2 tables and refcount blocks are evicted and
    written back early all the time; the image stays consistent and holds what was written."""
    size = 16 * MiB
    create(share / "vol", size, fmt="raw")
    create(share / "vol.s1", size, backing="vol", backing_fmt="raw", options="cluster_size=512")
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    mnt = vfsnap_mount("memory_budget=64K")
    expected = bytearray(size)
    rng = random.Random(13)
    with open(mnt.volume("vol"), "r+b") as f:
        for _ in range(600):
            offset = rng.randrange(0, size - 8192) & ~511
            data = rng.randbytes(rng.choice([512, 4096, 8192]))
            f.seek(offset)
            f.write(data)
            expected[offset:offset + len(data)] = data
    mnt.stop()
    result = check(share / "vol.s1")
    assert result["exit"] == 0, {k: result[k] for k in result if k != "stderr"} | {"stderr": result["stderr"][:500]}
    assert flat_bytes(share / "vol.s1", tmp_path) == expected


# -- overwrites in place: one write per run of host-contiguous clusters ---------------------------


def test_an_overwrite_is_one_write_per_run_of_host_contiguous_clusters(tmp_path):
    """A write over clusters the image owns goes to the share as one write per run of clusters
    whose host clusters follow each other (a 1 MiB overwrite on a network share: one round trip,
    not sixteen); clusters allocated in the opposite order are each written at their own place.
    The bytes are QEMU's: the same writes by qemu-io on a copy, `qemu-img compare`."""
    from vfsnap.chain.view import View
    from vfsnap.format.cache import TableCache
    from vfsnap.format.qcow2 import Qcow2Image

    cluster = 64 * KiB
    path, copy = tmp_path / "vol.qcow2", tmp_path / "copy.qcow2"
    create(path, 4 * MiB)
    shutil.copyfile(path, copy)
    # Clusters 0-7 in one write (host clusters in guest order), 15 down to 8 one by one (host
    # clusters in the opposite order), then an unaligned overwrite of all sixteen.
    writes = [(0, 8 * cluster, 0x01)] + [(c * cluster, cluster, 0x10 + c) for c in range(15, 7, -1)]
    overwrite = (1000, 16 * cluster - 2000, 0x42)
    image = Qcow2Image(os.open(path, os.O_RDWR), path.name, writable=True, table_cache=TableCache())
    try:
        view = View([image], name=path.name)
        for offset, length, pattern in writes:
            view.write(offset, bytes([pattern]) * length)
        image.flush()
        hosts = [image.in_place_offset(c * cluster, cluster) for c in range(16)]
        assert all(hosts[c + 1] == hosts[c] + cluster for c in range(7))
        assert all(hosts[c + 1] == hosts[c] - cluster for c in range(8, 15))
        made = []
        write_in_place = image.write_in_place

        def counted(host, data):
            made.append((host, len(data)))
            write_in_place(host, data)

        image.write_in_place = counted
        offset, length, pattern = overwrite
        assert view.write(offset, bytes([pattern]) * length) == length
        assert made == [(hosts[0] + 1000, 8 * cluster - 1000)] + [(hosts[c], cluster) for c in range(8, 15)] \
            + [(hosts[15], cluster - 1000)]
        image.close_writes()
    finally:
        image.close()
    for offset, length, pattern in writes + [overwrite]:
        qemu_io(copy, f"write -P {pattern} {offset} {length}")
    assert check(path)["exit"] == 0
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(path), str(copy))


def test_a_table_read_before_a_write_back_is_not_cached_over_it(tmp_path, monkeypatch):
    """Two threads may load one image's L2 table at once (a merge's copy resolving through the
    live image on a share's thread while a write of that image runs on another). A copy read
    from the file before the writer changed the table and wrote it back must not replace the
    written-back table in the cache, or the image would later be read without the new cluster.
    The reader is held right after its read until the writer has flushed: the interleaving that
    the table's epoch guards against (vfsnap/share/io.py rule 1)."""
    import threading

    import vfsnap.format.qcow2 as qcow2
    from vfsnap.chain.view import View
    from vfsnap.format import DATA, UNALLOCATED
    from vfsnap.format.cache import TableCache

    cluster = 64 * KiB
    path = tmp_path / "vol.qcow2"
    create(path, 4 * MiB)
    qemu_io(path, f"write -P 0x11 0 {cluster}")  # an L2 table on the file, naming cluster 0 only
    image = qcow2.Qcow2Image(os.open(path, os.O_RDWR), path.name, writable=True, table_cache=TableCache())
    read_done, go_on = threading.Event(), threading.Event()
    real_pread = qcow2.pread_full
    reader_thread: list[threading.Thread] = []

    def held_pread(fd, length, offset):
        data = real_pread(fd, length, offset)
        if threading.current_thread() in reader_thread:
            read_done.set()
            assert go_on.wait(30)
        return data

    monkeypatch.setattr(qcow2, "pread_full", held_pread)
    try:
        seen: list = []
        reader = threading.Thread(target=lambda: seen.extend(image.map_range(0, 2 * cluster)))
        reader_thread.append(reader)
        reader.start()
        assert read_done.wait(30), "the reader did not load the table"
        # The writer (this thread): the table is loaded again, changed, and written back.
        View([image], name=path.name).write(cluster, b"\x22" * cluster)
        image.flush()
        go_on.set()
        reader.join(30)
        assert [(s, e, kind) for s, e, kind, _ in seen] == [(0, cluster, DATA), (cluster, 2 * cluster, UNALLOCATED)]
        # (what the reader saw: the table as it was before the write)
        kinds = [(s, e, kind) for s, e, kind, _ in image.map_range(0, 2 * cluster)]
        assert kinds == [(0, 2 * cluster, DATA)], "the stale copy replaced the written-back table in the cache"
        image.close_writes()
    finally:
        go_on.set()
        image.close()
    assert check(path)["exit"] == 0
