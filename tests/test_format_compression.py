"""Unit tests of vfsnap.format.compression.decompress_cluster (no mount).

QCOW2-NOTES 1.3: raw deflate (window bits -12) whose input length is only known to the sector,
so trailing bytes are normal; zstd data that starts with the frame magic, possibly as several
frames, possibly followed by trailing bytes. Output is exactly one cluster: a stream that
decodes to less is corrupt, one that decodes to more is cut at the cluster (as QEMU does), and
garbage is CorruptImage, never an exception of another type.

The last tests decode every compressed cluster of images made by `qemu-img convert -c`, found
through the L1/L2 tables with struct (independently of vfsnap's reader), against the source.
"""

from __future__ import annotations

import os
import random
import zlib

import pytest

from vfsnap.errors import CorruptImage, VfsnapError
from vfsnap.format.compression import decompress_cluster, zstd_available
from vfsnap.format.header import COMPRESSION_DEFLATE, COMPRESSION_ZSTD
from tests.qemu import create, l2_entry_offset, qcow2_header, qemu_img, read_u64

try:
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:
    from backports import zstd  # type: ignore[no-redef]

CLUSTER = 65536


def _data(seed: int, size: int = CLUSTER) -> bytes:
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(32) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * 96
    return bytes(out[:size])


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


def _sector_padded(blob: bytes, filler: bytes = b"\0") -> bytes:
    return blob + (filler * 512)[: -len(blob) % 512]


# -- deflate -----------------------------------------------------------------------------------


def test_deflate_exact():
    data = _data(1)
    assert decompress_cluster(_deflate(data), CLUSTER, COMPRESSION_DEFLATE, where="t") == data


@pytest.mark.parametrize("filler", [b"\0", b"\xff", b"garbage!"])
def test_deflate_with_trailing_bytes(filler):
    """The descriptor counts whole sectors: what follows the stream is the next cluster's data."""
    data = _data(2)
    blob = _sector_padded(_deflate(data), filler) + filler * 100
    assert decompress_cluster(blob, CLUSTER, COMPRESSION_DEFLATE, where="t") == data


def test_deflate_stream_longer_than_a_cluster_is_cut():
    data = _data(3, 4 * CLUSTER)
    assert decompress_cluster(_deflate(data), CLUSTER, COMPRESSION_DEFLATE, where="t") == data[:CLUSTER]


def test_deflate_zip_bomb_stays_bounded():
    blob = _deflate(bytes(256 * CLUSTER))
    assert decompress_cluster(blob, CLUSTER, COMPRESSION_DEFLATE, where="t") == bytes(CLUSTER)


@pytest.mark.parametrize("blob", [
    b"",
    b"\xff" * 600,
    os.urandom(1000),
    _deflate(_data(4))[:100],  # truncated: decodes to less than a cluster
    _deflate(_data(5, CLUSTER // 2)),  # a whole stream, but only half a cluster
    zlib.compress(_data(6)),  # zlib header: not raw deflate
], ids=["empty", "ff", "random", "truncated", "short", "zlib-header"])
def test_deflate_garbage_is_corrupt(blob):
    with pytest.raises(CorruptImage) as exc:
        decompress_cluster(blob, CLUSTER, COMPRESSION_DEFLATE, where="img: cluster 7")
    assert "img: cluster 7" in str(exc.value)


# -- zstd --------------------------------------------------------------------------------------


def test_vfsnap_finds_a_zstd_module():
    """zstd is a dependency (pyproject.toml: backports.zstd before Python 3.14), never optional."""
    assert zstd_available(), "vfsnap found no zstd module: `pip install -e .` installs backports.zstd"


def test_zstd_single_frame_with_sector_padding():
    data = _data(7)
    frame = zstd.compress(data)
    assert frame[:4] == b"\x28\xb5\x2f\xfd"
    assert decompress_cluster(_sector_padded(frame), CLUSTER, COMPRESSION_ZSTD, where="t") == data


@pytest.mark.parametrize("parts", [2, 3, 16])
def test_zstd_several_frames(parts):
    """QEMU's decoder streams, so a cluster may be several frames (QCOW2-NOTES 1.3)."""
    data = _data(8)
    step = -(-CLUSTER // parts)
    blob = b"".join(zstd.compress(data[i:i + step]) for i in range(0, CLUSTER, step))
    assert decompress_cluster(blob, CLUSTER, COMPRESSION_ZSTD, where="t") == data
    assert decompress_cluster(blob + b"\0" * 300, CLUSTER, COMPRESSION_ZSTD, where="t") == data


def test_zstd_frame_longer_than_a_cluster_is_cut():
    data = _data(9, 3 * CLUSTER)
    assert decompress_cluster(zstd.compress(data), CLUSTER, COMPRESSION_ZSTD, where="t") == data[:CLUSTER]


def test_zstd_bomb_stays_bounded():
    blob = zstd.compress(bytes(1024 * CLUSTER))
    assert decompress_cluster(blob, CLUSTER, COMPRESSION_ZSTD, where="t") == bytes(CLUSTER)


@pytest.mark.parametrize("blob", [
    b"",
    os.urandom(700),
    b"\x28\xb5\x2f\xfd" + os.urandom(200),
    zstd.compress(_data(10))[:50],
    zstd.compress(_data(11, CLUSTER // 2)),
    zstd.compress(_data(11, CLUSTER // 2)) + os.urandom(64),
], ids=["empty", "random", "magic-then-garbage", "truncated", "short", "short-then-garbage"])
def test_zstd_garbage_is_corrupt(blob):
    with pytest.raises(CorruptImage):
        decompress_cluster(blob, CLUSTER, COMPRESSION_ZSTD, where="t")


def test_unknown_compression_type_is_refused():
    with pytest.raises(VfsnapError):
        decompress_cluster(_deflate(_data(12)), CLUSTER, 2, where="t")


# -- every compressed cluster of real images ---------------------------------------------------


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
@pytest.mark.parametrize("cluster", [512, 4096, 65536, 2 << 20])
def test_every_compressed_cluster_of_a_qemu_image(compression, cluster, tmp_path):
    size = max(64 * cluster, 1 << 20) if cluster < (2 << 20) else 8 << 20
    src = tmp_path / "src.raw"
    create(src, size, fmt="raw")
    rng = random.Random(cluster)
    blob = b"".join(_data(rng.randrange(1 << 30), 4096) if rng.random() < 0.8 else os.urandom(4096)
                    for _ in range(size // 4096))
    src.write_bytes(blob)
    img = tmp_path / "c.qcow2"
    options = f"cluster_size={cluster}" + (",compression_type=zstd" if compression == "zstd" else "")
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, str(src), str(img))
    h = qcow2_header(img)
    cb = h["cluster_bits"]
    offset_bits = 62 - (cb - 8)
    ctype = COMPRESSION_ZSTD if compression == "zstd" else COMPRESSION_DEFLATE
    seen = 0
    with open(img, "rb") as f:
        for guest in range(0, size, cluster):
            entry = read_u64(img, l2_entry_offset(img, guest))
            if not entry & (1 << 62):
                continue
            host = entry & ((1 << offset_bits) - 1)
            sectors = ((entry >> offset_bits) & ((1 << (cb - 8)) - 1)) + 1
            f.seek(host)
            raw = f.read(sectors * 512 - (host & 511))
            assert decompress_cluster(raw, cluster, ctype, where="t") == blob[guest:guest + cluster], hex(guest)
            seen += 1
    assert seen > size // cluster // 4, "the setup should have compressed most clusters"
