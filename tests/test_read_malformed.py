"""Malformed images fail only their own volume (DESIGN.md invariants 5 and 6, issue #2).

Every case puts one bad volume `bad` on a share beside a healthy control volume `good` (a qcow2
chain with data), mounts the share, and checks that:

- reading the bad volume fails with errno EIO (the open may succeed; the read must fail), again
  on a second try, and never hangs (a watchdog kills the daemon and fails the test if it does);
- for corruption confined to some clusters, the rest of the bad volume still reads as before;
- afterwards the control volume still reads exactly what `qemu-img convert` gives, the tree
  still lists both volumes, and the daemon is alive;
- no byte from outside the chain (recognizable marker bytes in the file an absolute path, `..`,
  another volume, a symlink or an external data file points at) ever shows up in a read;
- the daemon logged the failure at ERROR level naming the bad file, and logged no traceback
  (the `vfsnap_mount` fixture fails the test on a traceback).

The images are made valid with qemu-img/qemu-io first, then broken by patching header fields
or L2 entries at the offsets of QCOW2-NOTES 1.1/1.3 with struct.
"""

from __future__ import annotations

import errno
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest

from tests.conftest import requires_fuse
from tests.qemu import (
    create,
    flat_bytes,
    l2_entry_offset,
    make_chain,
    qcow2_header,
    qemu_img,
    qemu_io,
    read_u64,
    set_header_field,
    view_path,
    write_info,
    write_u64,
)

pytestmark = requires_fuse

KiB = 1 << 10
MiB = 1 << 20
CS = 64 * KiB
SIZE = 2 * MiB
MARKER = b"OUTSIDE-THE-CHAIN!"
OFFSET_MASK = 0x00FFFFFFFFFFFE00


@attrs.define
class Bad:
    """What a case built, and what the test expects of it."""

    eio: list[tuple[str, int, int]]  # (view, offset, length) reads that must fail with EIO
    ok: list[tuple[str, int, bytes]] = attrs.Factory(list)  # (view, offset, expected bytes)
    files: tuple[str, ...] = ("bad.s1",)  # a file one of which the ERROR log line must name
    options: str = ""
    volume: str = "bad"
    log_offset: int | None = None  # a guest offset the ERROR line must name too (hex or decimal)


# -- building blocks ---------------------------------------------------------------------------


def _fill(path: Path, marker_free_pattern: int, fmt: str = "raw") -> None:
    qemu_io(path, f"write -P {marker_free_pattern} 0 {SIZE}", fmt=fmt)


def bad_overlay(share: Path, *, options: str | None = None) -> Path:
    """Raw base `bad` (0x11), overlay `bad.s1` (active) with 0x22 over clusters 1-3 and 0x33 on 5."""
    create(share / "bad", SIZE, fmt="raw")
    _fill(share / "bad", 0x11)
    create(share / "bad.s1", SIZE, backing="bad", backing_fmt="raw", options=options)
    qemu_io(share / "bad.s1", f"write -P 0x22 {CS} {3 * CS}", f"write -P 0x33 {5 * CS} {CS}")
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return share / "bad.s1"


def _whole(view: str = "live") -> list[tuple[str, int, int]]:
    return [(view, 0, 128 * KiB), (view, SIZE - 4096, 4096)]


def _base_bytes() -> bytes:
    return b"\x11" * SIZE


def _live_bytes() -> bytes:
    data = bytearray(_base_bytes())
    data[CS:4 * CS] = b"\x22" * 3 * CS
    data[5 * CS:6 * CS] = b"\x33" * CS
    return bytes(data)


def _header_case(field: str, value: int, **kwargs):
    def build(share: Path, tmp: Path) -> Bad:
        set_header_field(bad_overlay(share, **kwargs), field, value)
        return Bad(eio=_whole())

    return build


