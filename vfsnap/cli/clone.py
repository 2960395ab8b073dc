"""`vfsnap clone SOURCE NEWVOL` and `vfsnap revert [--destroy-newer] SNAPSHOT`: requests to the
running mount, through setxattr on its directories (see vfsnap.fs.commands).

The mount decides and refuses on its own; this side finds the mount and the names in the paths
given, and turns a refusal (an errno) into one line that says what to do.
"""

from __future__ import annotations

import errno
import json
import os

from vfsnap.cli.main import CONTROL_FILE, QuietError, read_status

CLONE_XATTR = "user.vfsnap.clone"
REVERT_XATTR = "user.vfsnap.revert"


def locate(path: str) -> tuple[str, list[str]]:
    """The vfsnap mount holding `path`, and the path's components below it."""
    real = os.path.realpath(path)
    here = real
    while True:
        if os.path.ismount(here) and os.path.exists(os.path.join(here, CONTROL_FILE)):
            rel = os.path.relpath(real, here)
            return here, [] if rel == "." else rel.split(os.sep)
        parent = os.path.dirname(here)
        if parent == here:
            raise QuietError(f"{path} is not in a vfsnap mount")
        here = parent


def _snapshot_parts(path: str, parts: list[str]) -> tuple[str, str]:
    if parts[:1] == ["snapshots"] and (len(parts) == 3 or (len(parts) == 4 and parts[3] == parts[1])):
        return parts[1], parts[2]
    raise QuietError(f"{path}: not a snapshot (MNT/snapshots/<vol>/<snap>)")


def clone(source: str, new: str) -> int:
    mount, parts = locate(source)
    if parts[:1] == ["volumes"] and len(parts) == 2:
        volume, snapshot = parts[1], None
    else:
        volume, snapshot = _snapshot_parts(source, parts)
    if not os.path.exists(source):
        raise QuietError(f"{source}: no such volume or snapshot")
    name = new
    if "/" in new:
        if os.path.realpath(os.path.dirname(new.rstrip("/"))) != os.path.join(mount, "volumes"):
            raise QuietError(f"{new}: the clone goes to {os.path.join(mount, 'volumes')}, beside its source")
        name = os.path.basename(new.rstrip("/"))
    target = os.path.join(mount, "volumes", name)
    if os.path.lexists(target):
        raise QuietError(f"cannot clone to {target}: a volume of that name exists")
    request = {"source": volume, "snapshot": snapshot, "name": name}
    what = f"{volume}@{snapshot}" if snapshot else volume
    try:
        os.setxattr(os.path.join(mount, "volumes"), CLONE_XATTR, json.dumps(request).encode())
    except OSError as exc:
        raise QuietError(f"cannot clone {what} to {name}: {_clone_reason(exc, name)}") from None
    print(f"{target}: cloned from {what}; its data is copied in the background (vfsnap status, vfsnap sync)")
    return 0


def _clone_reason(exc: OSError, name: str) -> str:
    return {
        errno.EEXIST: f"{name} exists, or would collide with a file on the share (another volume's overlay)",
        errno.EINVAL: f"{name!r} is not a valid volume name ([A-Za-z0-9_.-], not starting with '.')",
        errno.ENAMETOOLONG: f"{name!r} is too long",
        errno.ENOENT: "no such volume or snapshot",
        errno.EBUSY: "the source is busy (another host is changing or writing it); try again",
        errno.ENOSPC: "no space left on the share",
        errno.EROFS: "the mount is read-only",
        errno.EPERM: "this mount does not support clones (is it an older vfsnap?)",
    }.get(exc.errno, exc.strerror or str(exc))


def revert(snapshot_path: str, *, destroy_newer: bool) -> int:
    mount, parts = locate(snapshot_path)
    volume, snapshot = _snapshot_parts(snapshot_path, parts)
    request = {"snapshot": snapshot, "destroy_newer": destroy_newer}
    try:
        os.setxattr(os.path.join(mount, "snapshots", volume), REVERT_XATTR, json.dumps(request).encode())
    except OSError as exc:
        raise QuietError(f"cannot revert {volume} to {snapshot}: {_revert_reason(exc, mount, volume, snapshot)}") \
            from None
    print(f"{volume}: reverted to snapshot {snapshot}")
    return 0


def _revert_reason(exc: OSError, mount: str, volume: str, snapshot: str) -> str:
    if exc.errno == errno.ENOTEMPTY:
        newer = _newer_snapshots(mount, volume, snapshot)
        listed = f" ({' '.join(newer)})" if newer else ""
        return f"newer snapshots exist{listed}; --destroy-newer deletes them too"
    return {
        errno.ENOENT: f"no such snapshot (see {os.path.join(mount, 'snapshots', volume)})",
        errno.EBUSY: (f"{volume} is open for writing (here or on another host), a newer snapshot is open, "
                      "or a clone is still copying from it (vfsnap status)"),
        errno.ENOSPC: "no space left on the share",
        errno.EROFS: "the mount is read-only",
        errno.EPERM: "this mount does not support revert (is it an older vfsnap?)",
    }.get(exc.errno, exc.strerror or str(exc))


def _newer_snapshots(mount: str, volume: str, snapshot: str) -> list[str]:
    try:
        for entry in read_status(mount)["volumes"]:
            if entry["name"] == volume and snapshot in entry.get("snapshots", []):
                snapshots = entry["snapshots"]
                return snapshots[snapshots.index(snapshot) + 1 :]
    except (QuietError, KeyError, ValueError):
        pass
    return []
