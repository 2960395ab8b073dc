"""Stateful model test of the write path (issue #3; QCOW2-NOTES checklist 16-26, 31, 32).

Hypothesis draws a chain (raw base alone, raw base + qcow2 overlays, qcow2 base with or without
overlays; 512-byte and 4 KiB clusters, so L2 tables span only 32 KiB or 2 MiB; backing files as
long as or shorter than the image above), fills it with qemu-io, mounts the share and then runs
random steps against the live volume, keeping an in-memory `bytearray` model of the disk:

* writes: aligned and unaligned, within a cluster, across clusters and L2-table boundaries,
  buffered or O_DIRECT; writes across the end of the disk (short, like a block device) and at it
  (ENOSPC);
* extends (`truncate` to a larger size; qcow2 L1 tables must grow past their cluster);
* fsync / fdatasync (afterwards `qemu-img check -U` of the active image is clean and QEMU reads
  the model from the share while the volume is still mounted);
* remounts (stop the daemon, `qemu-img check` every qcow2 file, compare QEMU's flattening of the
  chain with the model, mount again);
* crashes (SIGKILL): `qemu-img check` exits 0 or 3, never 2, and everything fsynced before is there.

After every step the whole live view, read with O_DIRECT (so the daemon, not the page cache,
answers), equals the model. At teardown every qcow2 file passes `qemu-img check` (exit 0) and
`qemu-img convert -O raw` of the chain equals the model.

Variants: the active image has an internal snapshot (`qemu-img snapshot -c s1`, so writes must
copy-on-write shared clusters and leave the snapshot listed and its content untouched), and the
active image is compressed (`qemu-img convert -c`, so overwrites replace compressed clusters).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.conftest import Mount, requires_fuse
from tests.qemu import check, create, qemu_img, qemu_io, write_info

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20
SECTOR = 512


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def _payload(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def _pread_all(fd: int, length: int, offset: int = 0) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(fd, min(length, 4 * MiB), offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def _describe_difference(got: bytes, want: bytes | bytearray) -> str:
    if len(got) != len(want):
        return f"length {len(got)}, model {len(want)}"
    n = next(i for i, (x, y) in enumerate(zip(got, want)) if x != y)
    return f"first difference at {n:#x}: got {got[n:n + 16].hex()} model {bytes(want[n:n + 16]).hex()}"


# -- drawing and building the chain ----------------------------------------------------------


@st.composite
def chain_specs(draw, *, top_qcow2: bool):
    """`(images, seed)`: images bottom first as `(name, format, cluster, size, qcow2 options)`."""
    base_fmt = draw(st.sampled_from(["raw", "qcow2"]), label="base_fmt")
    min_depth = 1 if top_qcow2 and base_fmt == "raw" else 0
    depth = draw(st.integers(min_depth, 2), label="depth")
    formats = [base_fmt] + ["qcow2"] * depth
    clusters, options = [], []
    for i, fmt in enumerate(formats):
        if fmt != "qcow2":
            clusters.append(0)
            options.append("")
            continue
        # 16 KiB clusters with extended L2 entries (subclusters of 512 bytes); v2 images
        # (compat=0.10: no zero flag, no dirty bit) with the small clusters.
        kind = draw(st.sampled_from(["512", "4k", "512-v2", "4k-v2", "16k-extl2"]), label=f"image{i}")
        cluster = {"512": 512, "4k": 4096, "16k-extl2": 16384}[kind.split("-v2")[0]]
        opts = [f"cluster_size={cluster}"]
        if kind.endswith("-v2"):
            opts.append("compat=0.10")
        elif kind == "16k-extl2":
            opts.append("extended_l2=on")
        clusters.append(cluster)
        options.append(",".join(opts))
    top_cluster = clusters[-1] or 4096
    if top_cluster == 16384:
        top_size = draw(st.integers(200 * KiB // SECTOR, 600 * KiB // SECTOR), label="top_sectors") * SECTOR
    elif top_cluster == 512:
        # Several 32 KiB L2 tables, and an L1 table that must grow past its cluster when extended.
        top_size = draw(st.integers(40 * KiB // SECTOR, 120 * KiB // SECTOR), label="top_sectors") * SECTOR
    else:
        # Around the first 2 MiB L2-table boundary.
        top_size = 2 * MiB + draw(st.integers(-64 * KiB // SECTOR, 192 * KiB // SECTOR), label="top_sectors") * SECTOR
    images = []
    for i, (fmt, cluster) in enumerate(zip(formats, clusters)):
        name = "vol" if i == 0 else f"vol.s{i}"
        if i == len(formats) - 1:
            size = top_size
        else:
            # Backing files as long as the top or shorter (zeros past their end), never longer:
            # extending an overlay over a longer backing file is a separate, known case
            # (test_write_lifecycle.py::test_extend_over_longer_backing_reads_zeros).
            size = top_size - draw(st.integers(0, top_size // 2 // SECTOR), label=f"shorter{i}") * SECTOR
        images.append((name, fmt, clusters[i], size, options[i]))
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    return images, seed


def _fill(path: Path, fmt: str, size: int, rng: random.Random, *, count: int, zeroes: bool) -> None:
    """Random qemu-io patterns (and, in qcow2 overlays, zero writes and discards) in one image."""
    commands = []
    for _ in range(count):
        offset = rng.randrange(0, size)
        length = min(rng.choice([rng.randint(1, 3000), rng.randint(1, 40 * KiB)]), size - offset)
        kind = rng.choice(["pattern", "pattern", "zero", "discard"] if zeroes else ["pattern"])
        if kind == "pattern":
            commands.append(f"write -P {rng.randint(1, 255)} {offset} {length}")
        elif kind == "zero":
            commands.append(f"write -z {offset} {length}")
        else:
            commands.append(f"discard {offset} {length}")
    if commands:
        qemu_io(path, *commands, fmt=fmt)


def build_chain(share: Path, images, seed: int) -> None:
    rng = random.Random(seed)
    for i, (name, fmt, cluster, size, options) in enumerate(images):
        if fmt == "raw":
            create(share / name, size, fmt="raw")
        elif i == 0:
            create(share / name, size, options=options)
        else:
            create(share / name, size, options=options, backing=images[i - 1][0], backing_fmt=images[i - 1][1])
        _fill(share / name, fmt, size, rng, count=rng.randint(0, 5), zeroes=i > 0)
    if len(images) > 1:
        write_info(share, "vol", images[-1][0], {f"s{i}": images[i][0] for i in range(1, len(images))})


def _l2_span(image) -> int:
    """Guest bytes one L2 table of a qcow2 image maps."""
    cluster, options = image[2], image[4]
    return cluster * (cluster // (16 if "extended_l2=on" in options else 8))


# -- the machine -----------------------------------------------------------------------------


class WriteModel(RuleBasedStateMachine):
    """The live volume `vol` against a bytearray."""

    variant = "plain"  # or "internal_snapshot", "compressed"

    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="vfsnap-wmodel-"))
        self.share = self.tmp / "share"
        self.share.mkdir()
        self.mnt: Mount | None = None
        self.mounts = 0
        self.steps_since_mount = 0
        self.fd = self.direct_fd = None
        self.images = []
        self.model = bytearray()

    # -- setup ----------------------------------------------------------------------------

    def _setup(self, spec, mount_options: str) -> None:
        images, seed = spec
        note(f"chain {images} seed {seed} options {mount_options!r}")
        build_chain(self.share, images, seed)
        self.images = images
        rng = random.Random(seed ^ 0x5A5A)
        top_name, top_fmt, top_cluster, top_size, _ = images[-1]
        if self.variant == "internal_snapshot":
            qemu_img("snapshot", "-c", "s1", str(self.share / top_name))
            # Diverge from the snapshot a little, so some clusters are owned again and some shared.
            _fill(self.share / top_name, "qcow2", top_size, rng, count=rng.randint(0, 3), zeroes=True)
            self.snapshot_before = self._convert(snapshot="s1")
            self.snapshot_list_before = self._snapshot_table()
        elif self.variant == "compressed":
            self._compress_top()
        self.top_fmt = top_fmt
        self.model = bytearray(self._convert())
        self.durable = bytes(self.model)
        self.unsynced: list[tuple[int, int]] = []
        self.max_size = len(self.model) + {512: 96 * KiB, 16384: 256 * KiB}.get(top_cluster, 2 * MiB + 256 * KiB)
        self.options = mount_options
        self._mount()

    def _compress_top(self) -> None:
        """Replace the active image by a compressed copy with the same backing (`convert -c -B`)."""
        name, _, _, _, options = self.images[-1]
        top = self.share / name
        # Data in the active image, in compressible patterns, so that there is something to compress.
        size = self.images[-1][3]
        commands = [f"write -P {0x30 + i} {offset} {min(8 * KiB, size - offset)}"
                    for i, offset in enumerate(range(0, size, max(size // 6, SECTOR)))]
        qemu_io(top, *commands)
        tmp = self.share / f".{name}.compressed"
        args = ["convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", options]
        if len(self.images) > 1:
            args += ["-B", self.images[-2][0], "-F", self.images[-2][1]]
        qemu_img(*args, str(top), str(tmp))
        before = self._convert()
        os.replace(tmp, top)
        assert self._convert() == before
        info = check(top)
        assert info.get("compressed-clusters", 0) > 0, info

    # -- helpers --------------------------------------------------------------------------

    @property
    def top(self) -> Path:
        return self.share / self.images[-1][0]

    @property
    def size(self) -> int:
        return len(self.model)

    def _convert(self, *, snapshot: str | None = None, force_share: bool = False) -> bytes:
        out = self.tmp / "oracle.raw"
        args = ["convert", "-f", self.images[-1][1], "-O", "raw"]
        if force_share:
            args.append("-U")
        if snapshot:
            args += ["-l", f"snapshot.name={snapshot}"]
        qemu_img(*args, str(self.top), str(out))
        try:
            return out.read_bytes()
        finally:
            out.unlink()

    def _snapshot_table(self) -> list[str]:
        lines = qemu_img("snapshot", "-l", "-U", str(self.top)).stdout.splitlines()
        return [line for line in lines if line.split()[:1] and line.split()[0].isdigit()]

    def _qcow2_files(self) -> list[Path]:
        return [self.share / image[0] for image in self.images if image[1] == "qcow2"]

    def _check_all_clean(self, when: str) -> None:
        """Every qcow2 file passes `qemu-img check`, and none is left marked dirty (QCOW2-NOTES 1.8
        rule 5: the dirty bit is cleared once the refcounts are consistent and flushed)."""
        for path in self._qcow2_files():
            result = check(path)
            assert result["exit"] == 0, f"{when}: qemu-img check {path.name} exit {result['exit']}: {result}"
            with open(path, "rb") as f:
                header = f.read(80)
            if struct.unpack(">I", header[4:8])[0] >= 3:
                assert not struct.unpack(">Q", header[72:80])[0] & 1, f"{when}: {path.name} is still marked dirty"

    def _mount(self) -> None:
        self.mounts += 1
        self.mnt = Mount(self.share, self.tmp / "mnt", self.options, log_path=self.tmp / f"mount{self.mounts}.log")
        self.mnt.start()
        path = self.mnt.volume("vol")
        self.fd = os.open(path, os.O_RDWR)
        self.direct_fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        self.steps_since_mount = 0

    def _close_fds(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.direct_fd = None

    def _unmount(self) -> None:
        """Close the volume and stop the daemon cleanly; its log must show no error."""
        self._close_fds()
        code = self.mnt.stop()
        errors = self.mnt.unexpected_errors()
        log_tail = self.mnt.log()[-4000:]
        self.mnt = None
        assert code == 0, f"vfsnap exited with {code}:\n{log_tail}"
        assert not errors, "\n".join(errors[:20])

    def _synced(self) -> None:
        self.durable = bytes(self.model)
        self.unsynced = []

    # -- rules ----------------------------------------------------------------------------

    def _draw_range(self, data) -> tuple[int, int]:
        size = self.size
        clusters = sorted({image[2] for image in self.images if image[2]})
        spans = sorted({_l2_span(image) for image in self.images if image[2]})
        how = data.draw(st.sampled_from(["uniform", "boundary", "boundary", "end"]), label="where")
        if how == "uniform":
            offset = data.draw(st.integers(0, size - 1), label="offset")
        elif how == "end":
            offset = max(0, size - data.draw(st.integers(1, 3 * max(clusters or [SECTOR])), label="from_end"))
        else:
            unit = data.draw(st.sampled_from([SECTOR, 4096, *clusters, *spans]), label="unit")
            k = data.draw(st.integers(0, max(0, (size - 1) // unit)), label="k")
            delta = data.draw(st.sampled_from([0, 0, -1, 1, -SECTOR, 7, -700, 513]), label="delta")
            offset = min(max(0, k * unit + delta), size - 1)
        kind = data.draw(st.sampled_from(["small", "sectors", "clusters", "large"]), label="length_kind")
        if kind == "small":
            length = data.draw(st.integers(1, 700), label="length")
        elif kind == "sectors":
            length = data.draw(st.integers(1, 16), label="sectors") * SECTOR
        elif kind == "clusters":
            unit = data.draw(st.sampled_from(clusters or [4096]), label="cluster")
            length = data.draw(st.integers(1, 5), label="n") * unit + data.draw(st.sampled_from([0, 0, 1, -1, 100]))
        else:
            length = data.draw(st.integers(1, 160 * KiB), label="length")
        length = max(1, min(length, size - offset))
        return offset, length

    @rule(data=st.data(), direct=st.booleans(), seed=st.integers(0, 2**32 - 1))
    def write(self, data, direct, seed):
        offset, length = self._draw_range(data)
        payload = _payload(seed, length)
        fd = self.direct_fd if direct else self.fd
        written = os.pwrite(fd, payload, offset)
        assert written == length, f"pwrite({length} at {offset:#x}) wrote {written}"
        self.model[offset:offset + length] = payload
        self.unsynced.append((offset, offset + length))

    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def concurrent_round(self, data, seed):
        """Several threads write disjoint ranges at once (often pieces of one cluster, which
        they all copy on write) while others read ranges nobody writes (issue 12)."""
        size = self.size
        if data.draw(st.booleans(), label="one_cluster"):
            unit = max([image[2] for image in self.images if image[2]] or [4096])
            base = data.draw(st.integers(0, max(0, (size - 1) // unit)), label="cluster") * unit
            end = min(size, base + unit)
            cuts = sorted(set(data.draw(st.lists(st.integers(base + 1, max(base + 1, end - 1)), min_size=1, max_size=5),
                                        label="cuts")) - {base, end})
            bounds = [base, *cuts, end]
            ranges = [(a, b - a) for a, b in zip(bounds, bounds[1:]) if b > a]
        else:
            ranges = []
            for _ in range(data.draw(st.integers(2, 6), label="writers")):
                offset, length = self._draw_range(data)
                if all(offset + length <= o or o + n <= offset for o, n in ranges):
                    ranges.append((offset, length))
        written = [(o, _payload(seed + i, n)) for i, (o, n) in enumerate(ranges)]
        untouched = [(o, n) for o, n in ((data.draw(st.integers(0, size - 1), label="read_at"), 4096) for _ in range(3))
                     if all(o + n <= w or w + len(p) <= o for w, p in written)]
        errors: list[str] = []

        def write(offset, payload):
            got = os.pwrite(self.direct_fd, payload, offset)
            if got != len(payload):
                errors.append(f"pwrite({len(payload)} at {offset:#x}) wrote {got}")

        def read(offset, length):
            got = os.pread(self.direct_fd, length, offset)
            want = bytes(self.model[offset:offset + length])
            if got != want:
                errors.append(f"concurrent read at {offset:#x}: {_describe_difference(got, want)}")

        threads = [threading.Thread(target=write, args=w) for w in written]
        threads += [threading.Thread(target=read, args=r) for r in untouched]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for offset, payload in written:
            self.model[offset:offset + len(payload)] = payload
            self.unsynced.append((offset, offset + len(payload)))

    @rule(before=st.integers(0, 5000), after=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1))
    def write_across_end(self, before, after, seed):
        """Like a block device: a write that crosses the end is short, one at the end is ENOSPC."""
        before = min(before, self.size)
        offset = self.size - before
        payload = _payload(seed, before + after)
        if before:
            written = os.pwrite(self.fd, payload, offset)
            assert written == before, f"write of {before + after} at {offset:#x} (end {self.size:#x}) wrote {written}"
            self.model[offset:] = payload[:before]
            self.unsynced.append((offset, offset + before))
        else:
            with pytest.raises(OSError) as exc:
                os.pwrite(self.fd, payload, offset)
            assert exc.value.errno == errno.ENOSPC
        assert os.fstat(self.fd).st_size == self.size, "a write past the end changed the disk size"

    @precondition(lambda self: self.size < self.max_size)
    @rule(data=st.data(), by_path=st.booleans())
    def extend(self, data, by_path):
        span = _l2_span(self.images[-1]) if self.images[-1][2] else 2 * MiB
        how = data.draw(st.sampled_from(["sectors", "to_boundary", "past_boundary"]), label="extend")
        if how == "sectors":
            new_size = self.size + data.draw(st.integers(1, 64), label="sectors") * SECTOR
        else:
            new_size = _round_up(self.size + 1, span) + (SECTOR if how == "past_boundary" else 0)
        new_size = min(new_size, self.max_size)
        if by_path:
            os.truncate(self.mnt.volume("vol"), new_size)
        else:
            os.ftruncate(self.fd, new_size)
        self.model.extend(bytes(new_size - self.size))
        # The new area may not be durable before an fsync: treat it like written bytes.
        self.unsynced.append((len(self.durable), new_size))

    @rule(datasync=st.booleans())
    def fsync(self, datasync):
        (os.fdatasync if datasync else os.fsync)(self.fd)
        self._synced()
        # fsync wrote every piece of metadata back: QEMU sees a clean image and the model, now.
        if self.top_fmt == "qcow2":
            result = _check_force_share(self.top)
            assert result["exit"] == 0, f"qemu-img check -U after fsync: {result}"
        got = self._convert(force_share=True)
        assert got == self.model, f"after fsync, QEMU reads {_describe_difference(got, self.model)}"

    def _settled(self) -> bool:
        # Restarts cost a quarter of a second each: keep most steps for I/O.
        return self.steps_since_mount >= 4

    @precondition(_settled)
    @rule()
    def remount(self):
        self._unmount()
        self._check_all_clean("after unmount")
        got = self._convert()
        assert got == self.model, f"after unmount, QEMU reads {_describe_difference(got, self.model)}"
        self._synced()
        self._mount()

    @precondition(_settled)
    @rule()
    def crash(self):
        """SIGKILL the daemon: fsynced data survives, the images leak at worst (check 0 or 3)."""
        self.mnt.kill()
        self._close_fds()
        self.mnt = None
        for path in self._qcow2_files():
            result = check(path)
            assert result["exit"] in (0, 3), f"after a crash, qemu-img check {path.name}: {result}"
            if result["exit"] == 3:
                repaired = qemu_img("check", "-r", "leaks", str(path), check=False)
                assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        got = self._convert()
        durable_size = len(self.durable)
        assert durable_size <= len(got) <= self.size, f"size {len(got)} after a crash, fsynced {durable_size}"
        expected = bytearray(self.durable[: len(got)]) + bytes(max(0, len(got) - durable_size))
        for start, end in self.unsynced:
            # Bytes written (or extended) after the last fsync may or may not have survived.
            if start < len(got):
                expected[start:min(end, len(got))] = got[start:min(end, len(got))]
        assert got == expected, f"fsynced data lost in a crash: {_describe_difference(got, expected)}"
        self.model = bytearray(got)
        self._synced()
        self._mount()

    # -- the invariant --------------------------------------------------------------------

    @invariant()
    def live_view_equals_model(self):
        if self.mnt is None or self.direct_fd is None:
            return
        self.steps_since_mount += 1
        st_size = os.fstat(self.direct_fd).st_size
        assert st_size == self.size, f"st_size {st_size}, model {self.size}"
        got = _pread_all(self.direct_fd, self.size + 4096)
        assert got == self.model, f"live view: {_describe_difference(got, self.model)}"

    # -- teardown -------------------------------------------------------------------------

    def teardown(self):
        try:
            if self.mnt is not None:
                self._unmount()
                if self.images:
                    self._check_all_clean("at teardown")
                    got = self._convert()
                    assert got == self.model, f"at teardown, QEMU reads {_describe_difference(got, self.model)}"
                    if self.variant == "internal_snapshot":
                        assert self._snapshot_table() == self.snapshot_list_before, "internal snapshot table changed"
                        # QEMU reads a snapshot at the image's current size: past the size the
                        # snapshot was taken at (the volume was extended since), zeros.
                        after = self._convert(snapshot="s1")
                        before = self.snapshot_before + bytes(max(0, len(after) - len(self.snapshot_before)))
                        assert after == before, f"internal snapshot s1 changed: {_describe_difference(after, before)}"
        finally:
            if self.mnt is not None:
                self.mnt.stop()
            self._close_fds()
            shutil.rmtree(self.tmp, ignore_errors=True)


def _check_force_share(image: Path) -> dict:
    """`qemu-img check -U` (read-only, next to the mounted daemon)."""
    result = subprocess.run(["qemu-img", "check", "-U", "--output=json", str(image)],
                            check=False, capture_output=True, text=True)
    document = json.loads(result.stdout) if result.stdout.strip() else {}
    document["exit"] = result.returncode
    document["stderr"] = result.stderr
    return document


class PlainChainModel(WriteModel):
    variant = "plain"

    # Mount options: the defaults; a background write-back every 50 ms; an L2-table cache and a
    # map cache that hold almost nothing (dirty tables must survive eviction).
    # `share_io=threads`: the share's I/O on worker threads, as on a network share (issue 12).
    @initialize(spec=chain_specs(top_qcow2=False), mount_options=st.sampled_from(
        ["", "metadata_flush_interval=0.05", "table_cache_size=8k,map_cache_chunks=1", "share_io=threads",
         "share_io=threads,metadata_flush_interval=0.05,table_cache_size=8k,map_cache_chunks=1"]))
    def setup(self, spec, mount_options):
        self._setup(spec, mount_options)


class InternalSnapshotModel(WriteModel):
    variant = "internal_snapshot"

    @initialize(spec=chain_specs(top_qcow2=True), mount_options=st.sampled_from(["", "share_io=threads"]))
    def setup(self, spec, mount_options):
        self._setup(spec, mount_options)


class CompressedModel(WriteModel):
    variant = "compressed"

    @initialize(spec=chain_specs(top_qcow2=True), mount_options=st.sampled_from(["", "share_io=threads"]))
    def setup(self, spec, mount_options):
        self._setup(spec, mount_options)


# VFSNAP_MODEL_SCALE=10 explores ten times as many examples (for a soak run, not for CI).
SCALE = int(os.environ.get("VFSNAP_MODEL_SCALE", "1"))
SETTINGS = {
    "deadline": None,
    "derandomize": bool(os.environ.get("CI")),
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}

TestWritesOnRandomChains = PlainChainModel.TestCase
TestWritesOnRandomChains.settings = settings(max_examples=15 * SCALE, stateful_step_count=25, **SETTINGS)

TestWritesCopyOnWriteInternalSnapshot = InternalSnapshotModel.TestCase
TestWritesCopyOnWriteInternalSnapshot.settings = settings(max_examples=8 * SCALE, stateful_step_count=20, **SETTINGS)

TestWritesOverCompressedClusters = CompressedModel.TestCase
TestWritesOverCompressedClusters.settings = settings(max_examples=8 * SCALE, stateful_step_count=20, **SETTINGS)


# -- concurrent requests on two volumes (issue 12) -----------------------------------------


@pytest.mark.parametrize("options", ["", "share_io=threads"])
def test_concurrent_writers_and_readers_on_two_volumes_match_their_models(tmp_path: Path, options: str):
    """Rounds of threads writing disjoint ranges (many inside one cluster, which they all copy
    on write) and reading untouched ones, on two volumes at once, with a snapshot taken in the
    middle of one round: after each round both live volumes equal their models; the snapshot
    holds, for every range written during that round, its old or its new bytes (nothing
    else); at the end QEMU reads the models and every image is clean."""
    share = tmp_path / "share"
    share.mkdir()
    rng = random.Random(1212)
    size = 4 * MiB
    build_chain(share, [("va", "qcow2", 65536, size, "cluster_size=65536"),
                        ("va.s1", "qcow2", 4096, size, "cluster_size=4096")], 7)
    build_chain(share, [("vb", "raw", 0, size, None), ("vb.s1", "qcow2", 65536, size, "cluster_size=65536")], 8)
    (share / "vol.info").unlink()  # build_chain's, for a volume named vol
    models = {}
    for name in ("va", "vb"):
        write_info(share, name, f"{name}.s1", {"s1": f"{name}.s1"})
        qemu_img("convert", "-O", "raw", str(share / f"{name}.s1"), str(tmp_path / f"{name}.raw"))
        models[name] = bytearray((tmp_path / f"{name}.raw").read_bytes())
    mnt = Mount(share, tmp_path / "mnt", options, log_path=tmp_path / "mnt.log")
    mnt.start()
    fds = {name: os.open(mnt.volume(name), os.O_RDWR | os.O_DIRECT) for name in models}
    snapshot_round, snapshot_check = 3, None
    try:
        for round_no in range(8):
            jobs, writes, errors = [], {name: [] for name in models}, []
            for name, model in models.items():
                cluster = rng.choice([4096, 65536]) if name == "va" else 65536
                base = rng.randrange(size // cluster) * cluster
                cuts = sorted({base, base + cluster, *(base + rng.randrange(1, cluster) for _ in range(3))})
                ranges = list(zip(cuts, cuts[1:]))
                for _ in range(3):  # and some anywhere else
                    offset = rng.randrange(size - 70000)
                    length = rng.randrange(1, 70000)
                    if all(offset + length <= a or b <= offset for a, b in ranges):
                        ranges.append((offset, offset + length))
                for a, b in ranges:
                    payload = _payload(rng.randrange(2**32), b - a)
                    writes[name].append((a, payload))
                    jobs.append(("write", name, a, payload))
                for _ in range(3):
                    offset = rng.randrange(size - 8192)
                    if all(offset + 8192 <= a or b <= offset for a, b in ranges):
                        jobs.append(("read", name, offset, 8192))
            if round_no == snapshot_round:
                jobs.append(("snapshot", "va", 0, None))
                before = bytes(models["va"])

            def run(job):
                kind, name, offset, arg = job
                try:
                    if kind == "write":
                        assert os.pwrite(fds[name], arg, offset) == len(arg)
                    elif kind == "read":
                        got = os.pread(fds[name], arg, offset)
                        assert got == bytes(models[name][offset:offset + arg]), f"{name} read at {offset:#x}"
                    else:
                        os.mkdir(mnt.snapshot_dir(name, "during"))
                except (OSError, AssertionError) as exc:
                    errors.append(f"{kind} {name} at {offset:#x}: {exc!r}")

            threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert not errors, errors
            for name, items in writes.items():
                for offset, payload in items:
                    models[name][offset:offset + len(payload)] = payload
            if round_no == snapshot_round:
                snapshot_check = (before, bytes(models["va"]), writes["va"])
            if round_no % 3 == 2:
                for fd in fds.values():
                    os.fsync(fd)
            for name, model in models.items():
                got = _pread_all(fds[name], size)
                assert got == model, f"round {round_no}, {name}: {_describe_difference(got, model)}"
        before, after, written = snapshot_check
        snap = mnt.snapshot("va", "during").read_bytes()
        expected = bytearray(before)
        for offset, payload in written:  # either side of each write in flight is right
            end = offset + len(payload)
            if snap[offset:end] == after[offset:end]:
                expected[offset:end] = after[offset:end]
        assert snap == expected, f"snapshot taken during writes: {_describe_difference(snap, expected)}"
    finally:
        for fd in fds.values():
            os.close(fd)
        code = mnt.stop()
    assert code == 0 and not mnt.unexpected_errors(), mnt.log()[-3000:]
    for image in ("va", "va.s1", "va.during", "vb.s1"):
        report = check(share / image)
        assert report["exit"] == 0, (image, report)
    for name, model in models.items():
        active = json.loads((share / f"{name}.info").read_text())["active"]
        qemu_img("convert", "-O", "raw", str(share / active), str(tmp_path / f"{name}.out"))
        assert (tmp_path / f"{name}.out").read_bytes() == model, f"QEMU reads {name} differently"