def _l2_case(make_entry, *, options: str | None = None, guest: int = CS):
    """Break the L2 entry of guest cluster `guest` of bad.s1; the rest of the volume stays readable."""

    def build(share: Path, tmp: Path) -> Bad:
        overlay = bad_overlay(share, options=options)
        where = l2_entry_offset(overlay, guest)
        h = qcow2_header(overlay)
        make_entry(overlay, where, h)
        cs = 1 << h["cluster_bits"]
        start = guest // cs * cs
        live = _live_bytes()
        ok = [("live", 0, live[:CS]), ("live", 5 * CS, live[5 * CS:6 * CS]), ("live", 8 * CS, live[8 * CS:9 * CS]),
              ("s1", 0, _base_bytes()[:CS]), ("s1", start, _base_bytes()[start:start + cs])]
        return Bad(eio=[("live", start, cs), ("live", start + 100, 10), ("live", start - 10, 20)], ok=ok,
                   log_offset=start)

    return build


def _entry_beyond_eof(path, where, h):
    write_u64(path, where, (1 << 63) | ((os.path.getsize(path) + 1024 * MiB) & OFFSET_MASK))


def _entry_into_l1(path, where, h):
    write_u64(path, where, (1 << 63) | h["l1_table_offset"])


def _entry_into_refcount_table(path, where, h):
    write_u64(path, where, (1 << 63) | h["refcount_table_offset"])


def _entry_unaligned(path, where, h):
    write_u64(path, where, read_u64(path, where) + 512)


def _entry_huge(path, where, h):
    write_u64(path, where, (1 << 63) | (OFFSET_MASK & ~((1 << h["cluster_bits"]) - 1)))


def _subcluster_alloc_and_zero(path, where, h):
    bitmap = read_u64(path, where + 8)
    alloc = bitmap & 0xFFFFFFFF
    assert alloc, "the setup should have allocated subclusters"
    lowest = (alloc & -alloc).bit_length() - 1
    write_u64(path, where + 8, bitmap | (1 << (32 + lowest)))


def _l1_beyond_eof(share: Path, tmp: Path) -> Bad:
    overlay = bad_overlay(share)
    h = qcow2_header(overlay)
    write_u64(overlay, h["l1_table_offset"], (1 << 63) | ((os.path.getsize(overlay) + 64 * MiB) & OFFSET_MASK))
    return Bad(eio=_whole(), ok=[("s1", 0, _base_bytes()[:CS])])


def _l1_entry_unaligned(share: Path, tmp: Path) -> Bad:
    overlay = bad_overlay(share)
    h = qcow2_header(overlay)
    write_u64(overlay, h["l1_table_offset"], read_u64(overlay, h["l1_table_offset"]) + 512)
    return Bad(eio=_whole(), ok=[("s1", 0, _base_bytes()[:CS])])


def _compressed_overlay(share: Path) -> tuple[Path, int]:
    """bad.s1 with compressed clusters 1-3; returns the overlay and the L2 entry of cluster 2."""
    create(share / "bad", SIZE, fmt="raw")
    _fill(share / "bad", 0x11)
    create(share / "bad.s1", SIZE, backing="bad", backing_fmt="raw")
    qemu_io(share / "bad.s1", *(f"write -c -P {0x40 + i} {i * CS} {CS}" for i in (1, 2, 3)))
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    where = l2_entry_offset(share / "bad.s1", 2 * CS)
    assert read_u64(share / "bad.s1", where) & (1 << 62), "the setup should have made a compressed cluster"
    return share / "bad.s1", where


def _compressed_garbage(share: Path, tmp: Path) -> Bad:
    overlay, where = _compressed_overlay(share)
    cb = qcow2_header(overlay)["cluster_bits"]
    host = read_u64(overlay, where) & ((1 << (62 - (cb - 8))) - 1)
    with open(overlay, "r+b") as f:
        f.seek(host)
        f.write(os.urandom(64) + MARKER * 8)  # not a deflate stream any more
    return Bad(eio=[("live", 2 * CS, CS), ("live", 2 * CS + 7, 3)],
               ok=[("live", CS, b"\x41" * CS), ("live", 0, b"\x11" * CS), ("live", 4 * CS, b"\x11" * CS)])


