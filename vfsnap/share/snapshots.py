"""Chain changes of a volume: taking a snapshot, deleting one, and finishing them after a crash.

Every change is journalled in the volume's sidecar before its first step and leaves the journal
after its last (DESIGN.md invariant 3). The commit point of each is one atomic write: the new
`.info` (snapshot taken; active image merged) or the rebased header of the image above the
deleted overlay. Recovery at mount (`recover`) looks at the journal and the files and either
finishes an operation or rolls it back.

Taking a snapshot (`mkdir snapshots/<vol>/<snap>`):
  journal → create overlay `<vol>.<snap>` (backing: the active image, relative name, its
  format) → flush the active image → `.info` names the overlay active [commit] → the live view
  switches to the new top → record the creation time, clear the journal.
  The volume's requests are held back (`ChainChange` quiesces it) from before the flush until
  after the switch, so no write can fall between them: the snapshot equals the volume at one
  instant, and the writer sees no error (its request waits a moment). The files are written as
  data calls of the share (on its threads on a network share); the in-memory state changes on
  the loop.

Deleting one (`rmdir`): the snapshot leaves the tree at once (the journal entry hides it); the
merge runs in the background (`run_pending`), see `vfsnap.chain.merge` for why it keeps every
other view intact.
"""

from __future__ import annotations

import logging
import os
import time

import trio

from vfsnap.chain.merge import Merge
from vfsnap.chain.view import View
from vfsnap.errors import AlreadyExists, Busy, CorruptImage, NotFound, ReadOnly, ShareNotAnswering, VfsnapError
from vfsnap.format.create import create_qcow2
from vfsnap.names import check_snapshot_name, overlay_file
from vfsnap.share.locks import ChainChange
from vfsnap.share.records import CloneEntry, DeleteEntry, RevertEntry, SnapshotEntry
from vfsnap.share.volume import sync_data

log = logging.getLogger(__name__)

# An active merge stops yielding to writers once this little is left to copy.
FINAL_COPY_BYTES = 32 << 20
# ... or after this many rounds of copying what writers dirtied meanwhile.
MAX_CATCH_UP_ROUNDS = 8


# -- taking a snapshot ----------------------------------------------------------------------


async def take_snapshot(volume, snapshot: str, *, now: float | None = None, hidden_for: str | None = None) -> None:
    """Take snapshot `snapshot` of the live volume. The caller holds `ChainChange(volume)`: the
    volume's requests are held back, its write lock and the share's locks are the change's.
    Its writes on the share are data calls (on the share's threads on a network share: a share
    that is slow or hangs holds back this snapshot, not the mount); its in-memory state changes
    on the loop.

    `hidden_for`: the point-in-time of a clone of the live volume (`vfsnap.share.clone`): the
    snapshot is journalled for deletion in the same write that finishes it, so it is never
    listed, and its merge waits until that clone no longer reads from it.
    """
    snapshot = check_snapshot_name(snapshot)
    overlay = overlay_file(volume.name, snapshot)
    if volume.share.read_only:
        raise ReadOnly("read-only mount")
    info = volume.info()
    if snapshot in info.snapshots:
        raise AlreadyExists(f"volume {volume.name} already has snapshot {snapshot}")
    if volume.share.dir.exists(overlay):
        raise AlreadyExists(f"{overlay} already exists on the share (another volume's file?)")
    view = volume.live_view()
    active = info.active
    entry = SnapshotEntry(snapshot=snapshot, overlay=overlay, backing=active, hidden_for=hidden_for)
    await volume.save_sidecar_async(volume.sidecar().with_entry(entry))
    io = volume.share.io
    created: list[bool] = []
    try:
        await io.write(f"create {overlay}", _create_overlay, volume.share.dir, overlay, view.size, active,
                       volume.format_of(active), created)
        # No write can come in until the switch: the volume's requests are held back.
        await io.write("flush", view.flush)
        await volume.write_info_async(info.with_snapshot(snapshot, overlay, active=overlay))
    except BaseException:
        if created:
            await io.write(f"unlink {overlay}", volume.share.dir.unlink, overlay)
        await volume.save_sidecar_async(volume.sidecar().without_entry(entry))
        raise
    # Committed: from here on nothing may report the snapshot as failed.
    await _switch_to_new_top(volume, view)
    try:
        await volume.save_sidecar_async(_finished_snapshot(volume.sidecar(), entry, now or time.time()))
    except (VfsnapError, OSError) as exc:
        # The journal entry stays; the mount's background task (or the next mount) records the
        # time and clears it.
        log.error("%s: snapshot %s taken, but its record could not be written: %s", volume.name, snapshot, exc)
        volume.needs_recovery = True
    log.info("%s: took snapshot %s (%s)", volume.name, snapshot, overlay)


