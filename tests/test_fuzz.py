"""Fuzzing the qcow2 reader with mutated real images (issue #6, docs/security.md "Fuzzing").

Seeds are small images made by qemu-img (fuzz/harness.py: v2 and v3 overlays with backing format
extensions, extended L2, deflate and zstd compression, 512-byte clusters, lazy refcounts with the
dirty bit, an internal snapshot). Hypothesis mutates bytes, bits, table entries, header fields and
extension lengths, aimed at the header, L1, L2, refcount and snapshot tables and compressed data.

- header parsing: `parse_header` refuses with CorruptImage/UnsupportedImage or returns a header
  within the limits it promises, which re-serializes to the same fields;
- the read path: the chain opened as the daemon opens it (`backing_chain`), the whole virtual disk
  read through `View.read`: only VfsnapError may escape, each example within 2 s, memory bounded;
- the offline check and the refcount rebuild the mount runs on dirty images (the bugs this found
  in the internal snapshot table walk are fixed; their reproducers are the test_check_bounds_* tests);
- end to end: mutated chains mounted with FUSE and read whole: data or EIO, never another errno,
  never a byte from outside the chain, the daemon alive and its log free of tracebacks.

In CI each hypothesis target runs 300 examples, derandomized (the same examples every run). A
longer run: `VFSNAP_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest -q -p no:logging tests/test_fuzz.py`
(random examples, failures saved in .hypothesis/ and replayed first next time); fuzz/fuzz_headers.py
is the same harness under atheris (libFuzzer), see docs/security.md.
"""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from fuzz.harness import (
    RandomChooser,
    build_seeds,
    check_header,
    exercise_seed,
    mutate,
    mutate_seed,
    regions,
    repair_dirty,
    time_limit,
)
from tests.conftest import requires_fuse
from tests.qemu import l2_entry_offset, qemu_img, qemu_io, read_u64, write_u64

MiB = 1 << 20
KiB = 1 << 10
LONG_RUN = int(os.environ.get("VFSNAP_FUZZ_EXAMPLES", "0") or 0)
EXAMPLE_SECONDS = 2.0  # a clean example takes milliseconds
MEMORY_BOUND = 256 * MiB  # growth of this process's peak RSS over a whole fuzz target


def fuzz_settings(examples: int, *, shrink: bool = True):
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=LONG_RUN or examples,
        deadline=None,
        derandomize=not LONG_RUN,
        database=None if not LONG_RUN else settings.default.database,
        phases=phases,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
        report_multiple_bugs=False,
        print_blob=True,
    )


class HypothesisChooser:
    """fuzz.harness.Chooser on hypothesis' data strategy."""

    def __init__(self, data):
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def choice(self, options: list):
        return self.data.draw(st.sampled_from(options))


class Seeds(list):
    """The seed images (a short repr: hypothesis prints the arguments of a failing example)."""

    def __repr__(self) -> str:
        return f"<{len(self)} seeds: {', '.join(s.name for s in self)}>"


@pytest.fixture(scope="module")
def seeds():
    return Seeds(build_seeds())


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture
def memory_guard():
    """Fails the test if the process's peak RSS grew by more than MEMORY_BOUND during it."""
    before = peak_rss()
    yield
    grown = peak_rss() - before
    assert grown < MEMORY_BOUND, f"peak RSS grew by {grown / MiB:.0f} MiB while fuzzing"


# -- header, table and extension parsing -----------------------------------------------------------


def test_seeds_read_clean(seeds):
    """Unmutated, every seed parses, reads whole, checks clean, and (dirty seeds) repairs."""
    assert len(seeds) >= 8
    for seed in seeds:
        outcome = exercise_seed(seed, seed.files)
        assert all(h.endswith(":ok") for h in outcome.headers), (seed.name, outcome.headers)
        assert outcome.reads_failed == 0 and outcome.reads_ok > 0, (seed.name, outcome.summary())
        assert "E" not in outcome.check, (seed.name, outcome.summary())
        if seed.name == "lazy-dirty":
            assert outcome.repair == "vol.s1:repaired"


@fuzz_settings(300)
@given(data=st.data())
def test_header_parsing_fuzz(seeds, data, memory_guard):
    seed = data.draw(st.sampled_from(seeds), label="seed")
    files = mutate_seed(seed, HypothesisChooser(data), header_only=data.draw(st.booleans(), label="header_only"))
    file_size_delta = data.draw(st.sampled_from([0, 0, 0, -1, 1, -4096, 1 << 20]), label="file_size_delta")
    for name in seed.targets:
        blob = files[name]
        with time_limit(EXAMPLE_SECONDS):
            outcome = check_header(blob, max(0, len(blob) + file_size_delta), name=name)
        event(f"header: {outcome}")


# -- whole images through the reader ------------------------------------------------------------