def _compressed_beyond_eof(share: Path, tmp: Path) -> Bad:
    overlay, where = _compressed_overlay(share)
    entry = read_u64(overlay, where)
    cb = qcow2_header(overlay)["cluster_bits"]
    offset_bits = 62 - (cb - 8)
    entry = (entry & ~((1 << offset_bits) - 1)) | (os.path.getsize(overlay) + 10 * MiB + 17)
    write_u64(overlay, where, entry)
    return Bad(eio=[("live", 2 * CS, CS)], ok=[("live", 3 * CS, b"\x43" * CS)])


def _marker_file(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.write((MARKER * (size // len(MARKER) + 1))[:size])
    return path


def _absolute_backing(share: Path, tmp: Path) -> Bad:
    outside = _marker_file(tmp / "outside.raw")
    create(share / "bad", SIZE, fmt="raw")
    create(share / "bad.s1", SIZE, backing=str(outside), backing_fmt="raw")
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole())


def _dotdot_backing(share: Path, tmp: Path) -> Bad:
    _marker_file(tmp / "outside.raw")
    create(share / "bad", SIZE, fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "../outside.raw", "-F", "raw", str(share / "bad.s1"), str(SIZE))
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole())


def _dotdot_inside_share(share: Path, tmp: Path) -> Bad:
    """`sub/../victim` stays inside the share but is a path, not a plain name."""
    _marker_file(share / "victim")
    (share / "sub").mkdir()
    create(share / "bad", SIZE, fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "sub/../victim", "-F", "raw", str(share / "bad.s1"), str(SIZE))
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole())


def _other_volume_backing(share: Path, tmp: Path) -> Bad:
    _marker_file(share / "victim")
    create(share / "bad", SIZE, fmt="raw")
    create(share / "bad.s1", SIZE, backing="victim", backing_fmt="raw")
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole())


def _other_volume_overlay_backing(share: Path, tmp: Path) -> Bad:
    """The backing file is an overlay of the control volume (`good.s1`)."""
    create(share / "bad", SIZE, fmt="raw")
    create(share / "bad.s1", SIZE, backing="good.s1", backing_fmt="qcow2")
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole())


def _loop(share: Path, tmp: Path) -> Bad:
    create(share / "bad", SIZE, fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "bad.s2", "-F", "qcow2", str(share / "bad.s1"), str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "bad.s1", "-F", "qcow2", str(share / "bad.s2"), str(SIZE))
    result = qemu_img("info", "--backing-chain", str(share / "bad.s2"), check=False)
    assert "infinite loop" in result.stderr  # the oracle agrees the chain is broken
    write_info(share, "bad", "bad.s2", {"s1": "bad.s1", "s2": "bad.s2"})
    return Bad(eio=_whole() + _whole("s2"), files=("bad.s1", "bad.s2"))


def _self_loop(share: Path, tmp: Path) -> Bad:
    """An overlay naming itself (qemu-img refuses to create one, so the name is patched in)."""
    create(share / "bad", SIZE, fmt="raw")
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "bad.s2", "-F", "qcow2", str(share / "bad.s1"), str(SIZE))
    h = qcow2_header(share / "bad.s1")
    with open(share / "bad.s1", "r+b") as f:
        f.seek(h["backing_file_offset"])
        assert f.read(h["backing_file_size"]) == b"bad.s2"
        f.seek(h["backing_file_offset"])
        f.write(b"bad.s1")
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole())


def _too_deep(share: Path, tmp: Path) -> Bad:
    names = make_chain(share, "bad", size=SIZE, depth=4, base_fmt="raw",
                       writes=lambda level, path, fmt: qemu_io(path, f"write -P {0x50 + level} {level * CS} {CS}",
                                                               fmt=fmt))
    return Bad(eio=_whole(), ok=[("s1", 0, b"\x50" * CS)], options="max_chain_depth=3",
               files=tuple(names))


