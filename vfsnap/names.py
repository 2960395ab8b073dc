"""Names of volumes, snapshots and the files vfsnap keeps beside them (DESIGN.md section 2).

Snapshots: 1-64 bytes of [A-Za-z0-9_-] (no dot, so `<vol>.<snap>` is unambiguous), not
`active` (a key of Cinder's `.info`), `latest` (the symlink) or `info` (its overlay would be the
volume's own `<vol>.info`). Volumes: bytes of
[A-Za-z0-9_.-], not starting with a dot, not ending in a suffix Cinder or vfsnap uses, and short
enough that every file vfsnap derives from the name (`<vol>.info`, `<vol>.vfsnap.json`) fits in
NAME_MAX. `<vol>.<snap>` must fit too; that is checked when the snapshot is taken.
"""

from __future__ import annotations

import functools
import re

from vfsnap.errors import InvalidName, NameTooLong

NAME_MAX = 255
SNAPSHOT_NAME_MAX = 64
RESERVED_SNAPSHOT_NAMES = frozenset({"active", "latest", "info"})

INFO_SUFFIX = ".info"
SIDECAR_SUFFIX = ".vfsnap.json"
# Suffixes a volume name may not end in: Cinder's `.info`, vfsnap's sidecar, and `.vfsnap`
# (volume `x.vfsnap` could otherwise take snapshot `json`, whose file is x's sidecar).
RESERVED_VOLUME_SUFFIXES = (INFO_SUFFIX, SIDECAR_SUFFIX, ".vfsnap")
VOLUME_NAME_MAX = NAME_MAX - len(SIDECAR_SUFFIX)
# Temporary files (atomic rewrites) start with a dot, so they can never be taken for a volume.
TEMP_PREFIX = ".vfsnap-tmp-"

_SNAPSHOT_RE = re.compile(rb"[A-Za-z0-9_-]+")
_VOLUME_RE = re.compile(rb"[A-Za-z0-9_.-]+")
_RESERVED_VOLUME_SUFFIXES = tuple(suffix.encode() for suffix in RESERVED_VOLUME_SUFFIXES)


def _as_bytes(name: str | bytes) -> bytes:
    return name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=1 << 16)  # the share's index asks it of every file at every scan
def is_snapshot_name(name: str | bytes) -> bool:
    try:
        check_snapshot_name(name)
    except (InvalidName, NameTooLong):
        return False
    return True


def check_snapshot_name(name: str | bytes) -> str:
    raw = _as_bytes(name)
    if len(raw) > SNAPSHOT_NAME_MAX:
        raise NameTooLong(f"snapshot name longer than {SNAPSHOT_NAME_MAX} bytes")
    if not raw or not _SNAPSHOT_RE.fullmatch(raw):
        raise InvalidName(f"invalid snapshot name {raw!r}: use 1-{SNAPSHOT_NAME_MAX} of [A-Za-z0-9_-]")
    text = raw.decode()
    if text in RESERVED_SNAPSHOT_NAMES:
        raise InvalidName(f"{text!r} is reserved and cannot name a snapshot")
    return text


@functools.lru_cache(maxsize=1 << 16)
def is_volume_name(name: str | bytes) -> bool:
    """`check_volume_name` without the exception (the share's index asks it of every file)."""
    raw = _as_bytes(name)
    return (0 < len(raw) <= VOLUME_NAME_MAX and _VOLUME_RE.fullmatch(raw) is not None and not raw.startswith(b".")
            and not raw.endswith(_RESERVED_VOLUME_SUFFIXES))


def check_volume_name(name: str | bytes) -> str:
    raw = _as_bytes(name)
    if len(raw) > VOLUME_NAME_MAX:
        raise NameTooLong(f"volume name longer than {VOLUME_NAME_MAX} bytes")
    if not raw or not _VOLUME_RE.fullmatch(raw) or raw.startswith(b"."):
        raise InvalidName(f"invalid volume name {raw!r}: use [A-Za-z0-9_.-], not starting with '.'")
    text = raw.decode()
    for suffix in RESERVED_VOLUME_SUFFIXES:
        if text.endswith(suffix):
            raise InvalidName(f"volume names may not end in {suffix!r}")
    return text


def is_file_of(volume: str, file_name: str) -> bool:
    """Whether `file_name` may be a file of `volume`'s chain: `<vol>` or `<vol>.<snap>` with a
    valid snapshot name (DESIGN.md invariant 5)."""
    if file_name == volume:
        return True
    prefix = volume + "."
    return file_name.startswith(prefix) and is_snapshot_name(file_name[len(prefix) :])


def overlay_file(volume: str, snapshot: str) -> str:
    """The file Cinder's layout gives the overlay created by snapshot `snapshot`."""
    name = f"{volume}.{snapshot}"
    if len(name.encode()) > NAME_MAX:
        raise NameTooLong(f"{name!r} would exceed NAME_MAX")
    return name


def info_file(volume: str) -> str:
    return volume + INFO_SUFFIX


def sidecar_file(volume: str) -> str:
    return volume + SIDECAR_SUFFIX