@fuzz_settings(300)
@given(data=st.data())
def test_read_path_fuzz(seeds, data, memory_guard):
    """Mutated chains opened with backing_chain and read through View.read: data or VfsnapError."""
    seed = data.draw(st.sampled_from(seeds), label="seed")
    files = mutate_seed(seed, HypothesisChooser(data))
    note(f"seed {seed.name}")
    with time_limit(EXAMPLE_SECONDS):
        outcome = exercise_seed(seed, files, check=False, repair=False)
    event(f"chain: {outcome.chain}")
    event("some reads failed" if outcome.reads_failed else "every read succeeded")


@fuzz_settings(300, shrink=False)
@given(data=st.data())
def test_check_and_repair_fuzz(seeds, data):
    """The same mutated chains through `vfsnap check` (check_image) and the dirty-image repair.

    Longer runs of this target find the known bugs of test_check_bounds_* within a few thousand
    examples until they are fixed."""
    seed = data.draw(st.sampled_from(seeds), label="seed")
    files = mutate_seed(seed, HypothesisChooser(data))
    if data.draw(st.booleans(), label="force dirty"):
        files = {name: _set_dirty(blob) for name, blob in files.items()}
    with time_limit(EXAMPLE_SECONDS):
        outcome = exercise_seed(seed, files)
    event(f"repair: {outcome.repair or 'none'}")


def _set_dirty(blob: bytes) -> bytes:
    if len(blob) < 80 or blob[:4] != b"QFI\xfb" or struct.unpack_from(">I", blob, 4)[0] < 3:
        return blob
    incompat = struct.unpack_from(">Q", blob, 72)[0] | 1
    return blob[:72] + struct.pack(">Q", incompat) + blob[80:]


# -- deterministic reproducers of what the fuzzers found ---------------------------------------------


def _snapshot_seed(seeds):
    seed = next(s for s in seeds if s.name == "internal-snapshot")
    blob = bytearray(seed.files["vol"])
    nb, snap_offset = struct.unpack_from(">I", blob, 60)[0], struct.unpack_from(">Q", blob, 64)[0]
    assert nb == 1 and snap_offset
    return seed, blob, snap_offset


SNAPSHOT_TABLE_CASES = {
    # the L1 size of the one internal snapshot: a 256 MiB table read (and walked) from a 53 KiB file
    "snapshot-l1-size-256MiB": lambda blob, off: struct.pack_into(">I", blob, off + 8, 1 << 25),
    # four billion snapshot table entries, each one a 40-byte read
    "nb-snapshots-4G": lambda blob, off: struct.pack_into(">I", blob, 60, 0xFFFFFFFF),
    # a snapshot L1 at an offset os.pread cannot take (OverflowError, not CorruptImage)
    "snapshot-l1-offset-2^63": lambda blob, off: struct.pack_into(">Q", blob, off, 1 << 63),
}


@pytest.mark.parametrize("case", sorted(SNAPSHOT_TABLE_CASES))
@pytest.mark.parametrize("path", ["check", "repair"])
def test_check_bounds_snapshot_table(seeds, case, path):
    """`vfsnap check` and the mount-time repair of a dirty image whose internal snapshot table lies:
    must refuse (CorruptImage) or finish within 2 s, never allocate the sizes it claims."""
    seed, blob, snap_offset = _snapshot_seed(seeds)
    SNAPSHOT_TABLE_CASES[case](blob, snap_offset)
    files = {"vol": _set_dirty(bytes(blob)) if path == "repair" else bytes(blob)}
    with time_limit(EXAMPLE_SECONDS):
        if path == "check":
            exercise_seed(seed, files, repair=False)
        else:
            assert repair_dirty(files) in ("vol:repaired", "vol:CorruptImage", "vol:open-CorruptImage")


def test_check_bounds_empty_refcount_table_far_away(seeds):
    """`vfsnap check` of an image without refcount table whose (unused) table offset is 2^63."""
    seed = next(s for s in seeds if s.name == "clusters-512")
    blob = bytearray(seed.files["vol.s1"])
    struct.pack_into(">QI", blob, 48, 1 << 63, 0)
    files = dict(seed.files, **{"vol.s1": bytes(blob)})
    with time_limit(EXAMPLE_SECONDS):
        outcome = exercise_seed(seed, files, repair=False)
    assert outcome.check in ("E", "c")


