"""Unit tests of vfsnap.format.header on images made by qemu-img (no mount).

- parse_header / read_header agree with `qemu-img info --output=json` (the oracle) on every field
  both know: cluster size, virtual size, compat, backing file name and format, compression type,
  refcount width, extended L2, lazy refcounts;
- v2 images: the header is 72 bytes and the extensions start at 72 (no v3 field is read from
  the extension bytes);
- the header-rewrite rule (QCOW2-NOTES 1.8 rule 4f): serialize_header_area of an unmodified
  header equals the original bytes of cluster 0 up to the end of the backing name, byte for byte,
  also with unknown extensions, unknown v3 header fields and header_length 104; with_backing
  gives what `qemu-img rebase -u` writes;
- hostile headers are refused with CorruptImage/UnsupportedImage (errno EIO), never parsed.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfsnap.errors import CorruptImage, UnsupportedImage, VfsnapError
from vfsnap.format.header import (
    EXT_BACKING_FORMAT,
    EXT_FEATURE_TABLE,
    parse_header,
    read_header,
    serialize_header_area,
    with_backing,
)
from tests.qemu import create, header_area_end, info, insert_extension, qemu_img, qemu_io, rewrite_v3_header_length

KiB = 1 << 10
MiB = 1 << 20


def _header(path: Path):
    with open(path, "rb") as f:
        return read_header(f.fileno(), os.path.getsize(path), name=path.name)


def _cluster0(path: Path, cluster_size: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(cluster_size)


# -- fields agree with qemu-img info -----------------------------------------------------------

IMAGES = {
    # id: (create options, backing (name, format) or None, size)
    "default": (None, None, 1 * MiB),
    "v2": ("compat=0.10", None, 3 * MiB),
    "v2-over-qcow2": ("compat=0.10", ("base.qcow2", "qcow2"), 2 * MiB),
    "v2-over-raw": ("compat=0.10", ("base.raw", "raw"), 2 * MiB),
    "v3-over-qcow2": (None, ("base.qcow2", "qcow2"), 4 * MiB),
    "v3-over-raw": (None, ("base.raw", "raw"), 4 * MiB),
    "cluster512": ("cluster_size=512", ("base.raw", "raw"), 1000),
    "cluster2m": ("cluster_size=2M", None, 10 * MiB + 512),
    "zstd": ("compression_type=zstd", ("base.qcow2", "qcow2"), 4 * MiB),
    "extended-l2": ("extended_l2=on,cluster_size=128k", ("base.raw", "raw"), 8 * MiB),
    "lazy": ("lazy_refcounts=on", None, 1 * MiB),
    "refcount1": ("refcount_bits=1", None, 1 * MiB),
    "refcount64": ("refcount_bits=64", ("base.qcow2", "qcow2"), 1 * MiB),
    "long-name": (None, ("b" * 200 + ".qcow2", "qcow2"), 1 * MiB),
    "big": (None, None, 3 << 40),
}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    create(tmp_path / "base.raw", 4 * MiB, fmt="raw")
    create(tmp_path / "base.qcow2", 4 * MiB)
    create(tmp_path / ("b" * 200 + ".qcow2"), 1 * MiB)
    return tmp_path


def _make(images: Path, image_id: str) -> Path:
    options, backing, size = IMAGES[image_id]
    path = images / f"img-{image_id}"
    create(path, size, options=options, backing=backing[0] if backing else None,
           backing_fmt=backing[1] if backing else None)
    return path


@pytest.mark.parametrize("image_id", sorted(IMAGES))
def test_fields_match_qemu_img_info(image_id, images):
    path = _make(images, image_id)
    doc = info(path)
    data = doc["format-specific"]["data"]
    h = _header(path)
    assert h.cluster_size == doc["cluster-size"]
    assert h.size == doc["virtual-size"]
    assert h.version == {"0.10": 2, "1.1": 3}[data["compat"]]
    assert h.backing_file == doc.get("backing-filename")
    assert h.backing_format == doc.get("backing-filename-format")
    assert h.refcount_bits == data["refcount-bits"]
    assert h.extended_l2 == data.get("extended-l2", False)
    assert bool(h.compatible_features & 1) == data.get("lazy-refcounts", False)
    if h.version == 3:
        assert {0: "zlib", 1: "zstd"}[h.compression_type] == data["compression-type"]
        assert h.header_length == 112
    else:
        assert h.header_length == 72
        assert (h.incompatible_features, h.compatible_features, h.autoclear_features) == (0, 0, 0)
        assert h.refcount_order == 4
    # parse_header on the bytes of cluster 0 alone gives the same record.
    assert parse_header(_cluster0(path, h.cluster_size), os.path.getsize(path), name=path.name) == h


def test_v2_extensions_start_at_72(images):
    """A v2 overlay over a qcow2 file: the backing-format extension sits at byte 72, where a v3
    reader would find incompatible_features. Its bytes ("qcow2" = 0x71636f7732...) must not be
    taken for feature bits (e.g. bit 2, external data file)."""
    path = _make(images, "v2-over-qcow2")
    raw = _cluster0(path, 65536)
    assert struct.unpack_from(">I", raw, 72)[0] == EXT_BACKING_FORMAT  # the layout QEMU wrote
    h = _header(path)
    assert h.version == 2 and h.header_length == 72
    assert [e.type for e in h.extensions] == [EXT_BACKING_FORMAT]
    assert h.extensions[0].data == b"qcow2"
    assert h.backing_format == "qcow2"
    assert h.incompatible_features == 0 and not h.extended_l2 and h.compression_type == 0
    assert h.backing_file_offset == 96 and h.backing_file == "base.qcow2"


def test_v3_extension_order_as_qemu_writes_it(images):
    h = _header(_make(images, "v3-over-raw"))
    assert [e.type for e in h.extensions] == [EXT_BACKING_FORMAT, EXT_FEATURE_TABLE]
    assert h.backing_file_offset == 528  # QCOW2-NOTES 1.2 [obs]
    assert len(h.extension(EXT_FEATURE_TABLE).data) % 48 == 0


# -- the header-rewrite rule: byte exact -------------------------------------------------------


@pytest.mark.parametrize("image_id", sorted(IMAGES))
def test_serialize_unmodified_header_is_byte_exact(image_id, images):
    path = _make(images, image_id)
    h = _header(path)
    original = _cluster0(path, h.cluster_size)
    end = header_area_end(original, h.version)
    assert serialize_header_area(h, h.cluster_size) == original[:end]


@pytest.mark.parametrize("image_id", ["default", "v2-over-qcow2", "v3-over-raw", "zstd"])
def test_unknown_extensions_are_kept_byte_exact(image_id, images):
    path = _make(images, image_id)
    insert_extension(path, 0x12345678, b"hello")  # 5 bytes: padded to 8
    insert_extension(path, 0x0BADF00D, bytes(range(24)))
    before = info(path)  # QEMU still opens it (unknown extensions are skipped)
    h = _header(path)
    assert h.extension(0x12345678).data == b"hello"
    assert h.extension(0x0BADF00D).data == bytes(range(24))
    assert h.backing_file == before.get("backing-filename")
    original = _cluster0(path, h.cluster_size)
    assert serialize_header_area(h, h.cluster_size) == original[:header_area_end(original, h.version)]
    # A rebase keeps them too, and QEMU reads the result.
    rebased = with_backing(h, "base.qcow2", "qcow2")
    area = serialize_header_area(rebased, h.cluster_size)
    with open(path, "r+b") as f:
        f.write(area + b"\0" * (h.cluster_size - len(area)))
    after = info(path)
    assert after["backing-filename"] == "base.qcow2"
    assert after["backing-filename-format"] == "qcow2"
    assert _header(path).extension(0x12345678).data == b"hello"


@pytest.mark.parametrize("new_length,extra", [(104, b""), (120, bytes(range(1, 9))), (136, b"\xee" * 24)],
                         ids=["104", "120", "136"])
def test_other_v3_header_lengths_round_trip(new_length, extra, images):
    path = _make(images, "v3-over-raw")
    rewrite_v3_header_length(path, new_length, extra)
    doc = info(path)  # the oracle accepts the image
    assert doc["backing-filename"] == "base.raw"
    h = _header(path)
    assert h.header_length == new_length
    assert h.unknown_fields == extra
    assert h.compression_type == 0
    assert h.backing_file == "base.raw" and h.backing_format == "raw"
    original = _cluster0(path, h.cluster_size)
    assert serialize_header_area(h, h.cluster_size) == original[:header_area_end(original, 3)]


@pytest.mark.parametrize("image_id", ["v3-over-raw", "v3-over-qcow2", "v2-over-qcow2", "default", "v2"])
@pytest.mark.parametrize("target", [("other.qcow2", "qcow2"), ("vol", "raw"), ("x" * 300, "qcow2")],
                         ids=["qcow2", "raw", "long"])
def test_with_backing_equals_qemu_rebase(image_id, target, images, tmp_path):
    """with_backing + serialize gives the bytes `qemu-img rebase -u -b NAME -F FMT` writes."""
    path = _make(images, image_id)
    reference = tmp_path / "reference"
    shutil.copyfile(path, reference)
    qemu_img("rebase", "-u", "-b", target[0], "-F", target[1], str(reference))
    h = _header(path)
    area = serialize_header_area(with_backing(h, *target), h.cluster_size)
    want = _cluster0(reference, h.cluster_size)
    assert area == want[:len(area)]
    assert not any(want[len(area):]), "QEMU wrote nothing else into cluster 0"


def test_with_backing_none_removes_the_backing_file(images, tmp_path):
    path = _make(images, "v3-over-qcow2")
    h = _header(path)
    area = serialize_header_area(with_backing(h, None, None), h.cluster_size)
    assert struct.unpack_from(">QI", area, 8) == (0, 0)
    with open(path, "r+b") as f:
        f.write(area + b"\0" * (h.cluster_size - len(area)))
    doc = info(path)
    assert "backing-filename" not in doc
    assert _header(path).backing_format is None
    qemu_io(path, "read 0 64k")  # still a usable image


def test_rewritten_header_passes_qemu_check(images):
    path = _make(images, "refcount64")
    qemu_io(path, "write -P 7 0 100k")
    h = _header(path)
    area = serialize_header_area(with_backing(h, "base.raw", "raw"), h.cluster_size)
    with open(path, "r+b") as f:
        f.write(area + b"\0" * (h.cluster_size - len(area)))
    doc = info(path)
    assert (doc["backing-filename"], doc["backing-filename-format"]) == ("base.raw", "raw")
    result = qemu_img("check", str(path), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# -- hostile headers are refused ---------------------------------------------------------------


def _patched(images: Path, image_id: str, patches: list[tuple[int, str, int]]) -> Path:
    path = _make(images, image_id)
    with open(path, "r+b") as f:
        for offset, fmt, value in patches:
            f.seek(offset)
            f.write(struct.pack(fmt, value))
    return path


BAD_HEADERS = {
    # id: (image, [(offset, struct format, value)], exception class)
    "magic": ("default", [(0, ">I", 0x514649FA)], CorruptImage),
    "version1": ("default", [(4, ">I", 1)], UnsupportedImage),
    "version4": ("default", [(4, ">I", 4)], UnsupportedImage),
    "cluster-bits-8": ("default", [(20, ">I", 8)], CorruptImage),
    "cluster-bits-22": ("default", [(20, ">I", 22)], CorruptImage),
    "cluster-bits-huge": ("default", [(20, ">I", 63)], CorruptImage),
    "refcount-order-7": ("default", [(96, ">I", 7)], CorruptImage),
    "header-length-100": ("default", [(100, ">I", 100)], CorruptImage),
    "header-length-unaligned": ("default", [(100, ">I", 108)], CorruptImage),
    "header-length-beyond-cluster": ("cluster512", [(100, ">I", 1024)], CorruptImage),
    "incompat-bit-5": ("default", [(72, ">Q", 1 << 5)], UnsupportedImage),
    "incompat-bit-63": ("default", [(72, ">Q", 1 << 63)], UnsupportedImage),
    "data-file-bit": ("default", [(72, ">Q", 1 << 2)], UnsupportedImage),
    "extended-l2-small-clusters": ("default", [(72, ">Q", 1 << 4), (20, ">I", 12)], CorruptImage),
    "compression-bit-without-type": ("default", [(72, ">Q", 1 << 3)], CorruptImage),
    "compression-type-2": ("zstd", [(104, ">B", 2)], UnsupportedImage),
    "crypt-aes": ("default", [(32, ">I", 1)], UnsupportedImage),
    "crypt-luks": ("default", [(32, ">I", 2)], UnsupportedImage),
    "l1-size-absurd": ("default", [(36, ">I", 0xFFFFFFFF)], CorruptImage),
    "l1-too-small": ("big", [(36, ">I", 1)], CorruptImage),
    "l1-beyond-eof": ("default", [(40, ">Q", 1 << 40)], CorruptImage),
    "l1-unaligned": ("default", [(40, ">Q", 0x30008)], CorruptImage),
    "refcount-table-beyond-eof": ("default", [(48, ">Q", 1 << 40)], CorruptImage),
    "refcount-table-huge": ("default", [(56, ">I", 0xFFFFFF)], CorruptImage),
    "backing-name-too-long": ("v3-over-raw", [(16, ">I", 1024)], CorruptImage),
    "backing-name-outside-cluster": ("v3-over-raw", [(8, ">Q", 65530)], CorruptImage),
    "backing-name-in-header": ("v3-over-raw", [(8, ">Q", 16)], CorruptImage),
    "virtual-size-absurd": ("default", [(24, ">Q", 1 << 63)], CorruptImage),
}


# Headers QEMU's `info` still opens: valid images using features vfsnap refuses (encryption), or
# tables QEMU only checks when it uses them, which vfsnap validates up front.
QEMU_OPENS = {"crypt-aes", "data-file-bit", "l1-beyond-eof", "refcount-table-beyond-eof", "backing-name-in-header"}
# qemu-img 7.2 `info` dies of SIGSEGV on a LUKS crypt_method without a LUKS header: no oracle.
NO_ORACLE = {"crypt-luks"}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_hostile_header_is_refused(case, images):
    image_id, patches, exc_type = BAD_HEADERS[case]
    path = _patched(images, image_id, patches)
    # The oracle refuses it too (or, for refusals that are vfsnap's policy, we at least know why).
    qemu = qemu_img("info", "-f", "qcow2", "--output=json", str(path), check=False)
    with pytest.raises(VfsnapError) as exc:
        _header(path)
    assert isinstance(exc.value, exc_type), exc.value
    assert exc.value.errno == errno.EIO
    assert path.name in str(exc.value)
    if case in QEMU_OPENS:
        assert qemu.returncode == 0, qemu.stderr
    elif case not in NO_ORACLE:
        assert qemu.returncode != 0, f"qemu-img accepts {case}: the test image is not malformed"


def test_truncated_files_are_refused(images, tmp_path):
    path = _make(images, "default")
    data = path.read_bytes()
    for length in (0, 4, 71, 100):
        with pytest.raises(CorruptImage):
            parse_header(data[:length], length, name="short")


# -- the used part of a refcount table (opening an image reads only up to its last entry) ------


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3 * 4096 + 100), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)), max_size=3))
def test_used_entries_bytes_is_the_table_up_to_its_last_entry(length, nonzero):
    """`used_entries_bytes` (zero runs skipped by comparison) agrees with stripping every trailing
    zero byte, rounded up to whole 8-byte entries, wherever the last non-zero byte falls."""
    from vfsnap.format.tables import used_entries_bytes

    raw = bytearray(length)
    for position, value in nonzero:
        if length:
            raw[position % length] = value
    raw = bytes(raw)
    assert used_entries_bytes(raw) == -(-len(raw.rstrip(b"\0")) // 8) * 8