def _symlink_overlay(share: Path, tmp: Path) -> Bad:
    target = tmp / "elsewhere.qcow2"
    create(target, SIZE)
    qemu_io(target, f"write -s {_marker_file(tmp / 'marker', SIZE)} 0 {SIZE}")
    create(share / "bad", SIZE, fmt="raw")
    os.symlink(target, share / "bad.s1")
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole())


def _symlink_overlay_inside(share: Path, tmp: Path) -> Bad:
    """A relative symlink to a valid overlay inside the share: still refused (images are files)."""
    bad_overlay(share)
    os.rename(share / "bad.s1", share / ".hidden-overlay")
    os.symlink(".hidden-overlay", share / "bad.s1")
    return Bad(eio=_whole())


def _external_data_file(share: Path, tmp: Path) -> Bad:
    data = tmp / "outside.data"
    create(share / "bad", SIZE, fmt="raw")
    create(share / "bad.s1", SIZE, backing="bad", backing_fmt="raw", options=f"data_file={data}")
    qemu_io(share / "bad.s1", f"write -s {_marker_file(tmp / 'marker', SIZE)} 0 {SIZE}")
    assert MARKER in data.read_bytes()
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole())


def _luks(share: Path, tmp: Path) -> Bad:
    create(share / "bad", SIZE, fmt="raw")
    # qemu-img times the key derivation by the CPU time it gets, and on a busy machine sometimes
    # fails with "Unable to get accurate CPU usage": the image is made again, up to three times.
    for _ in range(3):
        result = qemu_img("create", "-q", "-f", "qcow2", "--object", "secret,id=sec0,data=123456",
                          "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                          "-b", "bad", "-F", "raw",
                          str(share / "bad.s1"), str(SIZE), check=False)
        if result.returncode == 0 or "accurate CPU usage" not in result.stderr:
            break
    if result.returncode:
        pytest.fail(f"qemu-img cannot make a LUKS image (Debian's qemu-utils can): {result.stderr}", pytrace=False)
    assert qcow2_header(share / "bad.s1")["crypt_method"] == 2
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole())


def _bad_magic_declared_base(share: Path, tmp: Path) -> Bad:
    """A qcow2 base with a broken magic, declared qcow2 by its overlay: never served as raw."""
    create(share / "bad", SIZE)
    qemu_io(share / "bad", f"write -P 0x11 0 {SIZE}")
    create(share / "bad.s1", SIZE, backing="bad", backing_fmt="qcow2")
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    set_header_field(share / "bad", "magic", 0x12345678)
    return Bad(eio=_whole() + _whole("s1"), files=("bad",))


def _declared_qcow2_over_raw(share: Path, tmp: Path) -> Bad:
    """The overlay declares its raw base as qcow2 (QEMU fails to open the chain too)."""
    create(share / "bad", SIZE, fmt="raw")
    _fill(share / "bad", 0x11)
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "bad", "-F", "qcow2", str(share / "bad.s1"), str(SIZE))
    assert qemu_img("convert", "-O", "raw", str(share / "bad.s1"), str(tmp / "x.raw"), check=False).returncode
    write_info(share, "bad", "bad.s1", {"s1": "bad.s1"})
    return Bad(eio=_whole() + _whole("s1"), files=("bad",))


