"""Clones: a new volume readable and writable at once, copied from its source in the background.

`vfsnap clone SOURCE NEWVOL` makes `NEWVOL` on the source's share (its files must sit in the
same directory: backing names are plain names, DESIGN.md invariant 5). Its base `NEWVOL` is a
qcow2 image whose backing file is the source's image just below the point in time:

- a snapshot S of volume V: the image below S's overlay (S's own data);
- the live volume V: a point in time taken as mkdir takes a snapshot, a hidden snapshot of V
  (`take_snapshot(..., hidden_for=NEWVOL)`): journalled for deletion at once, so never listed,
  and merged away when the clone no longer reads from it.

Until the copy is done the clone's chain runs on into V's files (and, for a clone of a clone,
into the files its source still reads). That link is recorded in the clone's own journal (its
sidecar, never `.info`): one entry `{"op": "clone", "linked": [[V, format], ...], "pins": [...]}`;
the chain rules accept exactly those volumes' files below the clone's base (`ChainRules.linked`).
`pins` are the files the clone reads; while the entry exists they cannot change: rmdir of a
snapshot whose merge would rewrite one, unlink, rename or revert of V that would remove or
rewrite one answer EBUSY (`pinned_by`).

The background copy (`run_copy`) fills every cluster the clone's base does not hold with the
data the source chain shows there. That changes no view (the base reads the same bytes through
its backing file), so writers and snapshots of the clone go on meanwhile. When every cluster is
in the base, the base's backing file is dropped (the commit point: one header write), then the
journal entry (which releases the pins). After a crash the entry says what to resume; the copy
is idempotent (clusters the base holds are skipped).

Creating a clone: temporary image `.vfsnap-tmp-clone-*` (backing: the source image) → the
clone's sidecar with its journal entry → rename to `NEWVOL` (the commit point). A crash before
the rename leaves a temporary file (removed at mount) and maybe a sidecar of no volume (removed
by `recover_share`); the hidden snapshot, then held by no clone, is merged away.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import secrets
import weakref

import attrs
import trio

from vfsnap.chain.view import ZERO_FD, View, resolve_extents
from vfsnap.errors import AlreadyExists, Busy, CorruptRecord, NoSpace, NotFound, ReadOnly, ShareNotAnswering, VfsnapError
from vfsnap.format import UNALLOCATED, Qcow2Image
from vfsnap.format.create import create_qcow2
from vfsnap.names import SIDECAR_SUFFIX, TEMP_PREFIX, check_volume_name, info_file, is_snapshot_name, sidecar_file
from vfsnap.share.locks import ChainChange
from vfsnap.share.records import CloneEntry, DeleteEntry, Sidecar, parse_sidecar

log = logging.getLogger(__name__)

# Copied between two yields to the event loop (FUSE requests run in between).
STEP_BYTES = 4 << 20
# Copied per hold of the clone's chain lock (see MAX_HOLD_SECONDS).
HOLD_BYTES = 64 << 20
# ... and for longer while nothing else of this mount waits for it, up to this long.
MAX_HOLD_SECONDS = 2.0


# -- the record -------------------------------------------------------------------------------


def clone_entry(sidecar: Sidecar) -> CloneEntry | None:
    """The unfinished copy of a clone, from its journal (None once it no longer needs its source)."""
    entries = sidecar.entries(CloneEntry)
    return entries[0] if entries else None


def linked_volumes(sidecar: Sidecar) -> tuple[tuple[str, str], ...]:
    """The volumes an unfinished clone's chain runs on into, nearest first, with base formats."""
    entry = clone_entry(sidecar)
    if entry is None:
        return ()
    return entry.linked


# Per share: sidecar file -> ((inode, mtime, size), clone entry or None).
_SCANNED: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def unfinished_clones(share) -> dict[str, CloneEntry]:
    """Every clone on the share whose copy has not finished: name -> journal entry.

    Read from the sidecars on the share itself (another host's clones count too); a sidecar is
    parsed again only when it changed.
    """
    cache = _SCANNED.setdefault(share, {})
    found = {}
    for file_name in share.dir.listdir():
        if not file_name.endswith(SIDECAR_SUFFIX) or file_name.startswith("."):
            continue
        st = share.dir.stat(file_name)
        if st is None:
            continue
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = cache.get(file_name)
        if cached is None or cached[0] != stamp:
            entry = None
            data = share.dir.read_small(file_name)
            if data is not None and b'"clone"' in data:
                try:
                    entry = clone_entry(parse_sidecar(data, name=file_name))
                except VfsnapError as exc:
                    log.warning("%s", exc)
            cached = cache[file_name] = (stamp, entry)
        name = file_name[: -len(SIDECAR_SUFFIX)]
        if cached[1] is not None and share.dir.exists(name):
            found[name] = cached[1]
    return found


