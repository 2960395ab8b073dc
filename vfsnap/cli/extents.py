"""`vfsnap map FILE` and `vfsnap diff [--from-snap SNAP] FILE`: allocation and changed extents of a
volume or snapshot file, asked of the running daemon page by page (vfsnap.fs.extents,
docs/backup.md).

    vfsnap map [--output=human|json] FILE
    vfsnap diff [--from-snap SNAP] [--output=human|json] FILE

The JSON forms are those of `qemu-img map --output=json` and `rbd diff --format json`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os

from vfsnap.cli.main import EXIT_OK, QuietError
from vfsnap.fs.extents import DIFF_PREFIX, MAP_PREFIX, XATTR_SIZE_MAX
# A page answer names the chain it was computed on; when it changes (snapshot taken, merge
# done) the listing starts again, at most this many times.
MAX_RESTARTS = 8


def add_parsers(sub) -> None:
    mapping = sub.add_parser("map", help="allocation map of a volume or snapshot (qemu-img map form)")
    mapping.add_argument("--output", choices=("human", "json"), default="human")
    mapping.add_argument("file", help="MNT/volumes/VOL or MNT/snapshots/VOL/SNAP/VOL")
    diff = sub.add_parser("diff", help="extents that may differ since a snapshot (rbd diff form)")
    diff.add_argument("--from-snap", metavar="SNAP", help="a snapshot of the same volume, older than FILE "
                      "(its name, or its directory or file in the mount)")
    diff.add_argument("--output", choices=("human", "json"), default="human")
    diff.add_argument("file", help="MNT/volumes/VOL or MNT/snapshots/VOL/SNAP/VOL")


def run(args) -> int:
    if args.command == "map":
        entries = list_map(args.file)
        print(_map_json(entries) if args.output == "json" else _map_table(entries))
    else:
        extents = list_diff(args.file, args.from_snap)
        print(_diff_json(extents) if args.output == "json" else _diff_table(extents))
    return EXIT_OK


# -- asking the daemon ------------------------------------------------------------------------


def list_map(path: str) -> list[dict]:
    """Every entry of FILE's map, adjacent entries with equal flags merged."""
    _, rows = _fetch(path, lambda start: f"{MAP_PREFIX}{start}")
    entries: list[dict] = []
    for start, length, depth, present, zero, data in rows:
        entry = {"start": start, "length": length, "depth": depth, "present": bool(present),
                 "zero": bool(zero), "data": bool(data)}
        last = entries[-1] if entries else None
        if last and last["start"] + last["length"] == start and all(last[k] == entry[k] for k in
                                                                      ("depth", "present", "zero", "data")):
            last["length"] += length
        else:
            entries.append(entry)
    return entries


def list_diff(path: str, from_snap: str | None) -> list[dict]:
    """Every extent of FILE that may differ from snapshot `from_snap` (all data without it)."""
    expected_volume = None
    snapshot = from_snap
    if from_snap is not None and "/" in from_snap:
        expected_volume, snapshot = _snapshot_of_path(from_snap)
        _check_same_volume(expected_volume, snapshot, _volume_of_path(path))

    def request(start: int) -> str:
        return f"{DIFF_PREFIX}{start}" + (f".{snapshot}" if snapshot is not None else "")

    volume, rows = _fetch(path, request)
    _check_same_volume(expected_volume, snapshot, volume)
    extents: list[dict] = []
    for offset, length, exists in rows:
        last = extents[-1] if extents else None
        if last and last["offset"] + last["length"] == offset and last["exists"] == bool(exists):
            last["length"] += length
        else:
            extents.append({"offset": offset, "length": length, "exists": bool(exists)})
    return extents


def _fetch(path: str, request) -> tuple[str, list[list]]:
    """All pages of one request, from a single chain of the view; (volume name, rows)."""
    for _ in range(MAX_RESTARTS):
        rows: list[list] = []
        start, generation, volume = 0, None, ""
        while True:
            page = _page(path, request(start))
            if generation is not None and page["generation"] != generation:
                break  # the chain changed between two pages: start again
            generation, volume = page["generation"], page["volume"]
            rows += page["entries"]
            if page["next"] >= page["size"]:
                return volume, rows
            if page["next"] <= start:
                raise QuietError(f"{path}: the daemon answered a page that does not advance (at {start})")
            start = page["next"]
    raise QuietError(f"{path}: the volume's chain kept changing; try again")