CASES = {
    "l1-size-absurd": _header_case("l1_size", 0x7FFFFFFF),
    "l1-size-too-small": _header_case("l1_size", 0),
    "l1-table-beyond-eof": _header_case("l1_table_offset", 1 << 40),
    "refcount-table-beyond-eof": _header_case("refcount_table_offset", 1 << 40),
    "cluster-bits-8": _header_case("cluster_bits", 8),
    "cluster-bits-22": _header_case("cluster_bits", 22),
    "bad-magic-overlay": _header_case("magic", 0x514649FA),
    "version-1": _header_case("version", 1),
    "version-4": _header_case("version", 4),
    "unknown-incompatible-bit": _header_case("incompatible_features", 1 << 5),
    "refcount-order-7": _header_case("refcount_order", 7),
    "encryption-aes-header": _header_case("crypt_method", 1),
    "encryption-luks": _luks,
    "external-data-file": _external_data_file,
    "l2-entry-beyond-eof": _l2_case(_entry_beyond_eof),
    "l2-entry-huge": _l2_case(_entry_huge),
    "l2-entry-into-l1-table": _l2_case(_entry_into_l1),
    "l2-entry-into-refcount-table": _l2_case(_entry_into_refcount_table),
    "l2-entry-unaligned": _l2_case(_entry_unaligned),
    "l1-entry-beyond-eof": _l1_beyond_eof,
    "l1-entry-unaligned": _l1_entry_unaligned,
    "extended-l2-alloc-and-zero": _l2_case(_subcluster_alloc_and_zero, options="extended_l2=on,cluster_size=128k",
                                           guest=3 * CS),
    "compressed-garbage": _compressed_garbage,
    "compressed-beyond-eof": _compressed_beyond_eof,
    "backing-absolute-path": _absolute_backing,
    "backing-dotdot-outside": _dotdot_backing,
    "backing-dotdot-inside": _dotdot_inside_share,
    "backing-other-volume": _other_volume_backing,
    "backing-other-volume-overlay": _other_volume_overlay_backing,
    "backing-loop": _loop,
    "backing-self-loop": _self_loop,
    "chain-deeper-than-max": _too_deep,
    "symlink-overlay-outside": _symlink_overlay,
    "symlink-overlay-inside": _symlink_overlay_inside,
    "bad-magic-declared-base": _bad_magic_declared_base,
    "backing-declared-qcow2-over-raw": _declared_qcow2_over_raw,
}


# -- checks ------------------------------------------------------------------------------------


@contextmanager
def watchdog(mnt, seconds: float = 20.0):
    """Kill the daemon if the block takes longer (a hang on a hostile image), and fail."""
    fired = threading.Event()

    def fire():
        fired.set()
        mnt.process.kill()

    timer = threading.Timer(seconds, fire)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    assert not fired.is_set(), f"vfsnap hung for {seconds} s on a malformed image and was killed"