def pinned_by(share, files) -> str | None:
    """The clone that still reads one of `files` (so they may not change), or None."""
    files = set(files)
    for clone, entry in sorted(unfinished_clones(share).items()):
        if files & set(entry.pins):
            return clone
    return None


def holds(share, delete_entry: DeleteEntry) -> bool:
    """Whether a clone's hidden point-in-time (a journalled deletion) must stay for now."""
    clone = delete_entry.held_for
    return bool(clone) and clone in unfinished_clones(share)


# -- creating a clone -------------------------------------------------------------------------


def check_clone_name(pool, share, name: str) -> str:
    """NEWVOL: a valid volume name, no volume anywhere in the pool, no file of the share, and
    not the name of a chain file some volume of the share could make (`<vol>.<snap>`)."""
    name = check_volume_name(name)
    for other in pool.shares:
        if other.is_volume(name):
            raise AlreadyExists(f"volume {name} already exists on {other.path}")
    for file_name in (name, info_file(name), sidecar_file(name)):
        if share.dir.exists(file_name):
            raise AlreadyExists(f"{file_name} already exists on {share.path} (another volume's file?)")
    parts = name.split(".")
    for i in range(1, len(parts)):
        owner, rest = ".".join(parts[:i]), ".".join(parts[i:])
        if is_snapshot_name(rest) and share.dir.exists(owner) and share.is_volume(owner):
            raise AlreadyExists(f"{name} would collide with the overlay of snapshot {rest} of volume {owner}")
    return name