def test_check_bounds_repair_growth(seeds, tmp_path):
    """A dirty image with one L2 entry 2^20 - 2 clusters past its end: the repair must not extend the
    file to that offset (found by the fuzzer: it grew such a file to 2 TiB before vfsnap refused to
    rebuild refcounts for references beyond the end of the file)."""
    image = tmp_path / "big-clusters.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M,lazy_refcounts=on", str(image), "64M")
    qemu_io(image, "write -P 0x11 0 2M")
    where = l2_entry_offset(image, 0)
    clusters = -(-os.path.getsize(image) // (2 * MiB))
    write_u64(image, where, (read_u64(image, where) & (1 << 63)) | ((clusters + (1 << 20) - 2) << 21))
    files = {"vol": _set_dirty(image.read_bytes())}
    with time_limit(10):
        assert repair_dirty(files) in ("vol:CorruptImage", "vol:repaired")


# -- end to end: mutated chains through FUSE ----------------------------------------------------------

MARKER = b"FUZZ-OUTSIDE-THE-CHAIN!"
E2E_VOLUMES = 24
E2E_SEED = 20261126


def _rename_chain(seed, volume: str) -> dict[str, bytes]:
    """The seed's files for volume `volume` (3 characters, like `vol`, so names keep their length)."""
    assert len(volume) == 3
    out = {}
    for name, blob in seed.files.items():
        if blob[:4] == b"QFI\xfb":
            offset, length = struct.unpack_from(">QI", blob, 8)
            if offset:
                backing = blob[offset:offset + length]
                assert backing.startswith(b"vol")
                blob = blob[:offset] + volume.encode() + backing[3:] + blob[offset + length:]
        out[volume + name[3:]] = blob
    return out


def _clear_dirty(blob: bytes) -> bytes:
    if len(blob) < 80 or blob[:4] != b"QFI\xfb" or struct.unpack_from(">I", blob, 4)[0] < 3:
        return blob
    incompat = struct.unpack_from(">Q", blob, 72)[0] & ~1
    return blob[:72] + struct.pack(">Q", incompat) + blob[80:]


def _read_view(path: Path) -> tuple[bytes, set[int]]:
    errors: set[int] = set()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return b"", {exc.errno}
    parts = []
    try:
        size = os.fstat(fd).st_size
        for offset in list(range(0, min(size, 8 * MiB), 64 * KiB)) + [max(0, size - 4096)]:
            try:
                parts.append(os.pread(fd, 64 * KiB, offset))
            except OSError as exc:
                errors.add(exc.errno)
    finally:
        os.close(fd)
    return b"".join(parts), errors


@requires_fuse
def test_mutated_images_through_fuse(seeds, share, tmp_path, vfsnap_mount):
    """24 mutated chains (seeded, deterministic), each a volume of one share beside a healthy one,
    with vfsnap's record of each made before the corruption: every view of every volume reads as
    data or EIO, nothing from outside the chains appears, the daemon stays up with no traceback.

    The dirty bit is cleared after mutating: the repair the mount runs on dirty images has known
    bugs and is fuzzed in-process (test_check_and_repair_fuzz)."""
    import threading

    rng = random.Random(E2E_SEED)
    outside = tmp_path / "outside.raw"
    outside.write_bytes((MARKER * (MiB // len(MARKER) + 1))[:MiB])
    (share / "victim").write_bytes(outside.read_bytes())
    (share / "good").write_bytes(bytes(range(256)) * 4096)
    volumes: dict[str, list[str]] = {}
    for i in range(E2E_VOLUMES):
        seed = seeds[i % len(seeds)]
        volume = f"v{i:02d}"
        files = _rename_chain(seed, volume)
        target = rng.choice(sorted(n for n in files if files[n][:4] == b"QFI\xfb"))
        files[target] = _clear_dirty(mutate(files[target], regions(files[target]), RandomChooser(rng),
                                            rng.randint(1, 4)))
        for name, blob in files.items():
            (share / name).write_bytes(blob)
        top = volume + seed.top[3:]
        snapshots = {}
        if top != volume:
            overlays = sorted(n for n in files if n != volume)
            snapshots = {name[len(volume) + 1:]: name for name in overlays}
            (share / f"{volume}.info").write_text(json.dumps({"active": top, **snapshots}, indent=1, sort_keys=True))
        (share / f"{volume}.vfsnap.json").write_text(json.dumps({"format": seed.base_format, "snapshots": {},
                                                                 "version": 1}))
        volumes[volume] = sorted(snapshots)
    mnt = vfsnap_mount("table_cache_size=1M")
    fired = threading.Event()

    def kill():
        fired.set()
        mnt.process.kill()

    timer = threading.Timer(120, kill)
    timer.start()
    outcomes = {}
    try:
        listed = set(os.listdir(mnt.path / "volumes"))
        assert {"good", "victim"} <= listed
        for volume, snaps in volumes.items():
            seen = {}
            views = [("live", mnt.volume(volume))] + [(s, mnt.snapshot(volume, s)) for s in snaps]
            for view, path in views:
                data, errors = _read_view(path)
                assert errors <= {errno.EIO}, f"{volume} {view}: {sorted(errno.errorcode[e] for e in errors)}"
                assert MARKER not in data, f"{volume} {view} shows bytes from outside its chain"
                seen[view] = "EIO" if errors else "data"
            outcomes[volume] = seen
        assert mnt.volume("good").read_bytes() == bytes(range(256)) * 4096
    finally:
        timer.cancel()
    assert not fired.is_set(), "the daemon hung on a mutated image and was killed"
    assert mnt.process.poll() is None, "the daemon died"
    assert not mnt.unexpected_errors()
    print(json.dumps(outcomes, sort_keys=True))
