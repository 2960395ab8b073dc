"""`vfsnap clone` and `vfsnap revert` as the mount receives them: setxattr on a directory.

- clone: `user.vfsnap.clone` on `volumes/` (whoever may create volumes may clone), value
  `{"source": VOL, "snapshot": SNAP or null, "name": NEWVOL}` (JSON);
- revert: `user.vfsnap.revert` on `snapshots/<vol>/` (whoever may take and delete the volume's
  snapshots may revert it), value `{"snapshot": SNAP, "destroy_newer": bool}`.

The request is done when setxattr returns; a refusal is its errno (DESIGN.md's errno table in
docs/operations.md). The kernel's cached pages of a reverted volume are dropped afterwards, from
a worker thread and outside every lock of ours (FUSE-NOTES: invalidating from a handler's own
thread, or under a lock a pending request needs, deadlocks).
"""

from __future__ import annotations

import errno
import json
import logging

import pyfuse3
import trio

from vfsnap.errors import InvalidName, NotFound, ReadOnly
from vfsnap.fs.tree import Node, SnapshotDir, SnapshotFile, VolumeFile, VolumesDir, VolumeSnapshotsDir
from vfsnap.share import changes, clone

log = logging.getLogger(__name__)

CLONE_XATTR = "user.vfsnap.clone"
REVERT_XATTR = "user.vfsnap.revert"
MAX_REQUEST = 4096


def handles(node: Node, name: str) -> bool:
    return (isinstance(node, VolumesDir) and name == CLONE_XATTR) or (
        isinstance(node, VolumeSnapshotsDir) and name == REVERT_XATTR)


def _request(value: bytes, fields: dict) -> dict:
    """The JSON request, each field of the expected type (else EINVAL)."""
    try:
        if len(value) > MAX_REQUEST:
            raise ValueError("too long")
        document = json.loads(value)
        if not isinstance(document, dict):
            raise ValueError("not an object")
        for field, types in fields.items():
            if not isinstance(document.get(field), types):
                raise ValueError(f"field {field}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidName(f"malformed request ({exc})") from None
    return document


async def run(ops, node: Node, name: str, value: bytes) -> None:
    if ops.pool.read_only:
        raise ReadOnly("read-only mount")
    if name == CLONE_XATTR:
        await _clone(ops, _request(value, {"source": str, "snapshot": (str, type(None)), "name": str}))
    else:
        await _revert(ops, node.volume, _request(value, {"snapshot": str, "destroy_newer": bool}))


async def _clone(ops, request: dict) -> None:
    volume = await changes.create_clone(ops.pool, request["source"], request["snapshot"], request["name"])
    ops.inodes.retire(VolumeFile(volume.name))  # a fresh inode: never the pages of an older one
    start_copy(ops, volume)


def start_copy(ops, volume) -> None:
    """Run a clone's background copy (at creation, and for a clone found unfinished at mount)."""
    if not ops.running or clone.copy_state(volume).running:
        return
    try:
        if clone.clone_entry(volume.sidecar()) is None:
            return
    except Exception:  # noqa: BLE001 - a broken sidecar: the volume reports it on use
        return

    def copied(entry: clone.CloneEntry) -> None:
        start_held_merges(ops)

    ops.start_background(lambda: clone.run_copy(volume, on_done=copied))


def start_held_merges(ops) -> None:
    """A clone finished (or went): the hidden point in time it held can be merged away."""
    try:
        for volume in ops.pool.volumes_with_pending_work():
            ops.start_merges(volume)
    except Exception:  # noqa: BLE001 - tried again at the next mount
        log.exception("resuming merges after a clone's copy")


async def _revert(ops, volume_name: str, request: dict) -> None:
    volume = ops.pool.volume(volume_name)
    snapshot = request["snapshot"]
    if not volume.has_snapshot(snapshot):
        raise NotFound(f"volume {volume_name} has no snapshot {snapshot}")
    destroyed = await changes.revert_volume(volume, snapshot, destroy_newer=request["destroy_newer"])
    for gone in destroyed:
        ops.inodes.retire(SnapshotDir(volume_name, gone))
        ops.inodes.retire(SnapshotFile(volume_name, gone))
    ino = ops.inodes.known(VolumeFile(volume_name))
    if ino is not None:
        await trio.to_thread.run_sync(_invalidate, ino)


def _invalidate(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(ino, False)  # data and attributes: the size may differ too
    except OSError as exc:
        if exc.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
            log.warning("invalidating inode %d after a revert: %s", ino, exc)