def _page(path: str, name: str) -> dict:
    try:
        raw = _getxattr(path, name)
    except FileNotFoundError:
        raise QuietError(f"{path}: no such file") from None
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise QuietError(f"{path} is not a volume or snapshot file of a vfsnap mount") from None
        raise QuietError(f"{path}: {exc.strerror}") from None
    page = json.loads(raw)
    if "error" in page:
        raise QuietError(page["error"])
    return page


def _load_getxattr():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        function = libc.getxattr
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    function.restype = ctypes.c_ssize_t
    return function


_libc_getxattr = _load_getxattr()


def _getxattr(path: str, name: str) -> bytes:
    """getxattr with a 64 KiB buffer at once: `os.getxattr` first tries 128 bytes, and each try
    makes the daemon compute the page."""
    if _libc_getxattr is None:
        return os.getxattr(path, name)
    buffer = ctypes.create_string_buffer(XATTR_SIZE_MAX)
    size = _libc_getxattr(os.fsencode(path), name.encode(), buffer, XATTR_SIZE_MAX)
    if size < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return buffer.raw[:size]


def _check_same_volume(snapshot_volume: str | None, snapshot: str, volume: str | None) -> None:
    if snapshot_volume is not None and volume is not None and snapshot_volume != volume:
        raise QuietError(f"snapshot {snapshot} is a snapshot of volume {snapshot_volume}, not of {volume}")


def _volume_of_path(path: str) -> str | None:
    """VOL of MNT/volumes/VOL or MNT/snapshots/VOL/SNAP/VOL; None for other paths (the daemon's
    answer names the volume then)."""
    parts = os.path.realpath(path).split("/")
    if len(parts) >= 2 and parts[-2] == "volumes":
        return parts[-1]
    if len(parts) >= 4 and parts[-4] == "snapshots" and parts[-3] == parts[-1]:
        return parts[-1]
    return None


def _snapshot_of_path(path: str) -> tuple[str, str]:
    """(volume, snapshot) of MNT/snapshots/VOL/SNAP or MNT/snapshots/VOL/SNAP/VOL (or `latest`)."""
    real = os.path.realpath(path)
    parts = real.rstrip("/").split("/")
    if os.path.isfile(real) and len(parts) >= 4 and parts[-4] == "snapshots" and parts[-1] == parts[-3]:
        return parts[-3], parts[-2]
    if len(parts) >= 3 and parts[-3] == "snapshots":
        return parts[-2], parts[-1]
    raise QuietError(f"{path} is not a snapshot (MNT/snapshots/VOL/SNAP or its file)")


# -- output -----------------------------------------------------------------------------------


def _map_json(entries: list[dict]) -> str:
    # One entry a line, as `qemu-img map --output=json` prints them.
    return "[" + ",\n".join(json.dumps(entry) for entry in entries) + "]"


def _map_table(entries: list[dict]) -> str:
    lines = [f"{'Offset':<19} {'Length':<19} {'Depth':>5}  Type"]
    for e in entries:
        kind = "data" if e["data"] else "zero" if e["present"] else "zero (unallocated)"
        lines.append(f"{e['start']:<#19x} {e['length']:<#19x} {e['depth']:>5}  {kind}")
    return "\n".join(lines)


def _diff_json(extents: list[dict]) -> str:
    # `rbd diff --format json` writes `exists` as the strings "true" and "false".
    return json.dumps([{"offset": e["offset"], "length": e["length"], "exists": "true" if e["exists"] else "false"}
                       for e in extents], separators=(",", ":"))


def _diff_table(extents: list[dict]) -> str:
    lines = [f"{'Offset':<19} {'Length':<19} Type"]
    lines += [f"{e['offset']:<19} {e['length']:<19} {'data' if e['exists'] else 'zero'}" for e in extents]
    return "\n".join(lines)

