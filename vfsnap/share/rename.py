"""Renaming a volume: every file of its chain, the relative backing names, `.info`, the sidecar.

`mv volumes/a volumes/b` renames `a` to `b`, each overlay `a.<snap>` to `b.<snap>`, rewrites each
overlay's backing name (relative names of the new files, formats unchanged), writes `b.info`
and moves the sidecar. The plan is journalled first, in a hidden file of its own named after
the new name (`.vfsnap-rename-<hash of b>`: any host looking up a file `b.<snap>` can tell it
belongs to a rename under way, not to a volume of its own), and removed after the last step.
Every step checks what is already done, so after a crash, or a failure of the share in the
middle, the plan is simply run again (at the next mount, by `vfsnap check --repair`, or by the
mount's background task) until it completes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os

from vfsnap.errors import AlreadyExists, Busy, CorruptRecord, NameTooLong, ReadOnly
from vfsnap.format import Qcow2Image, TableCache
from vfsnap.format.header import read_header
from vfsnap.names import NAME_MAX, check_volume_name, info_file, overlay_file, sidecar_file
from vfsnap.share.info import VolumeInfo, parse_info
from vfsnap.share.records import RenamePlan, parse_rename_plan

log = logging.getLogger(__name__)

JOURNAL_PREFIX = ".vfsnap-rename-"


def journal_file(new: str) -> str:
    return JOURNAL_PREFIX + hashlib.sha256(new.encode()).hexdigest()[:32]


def _refuse_if_cloned(share, volume) -> None:
    from vfsnap.share.clone import pinned_by

    clone = pinned_by(share, volume.files())
    if clone is not None:
        raise Busy(f"volume {volume.name}: clone {clone} still reads from its files (its copy is running)")


async def rename_volume(share, old: str, new: str) -> None:
    """Rename volume `old` to `new`. The files are renamed and rewritten as data calls of the
    share (on its threads on a network share: a share that is slow or hangs holds back the
    rename, not the mount); the share's in-memory state changes on the loop."""
    new = check_volume_name(new)
    if share.read_only:
        raise ReadOnly("read-only mount")
    volume = share.volume(old)
    if volume.open_count:
        raise Busy(f"volume {old} is open")
    if volume.sidecar().journal:
        raise Busy(f"volume {old} has operations in progress")
    _refuse_if_cloned(share, volume)
    await volume.record_async()  # the record made when vfsnap met it moves with it
    info = volume.info()
    chain = [image.name for image in volume.live_chain()]
    files = {name: new + name[len(old) :] for name in chain}
    for snapshot, overlay in info.snapshots.items():
        files.setdefault(overlay, overlay_file(new, snapshot))
    targets = list(files.values()) + [info_file(new), sidecar_file(new), journal_file(new)]
    for target in targets:
        if share.dir.exists(target):
            raise AlreadyExists(f"{target} already exists on {share.path}")
    for target in targets:
        if len(target.encode()) > NAME_MAX:
            raise NameTooLong(f"{target!r} would exceed NAME_MAX")
    entry = RenamePlan(old=old, new=new, files=files, chain=tuple(chain),
                       formats={name: volume.format_of(name) for name in chain})
    journal = journal_file(new)
    io = share.io
    await io.write(f"write {journal}", share.dir.write_atomic, journal, entry.to_json())
    volume.close()
    share.forget_volume(old)
    try:
        await io.write("rename", run_rename, share, entry)
    except BaseException as exc:
        # A failed mv should change nothing anyone sees: undo what was done, by the same
        # idempotent steps in the other direction. If even that fails, the journal stays and
        # the rename is finished later (the mount's background task, the next mount, check).
        try:
            await io.write("rename", functools.partial(run_rename, share, entry.reversed(), journal=journal))
            log.warning("renaming %s to %s failed (%s); undone", old, new, exc)
        except BaseException as undo_exc:  # noqa: BLE001
            log.error("renaming %s to %s failed (%s), and so did undoing it (%s); it will be finished later",
                      old, new, exc, undo_exc)
            share.rename_unfinished = True
        raise


def run_rename(share, entry: RenamePlan, *, journal: str | None = None) -> None:
    """Carry out (or finish) a journalled rename; every step is idempotent. The journal file
    (by default the plan's own) is removed after the last step."""
    old, new, files = entry.old, entry.new, entry.files
    chain, formats = entry.chain, entry.formats
    d = share.dir
    # 1. Overlays first, top to bottom, then the base: until the base moves, `old` is the volume.
    for name in reversed(chain[1:]):
        if d.exists(name) and not d.exists(files[name]):
            d.rename(name, files[name])
    for name, target in files.items():
        if name not in chain and d.exists(name) and not d.exists(target):
            d.rename(name, target)
    d.fsync()
    # 2. Backing names: each overlay names the renamed file below it.
    for below, above in zip(chain, chain[1:]):
        _rebase_file(share, files[above], files[below], formats[below])
    # 3. The base.
    if d.exists(old) and not d.exists(new):
        d.rename(old, new)
        d.fsync()
    # 4. `.info` with the new names, then the sidecar, which drops the entry last.
    data = d.read_small(info_file(old))
    if data is not None:
        info = parse_info(data, name=info_file(old))
        renamed = VolumeInfo(active=files.get(info.active, info.active),
                             snapshots={s: files.get(f, f) for s, f in info.snapshots.items()})
        d.write_atomic(info_file(new), renamed.to_json())
        d.unlink(info_file(old))
        d.fsync()
    if d.exists(sidecar_file(old)):
        d.rename(sidecar_file(old), sidecar_file(new))
        d.fsync()
    d.unlink(journal or journal_file(new))
    d.fsync()
    log.info("renamed volume %s to %s on %s", old, new, share.path)


def _rebase_file(share, name: str, backing: str, backing_format: str) -> None:
    fd = share.dir.open_regular(name, os.O_RDWR)
    try:
        header = read_header(fd, os.fstat(fd).st_size, name=name)
        if header.backing_file == backing:
            return
        image = Qcow2Image(fd, name, writable=True, table_cache=TableCache(1 << 20))
        image.set_backing(backing, backing_format)
    finally:
        os.close(fd)


def pending_renames(share, *, corrupt: list[CorruptRecord] | None = None) -> list[RenamePlan]:
    """Renames under way (or interrupted) on the share. A plan that does not parse is left on
    the share, untouched, for an admin to look at: added to `corrupt` when given, else logged
    (naming the file and the field); it never stops the others."""
    plans = []
    for name in share.dir.listdir():
        if not name.startswith(JOURNAL_PREFIX):
            continue
        try:
            plan = read_journal(share, name)
        except CorruptRecord as exc:
            if corrupt is None:
                log.error("rename left alone: %s", exc)
            else:
                corrupt.append(exc)
            continue
        if plan is not None:
            plans.append(plan)
    return plans


def read_journal(share, name: str) -> RenamePlan | None:
    data = share.dir.read_small(name)
    if data is None:
        return None
    return parse_rename_plan(data, name=name)