def _finished_snapshot(sidecar, entry: SnapshotEntry, created: float):
    """The sidecar once snapshot `entry` is committed: its creation time, no journal entry, and
    for a clone's hidden point-in-time its deletion, held while the clone reads from it."""
    sidecar = sidecar.with_created(entry.snapshot, created).without_entry(entry)
    if entry.hidden_for:
        sidecar = sidecar.with_entry(DeleteEntry(snapshot=entry.snapshot, overlay=entry.overlay,
                                                 held_for=entry.hidden_for))
    return sidecar


def _create_overlay(share_dir, overlay: str, size: int, backing: str, backing_format: str, created: list) -> None:
    """Create the new overlay file and make its name durable (on a share thread); `created`
    says whether the file exists, for the caller to remove it if a later step fails."""
    fd = share_dir.open_regular(overlay, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    created.append(True)
    try:
        create_qcow2(fd, size, backing_file=backing, backing_format=backing_format)
    finally:
        os.close(fd)
    share_dir.fsync()


async def _switch_to_new_top(volume, view: View) -> None:
    old_top = view.top
    try:
        # flushed before the commit; this clears its dirty mark
        await volume.share.io.write("close", old_top.close_writes)
    except (VfsnapError, OSError) as exc:
        log.error("%s: %s stays marked dirty: %s", volume.name, old_top.name, exc)
    old_top.writable = False  # it is a backing file now: nothing may write it any more
    volume.rebuild_views()


# -- deleting a snapshot --------------------------------------------------------------------


async def request_delete(volume, snapshot: str) -> None:
    """Journal the deletion of `snapshot`; it leaves the tree now, the merge runs later. The
    journal is written as a data call of the share (`take_snapshot`)."""
    if volume.share.read_only:
        raise ReadOnly("read-only mount")
    if not volume.has_snapshot(snapshot):
        raise NotFound(f"volume {volume.name} has no snapshot {snapshot}")
    if volume.open_snapshots.get(snapshot):
        raise Busy(f"snapshot {snapshot} of {volume.name} is open")
    overlay = volume.info().snapshots[snapshot]
    _refuse_if_pinned(volume, overlay, f"snapshot {snapshot} of {volume.name}")
    entry = DeleteEntry(snapshot=snapshot, overlay=overlay)
    await volume.save_sidecar_async(volume.sidecar().with_entry(entry))
    volume.failed.pop(snapshot, None)
    log.info("%s: snapshot %s deleted; merging %s in the background", volume.name, snapshot, overlay)


async def run_pending(volume, *, retry_seconds: float = 5.0) -> None:
    """Run the journalled deletions of `volume`, oldest first, until none is left.

    While another host holds the volume (it is changing its chain, or writing it), wait and try
    again: that host may well be running the same merge, and the journal says when it is done.
    """
    if volume.runner_active or volume.share.read_only:
        return
    volume.runner_active = True
    try:
        while True:
            if not _pending(volume):
                return
            try:
                async with ChainChange(volume, quiesce=False):  # requests go on while it copies
                    entries = _pending(volume)  # again, under the lock: another host may have run it
                    if not entries:
                        return
                    await _run_entry(volume, entries[0])
            except (Busy, ShareNotAnswering) as exc:  # another host's change; a hung share
                log.info("%s: %s; merge retried in %s s", volume.name, exc, retry_seconds)
                await trio.sleep(retry_seconds)
    except VfsnapError as exc:
        # Its sidecar does not parse (or its chain does not open): the volume fails alone, the
        # deletions wait for the next mount (or `vfsnap check --repair`).
        log.error("%s: journalled deletions cannot run: %s", volume.name, exc)
    finally:
        volume.runner_active = False
        volume.running_merge = None


def _pending(volume) -> list[DeleteEntry]:
    return [e for e in volume.sidecar().entries(DeleteEntry)
            if e.snapshot not in volume.failed and not _held(volume, e)]


def _held(volume, entry: DeleteEntry) -> bool:
    """A clone's hidden point in time, kept while that clone still reads from it."""
    from vfsnap.share.clone import holds

    return holds(volume.share, entry)


def _refuse_if_pinned(volume, overlay: str, what: str) -> None:
    """Deleting a snapshot merges its overlay into the file below: EBUSY while a clone still
    reads that file (its background copy has not finished)."""
    from vfsnap.share.clone import pinned_by

    try:
        names = [image.name for image in volume.live_chain()]
    except VfsnapError:
        return  # a broken chain: the merge reports it
    if overlay in names and names.index(overlay) > 0:
        clone = pinned_by(volume.share, [names[names.index(overlay) - 1]])
        if clone is not None:
            raise Busy(f"{what}: clone {clone} still reads from it (its copy is running; see vfsnap status)")


async def _run_entry(volume, entry: DeleteEntry) -> None:
    try:
        await _delete(volume, entry)
    except Busy:
        raise  # a QEMU process holds an image: run_pending tries again later
    except (VfsnapError, OSError) as exc:
        # Leave the entry: the snapshot stays hidden, `vfsnap status` shows the failure, and
        # the next mount (or `vfsnap sync --retry`) tries again.
        message = str(exc) if isinstance(exc, VfsnapError) else os.strerror(exc.errno or 5)
        log.error("%s: deleting snapshot %s failed: %s", volume.name, entry.snapshot, message)
        volume.failed[entry.snapshot] = message


async def _delete(volume, entry: DeleteEntry) -> None:
    snapshot, overlay = entry.snapshot, entry.overlay
    info = volume.info()
    chain = volume.live_chain()
    names = [image.name for image in chain]
    if overlay not in names:
        # Merged and rebased before a crash: only the bookkeeping is left.
        await _finish_delete(volume, entry)
        return
    index = names.index(overlay)
    if index == 0:
        raise CorruptImage(f"{volume.name}: snapshot {snapshot} names the base image {overlay}")
    target_name = names[index - 1]
    child_name = names[index + 1] if index + 1 < len(names) else None
    # The target is written by the merge and read by every view above it: one read-write
    # image object for all of them keeps their caches coherent.
    if not chain[index - 1].writable:
        volume.reopen(target_name, writable=True)
        chain = volume.live_chain()
    target_view = View(chain[:index], name=f"{volume.name}:merge-target")
    live = volume.live_view()
    source = live if child_name is None else View(chain[: index + 1], name=f"{volume.name}:merge-source")
    merge = Merge(chain[index], source, target_view)
    io = volume.share.io
    volume.running_merge = {"snapshot": snapshot, "merge": merge}
    if child_name is None:
        live.observers.append(merge.note_write)
    quiet = None
    try:
        rounds = 0
        while await _copy_step(volume, merge):
            await trio.sleep(0)  # let FUSE requests in between steps (a local share copies inline)
            if child_name is None and merge.pending_bytes < FINAL_COPY_BYTES:
                rounds += 1
                if rounds >= MAX_CATCH_UP_ROUNDS or merge.pending_bytes < (1 << 20):
                    break
        # What was copied is stored on a worker thread, FUSE requests going on (the kernel has
        # been writing it back all along; waiting for it in between would only stop the copy).
        await sync_data(target_view.top)
        # The rest with the volume's requests held back (those in flight, on worker threads,
        # finish first: vfsnap/share/io.py rule 6): writers wait for this last, short part.
        quiet = volume.gate.quiesced()
        await quiet.__aenter__()
        await merge.finish_async(io)
        if child_name is not None:
            await _rebase(volume, child_name, target_name)  # commit point
            await volume.write_info_async(info.without_snapshot(snapshot))
        else:
            await volume.write_info_async(info.without_snapshot(snapshot, active=target_name))  # commit point
            await io.write("close", chain[index].close_writes)
            chain[index].writable = False
    finally:
        if child_name is None and merge.note_write in live.observers:
            live.observers.remove(merge.note_write)
        try:
            await io.write("close", target_view.top.close_writes)
        finally:
            volume.running_merge = None
            if quiet is not None:
                await quiet.__aexit__(None, None, None)
    volume.rebuild_views()
    await _finish_delete(volume, entry)


async def _copy_step(volume, merge: Merge) -> bool:
    """One step of the merge's copy, on one of the share's threads on a network share (a share
    that hangs stalls the merge, not the mount), counted as a read of the volume in flight: a
    flush gives back no cluster of the overlay while the step may still be reading it, and no
    change of the volume replaces a descriptor under it (vfsnap/share/io.py rules 5 and 6).
    True while something is left to copy."""
    seq = await volume.gate.enter(read=True)
    try:
        return await merge.step_async(volume.share.io)
    finally:
        volume.gate.leave(seq)


async def _rebase(volume, child: str, backing: str) -> None:
    """Point `child` at `backing` (qemu-img rebase -u), durable when this returns; the header
    is written as a data call of the share (the volume's requests are held back).

    The active image is rebased through the object its writers use (one object per file, so
    no stale copy of the header can be written back later); any other through a short-lived
    read-write one, after which the volume's read-only object is reopened.
    """
    io = volume.share.io
    image = volume.images.get(child)
    backing_format = volume.format_of(backing)
    if image is not None and image.writable:
        await io.write("rebase", image.set_backing, backing, backing_format)
        return
    temporary = volume.images.open_file(child, "qcow2", writable=True)
    try:
        await io.write("rebase", temporary.set_backing, backing, backing_format)
    finally:
        temporary.close()
    if image is not None:
        volume.reopen(child, writable=False)


async def _finish_delete(volume, entry: DeleteEntry) -> None:
    """After the commit point: drop the snapshot from `.info`, the overlay file, the entry
    (each written as a data call of the share)."""
    snapshot, overlay = entry.snapshot, entry.overlay
    info = volume.info()
    if snapshot in info.snapshots:
        active = info.active
        if active == overlay:
            raise CorruptImage(f"{volume.name}: {overlay} is still active after its merge")
        await volume.write_info_async(info.without_snapshot(snapshot))
    volume.images.drop(overlay)
    if overlay not in (volume.info().active, volume.name) and overlay not in volume.info().snapshots.values():
        await volume.share.io.write(f"unlink {overlay}", _unlink_durably, volume.share.dir, overlay)
    await volume.save_sidecar_async(volume.sidecar().without(snapshot).without_entry(entry))
    log.info("%s: snapshot %s merged and removed", volume.name, snapshot)


def _unlink_durably(share_dir, name: str) -> None:
    share_dir.unlink(name)
    share_dir.fsync()


# -- recovery -------------------------------------------------------------------------------


def recover(volume) -> list[str]:
    """Finish or roll back what a crash interrupted; deletions are left for `run_pending`.

    Returns a line per action taken (for logs and `vfsnap check`).
    """
    actions = []
    for entry in list(volume.sidecar().journal):
        if isinstance(entry, SnapshotEntry):
            actions.append(_recover_snapshot(volume, entry))
        elif isinstance(entry, RevertEntry):
            from vfsnap.share.revert import recover_revert

            actions.append(recover_revert(volume, entry))
        elif isinstance(entry, CloneEntry):
            actions.append(f"{volume.name}: copy of clone data from {entry.source} pending; resuming")
        elif isinstance(entry, DeleteEntry):
            actions.append(f"{volume.name}: deletion of snapshot {entry.snapshot} pending; resuming")
        else:
            actions.append(f"{volume.name}: unknown journal entry {entry.to_json()!r} left alone")
    return actions


def _recover_snapshot(volume, entry: SnapshotEntry) -> str:
    snapshot, overlay = entry.snapshot, entry.overlay
    info = volume.info()
    if info.snapshots.get(snapshot) == overlay:
        volume.save_sidecar(_finished_snapshot(volume.sidecar(), entry, time.time()))
        return f"{volume.name}: snapshot {snapshot} was committed; finished it"
    if overlay not in info.snapshots.values() and overlay != info.active:
        _unlink_durably(volume.share.dir, overlay)
    volume.save_sidecar(volume.sidecar().without_entry(entry))
    return f"{volume.name}: snapshot {snapshot} was not committed; rolled back"


def operations(volume) -> list[dict]:
    """Running, queued and failed deletions of `volume`, for `vfsnap status`."""
    out = []
    running = volume.running_merge
    for entry in volume.sidecar().entries(DeleteEntry):
        snapshot = entry.snapshot
        op = {"volume": volume.name, "kind": "delete", "snapshot": snapshot, "overlay": entry.overlay}
        if running is not None and running["snapshot"] == snapshot:
            merge = running["merge"]
            op.update(state="merging", done=merge.done, total=merge.total)
        elif snapshot in volume.failed:
            op.update(state="failed", error=volume.failed[snapshot])
        elif entry.held_for and _held(volume, entry):
            op.update(kind="clone-point", state=f"held by clone {entry.held_for}")
        else:
            op.update(state="queued")
        out.append(op)
    return out


__all__ = ["operations", "recover", "request_delete", "run_pending", "take_snapshot", "NotFound"]
