"""Reverting a volume to a snapshot in constant time (`vfsnap revert`).

The data of snapshot S is the chain below its overlay O (Cinder's layout); the live volume is
the whole chain. Reverting to S makes O a fresh empty qcow2 image over the same backing file,
as Cinder's revert does (it deletes the snapshot's overlay and creates it again): the live view
becomes exactly S's data, S stays (its data is below O, untouched), and `.info` keeps its form
(the newest snapshot's overlay is the active image). With `--destroy-newer` the snapshots newer
than S go too (their overlays sit above O; ZFS `rollback -r`): `.info` then names O active.

Steps, each journalled in the volume's sidecar (DESIGN.md invariant 3):
  journal {op: revert, target: O, overlay: F, drop: {newer snapshot: overlay}} → create F =
  `.vfsnap-revert-<hash>` (empty, backing: the file below O) and fsync it → journal state
  "created" → rename F over O [commit point] → `.info`: active O, without the newer snapshots
  → unlink the newer overlays and the active image above them → clear the journal.
A crash before "created" rolls back (F is removed); after it, recovery rolls forward (renames F
if that is still to do, then the rest; every step is idempotent).

Refused (EBUSY) while the volume is open for writing here or on another host (the caller's
`ChainChange` takes the share's writer lock), while a snapshot that would go is open, and while
a clone still reads a file that would be rewritten or removed.
"""

from __future__ import annotations

import hashlib
import logging
import os

import attrs

from vfsnap.errors import Busy, CorruptImage, NewerSnapshots, NotFound, ReadOnly
from vfsnap.format.create import create_qcow2
from vfsnap.share.records import REVERT_PREFIX, DeleteEntry, RevertEntry

log = logging.getLogger(__name__)

def fresh_file(volume_name: str) -> str:
    """The new overlay's name until it replaces the snapshot's: starts with a dot (never a
    volume, never listed), is not a temporary file (those are removed at mount, before the
    journal is read), and is short whatever the volume's name."""
    return REVERT_PREFIX + hashlib.sha256(volume_name.encode()).hexdigest()[:24]


def revert(volume, snapshot: str, *, destroy_newer: bool = False) -> list[str]:
    """Make the live volume snapshot `snapshot`'s data; returns the snapshots destroyed.

    The caller holds `ChainChange(volume)`.
    """
    from vfsnap.share.clone import pinned_by

    if volume.share.read_only:
        raise ReadOnly("read-only mount")
    if not volume.has_snapshot(snapshot):
        raise NotFound(f"volume {volume.name} has no snapshot {snapshot}")
    if volume.writers:
        raise Busy(f"volume {volume.name} is open for writing")
    info = volume.info()
    target = info.snapshots[snapshot]
    names = [image.name for image in volume.live_chain()]
    if target not in names or names.index(target) == 0:
        raise CorruptImage(f"{volume.name}: snapshot {snapshot}'s overlay {target} is not above the base")
    index = names.index(target)
    above = names[index + 1 :]
    newer = {s: o for s, o in info.snapshots.items() if o in above}
    hidden = set(volume.pending_deletes())
    visible_newer = sorted((s for s in newer if s not in hidden), key=lambda s: above.index(newer[s]))
    if visible_newer and not destroy_newer:
        raise NewerSnapshots(f"snapshot {snapshot} of {volume.name} is not the newest "
                             f"(newer: {' '.join(visible_newer)}); --destroy-newer deletes them")
    for snap in newer:
        if volume.open_snapshots.get(snap):
            raise Busy(f"snapshot {snap} of {volume.name} is open")
    clone = pinned_by(volume.share, [target, *above])
    if clone is not None:
        raise Busy(f"volume {volume.name}: clone {clone} still reads from a file the revert would change")
    backing = names[index - 1]
    image_below = volume.live_chain()[index - 1]
    entry = RevertEntry(snapshot=snapshot, target=target, overlay=fresh_file(volume.name), backing=backing,
                        backing_format=volume.format_of(backing), size=image_below.size, drop=newer,
                        files=tuple(above), state="started")
    # The images that go or change: closed before the files do (written back first: a reader's
    # object must not write a stale header later).
    for name in [target, *above]:
        volume.images.drop(name)
    volume.save_sidecar(volume.sidecar().with_entry(entry))
    try:
        _create_fresh(volume, entry)
        created = attrs.evolve(entry, state="created")
        volume.save_sidecar(volume.sidecar().replace_entry(entry, created))
    except BaseException:
        volume.share.dir.unlink(entry.overlay)
        volume.save_sidecar(volume.sidecar().without_entry(entry))
        volume.rebuild_views()
        raise
    _roll_forward(volume, created)
    volume.rebuild_views()
    log.info("%s: reverted to snapshot %s%s", volume.name, snapshot,
             f" (destroyed {' '.join(visible_newer)})" if visible_newer else "")
    return visible_newer


def _create_fresh(volume, entry: RevertEntry) -> None:
    share_dir = volume.share.dir
    share_dir.unlink(entry.overlay)  # a leftover of an attempt that failed
    fd = share_dir.open_regular(entry.overlay, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        create_qcow2(fd, entry.size, backing_file=entry.backing, backing_format=entry.backing_format)
    finally:
        os.close(fd)
    share_dir.fsync()


def _roll_forward(volume, entry: RevertEntry) -> None:
    """From the commit point on: idempotent, so recovery can run it again after a crash."""
    share_dir = volume.share.dir
    if share_dir.exists(entry.overlay):
        share_dir.rename(entry.overlay, entry.target)  # commit point
        share_dir.fsync()
    info = volume.info()
    drop = entry.drop
    if info.active != entry.target or any(s in info.snapshots for s in drop):
        kept = {s: o for s, o in info.snapshots.items() if s not in drop}
        volume.write_info(type(info)(active=entry.target, snapshots=kept))
    for name in entry.files:
        if name != entry.target:
            share_dir.unlink(name)
    share_dir.fsync()
    sidecar = volume.sidecar().without_entry(entry)
    for snap in drop:
        sidecar = sidecar.without(snap)
    # Deletions of newer snapshots still journalled (hidden, not merged yet) are moot now.
    for other in sidecar.entries(DeleteEntry):
        if other.snapshot in drop:
            sidecar = sidecar.without_entry(other)
    volume.save_sidecar(sidecar)


def recover_revert(volume, entry: RevertEntry) -> str:
    if entry.state != "created":
        volume.share.dir.unlink(entry.overlay)
        volume.share.dir.fsync()
        volume.save_sidecar(volume.sidecar().without_entry(entry))
        return f"{volume.name}: revert to snapshot {entry.snapshot} was not committed; rolled back"
    for name in [entry.target, *entry.files]:
        volume.images.drop(name)
    _roll_forward(volume, entry)
    volume.rebuild_views()
    return f"{volume.name}: revert to snapshot {entry.snapshot} finished"


def snapshots_newer_than(volume, snapshot: str) -> list[str]:
    """The visible snapshots a revert to `snapshot` would destroy (for the CLI's message)."""
    info = volume.info()
    names = [image.name for image in volume.live_chain()]
    target = info.snapshots[snapshot]
    above = names[names.index(target) + 1 :] if target in names else []
    hidden = set(volume.pending_deletes())
    return [s for s in volume.snapshots() if info.snapshots[s] in above and s not in hidden]


__all__ = ["recover_revert", "revert", "snapshots_newer_than"]