def read_errno(path: Path, offset: int, length: int) -> tuple[int | None, bytes]:
    """(errno of the first failing step or None, bytes read): open, then an O_DIRECT pread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return exc.errno, b""
    try:
        return None, os.pread(fd, length, offset)
    except OSError as exc:
        return exc.errno, b""
    finally:
        os.close(fd)


def readable_bytes(path: Path, chunk: int = 64 * KiB) -> bytes:
    """Everything of a file that can be read, chunk by chunk, skipping chunks that fail."""
    out = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return b""
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, chunk):
            try:
                out.append(os.pread(fd, chunk, offset))
            except OSError:
                pass
    finally:
        os.close(fd)
    return b"".join(out)


@pytest.fixture
def control(share: Path, tmp_path: Path):
    """The healthy volume `good` beside the bad one, and what it must read as."""
    def writes(level: int, path: Path, fmt: str) -> None:
        qemu_io(path, f"write -P {0x60 + level} {level * 100 * KiB} 300k", fmt=fmt)

    names = make_chain(share, "good", size=SIZE, depth=1, base_fmt="qcow2", writes=writes)
    return flat_bytes(share / names[-1], tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_volume_fails_alone(case, share, tmp_path, control, vfsnap_mount):
    bad = CASES[case](share, tmp_path)
    mnt = vfsnap_mount(bad.options)
    with watchdog(mnt):
        for attempt in (1, 2):
            for view, offset, length in bad.eio:
                err, data = read_errno(view_path(mnt, bad.volume, view), offset, length)
                assert err == errno.EIO, (
                    f"attempt {attempt}: reading {view} {offset:#x}+{length} of the bad volume gave "
                    f"{errno.errorcode.get(err, err) if err else f'{len(data)} bytes'}, not EIO")
        for view, offset, want in bad.ok:
            err, data = read_errno(view_path(mnt, bad.volume, view), offset, len(want))
            assert err is None and data == want, (
                f"{view} {offset:#x}+{len(want)}: the intact part of the bad volume no longer reads as before "
                f"({errno.errorcode.get(err, err) if err else 'different bytes'})")
        # Nothing from outside the chain, in any view of the bad volume.
        views = ["live"] + [name for name in _listdir(mnt.snapshot_dir(bad.volume)) if name != "latest"]
        for view in views:
            assert MARKER not in readable_bytes(view_path(mnt, bad.volume, view)), f"{view} shows bytes from outside"
        # The control volume, the tree and the daemon are fine.
        assert mnt.volume("good").read_bytes() == control
        err, data = read_errno(mnt.volume("good"), 12345, 100000)
        assert err is None and data == control[12345:112345]
        assert {"good", bad.volume} <= set(os.listdir(mnt.path / "volumes"))
    assert mnt.process.poll() is None, "the daemon died"
    assert _rss_bytes(mnt.process.pid) < 512 * MiB, "memory must stay bounded whatever the image claims"
    errors = [line for line in mnt.log().splitlines() if " ERROR " in line and any(n in line for n in bad.files)]
    if bad.log_offset is not None:
        errors = [line for line in errors if f"{bad.log_offset:#x}" in line or f" {bad.log_offset}+" in line]
    assert errors, (f"no ERROR log line names {bad.files}" + (f" and offset {bad.log_offset:#x}" if bad.log_offset
                    is not None else "") + ":\n" + "\n".join(mnt.log().splitlines()[-20:]))


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def test_chain_at_max_depth_still_reads(share, tmp_path, vfsnap_mount):
    """The limit itself is allowed: a chain of depth N with max_chain_depth=N reads normally."""
    names = make_chain(share, "vol", size=SIZE, depth=3, base_fmt="raw",
                       writes=lambda level, path, fmt: qemu_io(path, f"write -P {0x50 + level} {level * CS} {CS}",
                                                               fmt=fmt))
    want = flat_bytes(share / names[-1], tmp_path)
    mnt = vfsnap_mount("max_chain_depth=3")
    assert mnt.volume("vol").read_bytes() == want


def test_format_recorded_at_first_meeting_is_kept(share, tmp_path, control, vfsnap_mount):
    """A qcow2 volume met once is recorded as qcow2: if its magic is broken later it is a corrupt
    qcow2 image (EIO), not suddenly a raw disk exposing its metadata (invariant 4)."""
    create(share / "bad", SIZE)
    qemu_io(share / "bad", f"write -P 0x11 0 {SIZE}")
    mnt = vfsnap_mount()
    assert mnt.volume("bad").read_bytes() == b"\x11" * SIZE
    mnt.stop()
    set_header_field(share / "bad", "magic", 0x514649FA)
    mnt = vfsnap_mount()
    with watchdog(mnt):
        err, _ = read_errno(mnt.volume("bad"), 0, 4096)
        assert err == errno.EIO
        assert mnt.volume("good").read_bytes() == control
    assert mnt.process.poll() is None


def test_raw_volume_with_a_qcow2_header_stays_raw(share, tmp_path, vfsnap_mount):
    """A raw volume whose guest wrote a qcow2 header naming a host file as backing stays raw
    (invariant 4): vfsnap serves the header bytes, never the named file."""
    outside = _marker_file(tmp_path / "host-secret")
    create(share / "vol", SIZE, fmt="raw")
    mnt = vfsnap_mount()
    assert mnt.volume("vol").read_bytes() == bytes(SIZE)  # first meeting: recorded as raw
    mnt.stop()
    evil = tmp_path / "evil.qcow2"
    create(evil, SIZE, backing=str(outside), backing_fmt="raw")
    header = evil.read_bytes()[:CS]
    with open(share / "vol", "r+b") as f:
        f.write(header)
    mnt = vfsnap_mount()
    data = mnt.volume("vol").read_bytes()
    assert data[:CS] == header and MARKER not in data