async def create_clone(pool, source, snapshot: str | None, name: str):
    """Make clone `name` of `source` (at `snapshot`, or now); returns the new volume.

    The caller holds `ChainChange(source)`: the source's chain cannot change meanwhile.
    """
    share = source.share
    if share.read_only:
        raise ReadOnly("read-only mount")
    name = check_clone_name(pool, share, name)
    if snapshot is not None and not source.has_snapshot(snapshot):
        raise NotFound(f"volume {source.name} has no snapshot {snapshot}")
    source_rules = source.rules()
    if snapshot is None:
        from vfsnap.share.snapshots import take_snapshot

        snapshot = "clone-" + secrets.token_hex(6)
        await take_snapshot(source, snapshot, hidden_for=name)
    overlay = source.info().snapshots[snapshot]
    chain = source.snapshot_chain(snapshot)  # the point in time: the chain below the overlay
    top = chain[-1]
    entry = CloneEntry(
        source=source.name,
        snapshot=snapshot,
        source_overlay=overlay,  # not "overlay": that key names a journalled file of the volume itself
        top=top.name,
        linked=((source.name, source_rules.base_format), *source_rules.linked),
        pins=tuple(image.name for image in chain),
    )
    temporary = f"{TEMP_PREFIX}clone-{secrets.token_hex(8)}"
    sidecar_written = False
    try:
        fd = share.dir.open_regular(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        try:
            create_qcow2(fd, top.size, backing_file=top.name, backing_format=source_rules.format_of(
                top.name, None, referrer=overlay))
        finally:
            os.close(fd)
        share.dir.write_atomic(sidecar_file(name), Sidecar(base_format="qcow2", journal=(entry,)).to_json())
        sidecar_written = True
        share.dir.rename(temporary, name)  # commit point
    except BaseException as exc:
        share.dir.unlink(temporary)
        if sidecar_written:
            share.dir.unlink(sidecar_file(name))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(f"no space on {share.path} for clone {name}") from None
        raise
    share.dir.fsync()
    log.info("%s: cloned from %s@%s (reads %s until its copy is done)", name, source.name, snapshot, top.name)
    return share.volume(name)


def recover_share(share) -> list[str]:
    """Remove the sidecars of clones a crash interrupted before their commit point (the base
    was never renamed into place): they would pin the source's files for nothing."""
    actions = []
    for file_name in share.dir.listdir():
        if not file_name.endswith(SIDECAR_SUFFIX) or file_name.startswith("."):
            continue
        name = file_name[: -len(SIDECAR_SUFFIX)]
        if share.dir.exists(name) or share.dir.exists(info_file(name)):
            continue
        data = share.dir.read_small(file_name)
        try:
            if data is None or clone_entry(parse_sidecar(data, name=file_name)) is None:
                continue
        except VfsnapError:
            continue
        share.dir.unlink(file_name)
        share.dir.fsync()
        actions.append(f"{name}: clone was not committed; removed its record")
    return actions


# -- the background copy ----------------------------------------------------------------------


@attrs.define
class CopyState:
    """What `vfsnap status` shows of a clone's copy."""

    running: bool = False
    done: int = 0
    total: int = 0
    cursor: int = 0
    error: str | None = None


_STATES: "weakref.WeakKeyDictionary[object, CopyState]" = weakref.WeakKeyDictionary()


def copy_state(volume) -> CopyState:
    return _STATES.setdefault(volume, CopyState())


async def run_copy(volume, *, retry_seconds: float = 5.0, on_done=None) -> None:
    """Copy the clone's data into its own base until it needs nothing of its source.

    Holds the clone's chain lock for at most HOLD_BYTES at a time, so that snapshots of the
    clone can be taken meanwhile. `on_done(entry)` runs when the copy finished (the source's
    hidden point-in-time can then be merged away).
    """
    state = copy_state(volume)
    if state.running or volume.share.read_only:
        return
    state.running = True
    state.error = None
    try:
        while True:
            if not volume.share.dir.exists(volume.name) or clone_entry(volume.sidecar()) is None:
                return
            try:
                rate = volume.share.options.clone_copy_rate
                # Requests of the clone go on while it copies (each step holds its write lock,
                # the reopening and the commit hold them back: vfsnap/share/io.py rules 4, 6).
                async with ChainChange(volume, quiesce=False):
                    entry = clone_entry(volume.sidecar())
                    if entry is None:
                        return
                    before = state.cursor
                    # Paced: one step per hold, and the pause outside it.
                    finished = await _copy_some(volume, entry, state, STEP_BYTES if rate else HOLD_BYTES,
                                                STEP_BYTES if rate else 16 * HOLD_BYTES)
                if finished:
                    if on_done is not None:
                        on_done(entry)
                    return
            except (Busy, ShareNotAnswering) as exc:  # another host's change; a hung share
                log.info("%s: %s; clone copy retried in %s s", volume.name, exc, retry_seconds)
                await trio.sleep(retry_seconds)
                continue
            # Throttled (mount option clone_copy_rate): paced by the range gone through, outside
            # the lock.
            await trio.sleep((state.cursor - before) / rate if rate else 0)
    except (VfsnapError, OSError) as exc:
        if not volume.share.dir.exists(volume.name):
            log.info("%s: removed while its data was being copied", volume.name)
            return
        message = str(exc) if isinstance(exc, VfsnapError) else os.strerror(exc.errno or errno.EIO)
        log.error("%s: copying the clone's data failed: %s", volume.name, message)
        state.error = message
    finally:
        state.running = False


async def _copy_some(volume, entry: CloneEntry, state: CopyState, hold_bytes: int, scan_bytes: int) -> bool:
    """Copy up to `hold_bytes`, going through at most `scan_bytes` of the disk (holes are
    cheap); the caller holds the chain lock. True when the copy is done."""
    chain = volume.live_chain()
    names = [image.name for image in chain]
    if volume.name not in names or not isinstance(chain[names.index(volume.name)], Qcow2Image):
        raise CorruptRecord(f"{volume.sidecar_name}: names an unfinished clone, but the chain "
                            f"{' '.join(names)} has no qcow2 base {volume.name} to copy into")
    base_index = names.index(volume.name)
    base = chain[base_index]
    if base.backing_file is None:  # the commit point was passed before a crash
        async with volume.gate.quiesced():
            _finish(volume, entry, state)
        return True
    if not base.writable:  # snapshots of the clone were taken: base is a backing file now
        async with volume.gate.quiesced():
            base = volume.reopen(volume.name, writable=True)
        chain = volume.live_chain()
    source = View(chain[:base_index], name=f"{volume.name}:clone-source")
    target = View(chain[: base_index + 1], name=f"{volume.name}:clone-target")
    size = base.size
    io = volume.share.io
    if state.total == 0 or state.cursor == 0:
        state.total = await io.write("clone size", _data_bytes, source.images, size)
        state.done = 0
    copied = scanned = 0
    started = trio.current_time()

    def go_on() -> bool:
        if copied < hold_bytes and scanned < scan_bytes:
            return True
        # Past the hold's size, go on while nothing here waits for the chain (each new hold
        # reloads the chain and syncs), but not for long: other hosts may wait for it too.
        paced = hold_bytes == STEP_BYTES
        return (not paced and not volume.chain_lock.statistics().tasks_waiting
                and trio.current_time() - started < MAX_HOLD_SECONDS)

    while state.cursor < size and go_on():
        end = min(size, state.cursor + STEP_BYTES)
        _read_ahead(source, end, min(size, end + STEP_BYTES))
        async with volume.gate.write_lock:  # the base's write state is the clone's writers' too
            # On one of the share's threads on a network share (a share that hangs stalls the
            # copy, not the mount), handed the base's write state by the lock (io.py rule 4).
            step, patches = await io.write("clone copy", _copy_range, base, source, target, state.cursor, end)
            target.apply_patches(patches)
        state.done += step
        copied += step
        scanned += end - state.cursor
        state.cursor = end
        _forget_resolved(volume, base)  # views resolved these clusters to the source's files
        await trio.sleep(0)
    if state.cursor < size:
        return False
    async with volume.gate.quiesced():
        await io.write("clone flush", target.flush)  # every copied cluster durable before the backing file goes
        base.set_backing(None, None)  # commit point: the clone reads nothing of its source
        _finish(volume, entry, state)
    return True


def _copy_range(base, source: View, target: View, start: int, end: int) -> tuple[int, list]:
    """Copy what the source shows in [start, end) where the base holds nothing, under the
    clone's write lock, so that no write of the clone lands in between (its own writes win).
    Touches no view's chunks (for a worker thread). Returns the bytes copied and the extents
    written, for the loop to patch into `target`."""
    copied = 0
    patches: list = []
    for s, e, fd, host in resolve_extents(source.images, start, end):
        if fd == ZERO_FD:
            continue  # zeros: an unallocated base cluster reads zeros once the backing is gone
        for ds, de in _data_runs(s, e, fd, host):
            for ms, me, kind, _where in base.map_range(ds, de):
                if kind == UNALLOCATED:
                    patches += target.write_on_worker(ms, source.read_resolved(ms, me - ms))
                    copied += me - ms
    return copied, patches


def _data_bytes(images, size: int) -> int:
    """Bytes of data the chain `images` holds (what a clone's copy goes through)."""
    return sum(de - ds for s, e, fd, host in resolve_extents(images, 0, size) if fd != ZERO_FD
               for ds, de in _data_runs(s, e, fd, host))


_READ_AHEAD = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vfsnap-clone-readahead")
_read_ahead_pending: list[concurrent.futures.Future] = []


def _read_ahead(source: View, start: int, end: int) -> None:
    """Have a worker thread ask the kernel for the next step's source data while this step
    copies (posix_fadvise WILLNEED itself waits for much of the read on ext4). Only advice:
    one request outstanding at a time."""
    while _read_ahead_pending and _read_ahead_pending[0].done():
        _read_ahead_pending.pop(0)
    if not _read_ahead_pending:
        _read_ahead_pending.append(_READ_AHEAD.submit(_advise, source.images, start, end))


def _advise(images, start: int, end: int) -> None:
    """On the read-ahead thread: the source's images are backing files nothing writes while
    the clone reads them (a merge into one waits for the copy: `pinned_by`)."""
    try:
        extents = resolve_extents(images, start, end)
    except Exception:  # noqa: BLE001 - only advice: the copy reports what is wrong
        return
    for s, e, fd, host in extents:
        if fd >= 0:
            try:
                os.posix_fadvise(fd, host, e - s, os.POSIX_FADV_WILLNEED)
            except OSError:
                return


def _data_runs(start: int, end: int, fd: int, host) -> list[tuple[int, int]]:
    """The parts of guest [start, end) that are not holes of the file holding them (a sparse
    raw source: its holes read zeros, as an unallocated base cluster will)."""
    if fd < 0:
        return [(start, end)]  # compressed (or a bad extent: the read reports it)
    runs, pos = [], host
    stop = host + (end - start)
    try:
        while pos < stop:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            if data >= stop:
                break
            hole = min(stop, os.lseek(fd, data, os.SEEK_HOLE))
            runs.append((start + data - host, start + hole - host))
            pos = hole
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data past pos
            return runs
        return [(start, end)]  # no SEEK_DATA on this share: copy it all
    return runs


def _forget_resolved(volume, base) -> None:
    """Views of the clone resolved the copied clusters to the source's files (same bytes, but
    a later in-place write to the base must be read back from the base)."""
    for view in volume.views():
        if base in view.images:
            view.invalidate_all()


def _finish(volume, entry: CloneEntry, state: CopyState) -> None:
    """After the commit point: drop the link (and with it the pins), reopen the chain."""
    volume.save_sidecar(volume.sidecar().without_entry(entry))
    if volume.info().active != volume.name:
        volume.reopen(volume.name, writable=False)
    volume.rebuild_views()
    state.cursor = 0
    state.done = state.total
    log.info("%s: clone copy done; independent of %s", volume.name, entry.source)


def operations(volume) -> list[dict]:
    """The clone's copy for `vfsnap status` (queued, copying, or failed)."""
    try:
        if not volume.share.dir.exists(volume.sidecar_name):
            return []
        entry = clone_entry(volume.sidecar())
    except VfsnapError:
        return []
    if entry is None:
        return []
    state = copy_state(volume)
    op = {"volume": volume.name, "kind": "clone", "snapshot": f"{entry.source}@{entry.snapshot}"}
    if state.error is not None:
        op.update(state="failed", error=state.error)
    elif state.running:
        op.update(state="copying", done=state.done, total=state.total)
    else:
        op.update(state="queued")
    return [op]


__all__ = ["create_clone", "holds", "linked_volumes", "operations", "pinned_by", "recover_share", "run_copy"]
