"""The qcow2 header: parsing, validation and byte-exact rewriting of cluster 0.

Implements docs/interop/qcow2.rst "Header" and "Header extensions" (QEMU 7.2). Every field is
validated before any table it names is used, so a hostile header is refused with `CorruptImage`
or `UnsupportedImage` instead of making the reader allocate or seek absurdly.
"""

from __future__ import annotations

import struct

import attrs

from vfsnap.errors import CorruptImage, UnsupportedImage

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21  # QEMU refuses 2^22 ("Unsupported cluster size")
MAX_L1_BYTES = 32 * 1024 * 1024  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_BACKING_NAME = 1023
MAX_REFCOUNT_ORDER = 6

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
KNOWN_INCOMPAT = (1 << 5) - 1

# Compatible and autoclear bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

COMPRESSION_DEFLATE = 0
COMPRESSION_ZSTD = 1

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

_FIXED = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72 bytes common to v2 and v3
_V3 = struct.Struct(">QQQII")  # bytes 72..103
_EXT = struct.Struct(">II")


@attrs.frozen
class HeaderExtension:
    """One header extension, kept byte-exact so a rewrite preserves what we don't know."""

    type: int
    data: bytes


@attrs.frozen
class Qcow2Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_DEFLATE
    # v3 header bytes past the fields we know (112..header_length), kept for rewrites.
    unknown_fields: bytes = b""
    extensions: tuple[HeaderExtension, ...] = ()
    backing_file: str | None = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_bytes(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_bits(self) -> int:
        """log2 of the number of entries in one L2 table."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def backing_format(self) -> str | None:
        ext = self.extension(EXT_BACKING_FORMAT)
        if ext is None:
            return None
        return ext.data.split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def marked_corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    def extension(self, ext_type: int) -> HeaderExtension | None:
        for ext in self.extensions:
            if ext.type == ext_type:
                return ext
        return None

    def l1_entries_needed(self, size: int | None = None) -> int:
        """L1 entries needed to map `size` bytes (default: the virtual size)."""
        size = self.size if size is None else size
        bytes_per_l1_entry = 1 << (self.cluster_bits + self.l2_bits)
        return -(-size // bytes_per_l1_entry)


def read_header(fd: int, file_size: int, *, name: str) -> Qcow2Header:
    """Read and validate the header of the qcow2 image open on `fd`."""
    first = _pread_exact(fd, min(file_size, 1 << MAX_CLUSTER_BITS), 0)
    return parse_header(first, file_size, name=name)


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    import os

    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def parse_header(cluster0: bytes, file_size: int, *, name: str) -> Qcow2Header:
    """Parse the header from the bytes of cluster 0 (or the first 2 MiB of the file)."""

    def corrupt(why: str) -> CorruptImage:
        return CorruptImage(f"{name}: invalid qcow2 header: {why}")

    if len(cluster0) < V2_HEADER_LENGTH:
        raise corrupt(f"file is only {len(cluster0)} bytes")
    (
        magic,
        version,
        backing_file_offset,
        backing_file_size,
        cluster_bits,
        size,
        crypt_method,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
    ) = _FIXED.unpack_from(cluster0, 0)
    if magic != MAGIC:
        raise corrupt("bad magic")
    if version not in (2, 3):
        raise UnsupportedImage(f"{name}: unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise corrupt(f"unsupported cluster size 2^{cluster_bits}")
    cluster_size = 1 << cluster_bits

    fields: dict = {}
    if version == 3:
        if len(cluster0) < V3_MIN_HEADER_LENGTH:
            raise corrupt("v3 header truncated")
        incompat, compat, autoclear, refcount_order, header_length = _V3.unpack_from(cluster0, 72)
        if header_length < V3_MIN_HEADER_LENGTH or header_length % 8:
            raise corrupt(f"header_length {header_length}")
        if header_length > cluster_size or header_length > len(cluster0):
            raise corrupt(f"header_length {header_length} exceeds cluster 0")
        if refcount_order > MAX_REFCOUNT_ORDER:
            raise corrupt(f"refcount_order {refcount_order}")
        compression_type = cluster0[104] if header_length > 104 else COMPRESSION_DEFLATE
        unknown_fields = bytes(cluster0[112:header_length]) if header_length > 112 else b""
        if incompat & ~KNOWN_INCOMPAT:
            raise UnsupportedImage(
                f"{name}: unknown incompatible qcow2 features {incompat & ~KNOWN_INCOMPAT:#x}"
            )
        if incompat & INCOMPAT_DATA_FILE:
            raise UnsupportedImage(f"{name}: external data file is not supported")
        if incompat & INCOMPAT_EXTL2 and cluster_bits < 14:
            raise corrupt("extended L2 entries need clusters of at least 16 KiB")
        if bool(incompat & INCOMPAT_COMPRESSION) != (compression_type != COMPRESSION_DEFLATE):
            raise corrupt("compression type field and feature bit disagree")
        if compression_type not in (COMPRESSION_DEFLATE, COMPRESSION_ZSTD):
            raise UnsupportedImage(f"{name}: unknown compression type {compression_type}")
        fields = dict(
            incompatible_features=incompat,
            compatible_features=compat,
            autoclear_features=autoclear,
            refcount_order=refcount_order,
            header_length=header_length,
            compression_type=compression_type,
            unknown_fields=unknown_fields,
        )
    header_length = fields.get("header_length", V2_HEADER_LENGTH)

    if crypt_method != 0:
        raise UnsupportedImage(f"{name}: encrypted images are not supported (method {crypt_method})")

    # Backing file name: inside cluster 0, not NUL-terminated.
    backing_file = None
    if backing_file_offset:
        if backing_file_size == 0 or backing_file_size > MAX_BACKING_NAME:
            raise corrupt(f"backing file name length {backing_file_size}")
        end = backing_file_offset + backing_file_size
        if backing_file_offset < header_length or end > cluster_size or end > len(cluster0):
            raise corrupt("backing file name outside cluster 0")
        raw_name = bytes(cluster0[backing_file_offset:end])
        try:
            backing_file = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise corrupt("backing file name is not UTF-8") from None

    extensions = _parse_extensions(
        cluster0,
        header_length,
        backing_file_offset if backing_file_offset else min(cluster_size, len(cluster0)),
        corrupt,
    )

    header = Qcow2Header(
        version=version,
        backing_file_offset=backing_file_offset,
        backing_file_size=backing_file_size if backing_file_offset else 0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=crypt_method,
        l1_size=l1_size,
        l1_table_offset=l1_table_offset,
        refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters,
        nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
        extensions=extensions,
        backing_file=backing_file,
        **fields,
    )
    if header.extension(EXT_CRYPTO) is not None:
        raise UnsupportedImage(f"{name}: encryption header present; encrypted images are not supported")
    _validate_tables(header, file_size, corrupt)
    return header


def _parse_extensions(buf: bytes, start: int, end: int, corrupt) -> tuple[HeaderExtension, ...]:
    extensions = []
    seen = set()
    offset = start
    while offset + _EXT.size <= end:
        ext_type, length = _EXT.unpack_from(buf, offset)
        offset += _EXT.size
        if ext_type == EXT_END:
            break
        if offset + length > end:
            raise corrupt(f"header extension {ext_type:#x} overruns the header area")
        if ext_type in seen:
            raise corrupt(f"header extension {ext_type:#x} appears twice")
        seen.add(ext_type)
        extensions.append(HeaderExtension(ext_type, bytes(buf[offset : offset + length])))
        offset += (length + 7) & ~7
    return tuple(extensions)


def _validate_tables(header: Qcow2Header, file_size: int, corrupt) -> None:
    cluster_size = header.cluster_size
    if header.size > (1 << 62):
        raise corrupt(f"virtual size {header.size} is absurd")
    if header.l1_size * 8 > MAX_L1_BYTES:
        raise corrupt(f"L1 table of {header.l1_size} entries is too large")
    if header.l1_size < header.l1_entries_needed():
        raise corrupt(f"L1 table of {header.l1_size} entries is too small for {header.size} bytes")
    if header.l1_size:
        _check_table(header.l1_table_offset, header.l1_size * 8, cluster_size, file_size, "L1", corrupt)
    rt_bytes = header.refcount_table_clusters * cluster_size
    if rt_bytes > MAX_REFCOUNT_TABLE_BYTES:
        raise corrupt("refcount table is too large")
    if header.refcount_table_clusters:
        _check_table(header.refcount_table_offset, rt_bytes, cluster_size, file_size, "refcount", corrupt)
    if header.nb_snapshots and header.snapshots_offset % cluster_size:
        raise corrupt("snapshot table offset unaligned")


def _check_table(offset: int, length: int, cluster_size: int, file_size: int, what: str, corrupt) -> None:
    if offset == 0 or offset % cluster_size:
        raise corrupt(f"{what} table offset {offset:#x} is not cluster aligned")
    if offset + length > file_size:
        raise corrupt(f"{what} table at {offset:#x} (+{length}) lies beyond the end of the file")


def serialize_header_area(header: Qcow2Header, cluster_size: int) -> bytes:
    """Bytes of cluster 0 from offset 0 to the end of the backing file name.

    Used for every header rewrite (QCOW2-NOTES 1.8 rule 4f): one write to cluster 0 that keeps
    unknown v3 fields and unknown extensions byte-exact. The backing file name goes right after
    the extension area, as QEMU places it.
    """
    out = bytearray(
        _FIXED.pack(
            MAGIC,
            header.version,
            0,  # backing offset, patched below
            0,
            header.cluster_bits,
            header.size,
            header.crypt_method,
            header.l1_size,
            header.l1_table_offset,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            header.nb_snapshots,
            header.snapshots_offset,
        )
    )
    if header.version == 3:
        out += _V3.pack(
            header.incompatible_features,
            header.compatible_features,
            header.autoclear_features,
            header.refcount_order,
            header.header_length,
        )
        if header.header_length > 104:
            out += bytes([header.compression_type]) + b"\0" * 7
            out += header.unknown_fields
        assert len(out) == header.header_length, (len(out), header.header_length)
    for ext in header.extensions:
        out += _EXT.pack(ext.type, len(ext.data)) + ext.data
        out += b"\0" * (-len(ext.data) % 8)
    out += _EXT.pack(EXT_END, 0)
    if header.backing_file is not None:
        name = header.backing_file.encode("utf-8")
        if len(name) > MAX_BACKING_NAME:
            raise CorruptImage(f"backing file name too long: {header.backing_file!r}")
        struct.pack_into(">QI", out, 8, len(out), len(name))
        out += name
    if len(out) > cluster_size:
        raise CorruptImage("header, extensions and backing name do not fit in cluster 0")
    return bytes(out)


def with_backing(header: Qcow2Header, backing_file: str | None, backing_format: str | None) -> Qcow2Header:
    """The same header naming a different backing file and format (a rebase)."""
    extensions = [e for e in header.extensions if e.type != EXT_BACKING_FORMAT]
    if backing_file is not None and backing_format is not None:
        # QEMU writes the backing format extension first.
        extensions.insert(0, HeaderExtension(EXT_BACKING_FORMAT, backing_format.encode()))
    return attrs.evolve(header, backing_file=backing_file, extensions=tuple(extensions))
