"""A volume on a share: its chain as `.info` names it, and the views of it.

The views of a volume are its live disk (the chain ending at the active image) and one per
snapshot (the chain *below* the overlay created when the snapshot was taken). View objects live
as long as the volume, and when the chain changes they are given their new chain
(`rebuild_views`), so open files keep working. What a `Volume` holds besides:

- its record (the sidecar: base format, creation times, journal): `vfsnap.share.sidecar_store`;
- its open image objects, one per file, and QEMU's locks on them: `vfsnap.share.open_images`;
- its locks between hosts: `vfsnap.share.locks`.

Reading a volume (stat, listing its snapshots, their times, attributes, reads of its views)
never writes to the share: only opening the live volume (its first-meeting record) and chain
changes do. Chain-changing operations are in `vfsnap.share.snapshots`, `clone`, `revert` and
`rename`; the fs layer reaches them through `vfsnap.share.changes`, which takes the locks.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter

import attrs
import trio

from vfsnap.chain.backing import ChainRules, backing_chain
from vfsnap.chain.view import View
from vfsnap.errors import Busy, CorruptImage, NotFound, NotPermitted, ShareNotAnswering, VfsnapError
from vfsnap.format import Image
from vfsnap.format.create import round_size
from vfsnap.format.header import MAGIC, read_header
from vfsnap.format.tables import write_error
from vfsnap.names import info_file, sidecar_file
from vfsnap.share.first_meeting import first_record, guess_creation_time
from vfsnap.share.info import VolumeInfo, parse_info
from vfsnap.share.io import RequestGate
from vfsnap.share.locks import VolumeLocks
from vfsnap.share.open_images import OpenImages
from vfsnap.share.qemu_locks import READING, UNUSED, WRITING, ImageUse
from vfsnap.share.records import DeleteEntry, Sidecar
from vfsnap.share.sidecar_store import SidecarStore

log = logging.getLogger(__name__)


@attrs.frozen
class VolumeStat:
    """What `stat` of a live volume shows (see `Volume.stat`)."""

    mode: int
    uid: int
    gid: int
    size: int
    allocated: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    exact: bool = True  # False: size and allocation are the base file's (see Volume.stat)


def base_file_stat(base: os.stat_result, size: int | None = None, *, exact: bool = False) -> VolumeStat:
    """A volume's figures from its base file's `lstat` alone: exact for a volume that is its base
    file (no `.info`) with `size` read from its head; otherwise what a listing shows of a volume
    not in use (`size`, when known, the size last seen), marked inexact (`Volume.stat`)."""
    return VolumeStat(base.st_mode, base.st_uid, base.st_gid, round_size(base.st_size) if size is None else size,
                      base.st_blocks * 512, base.st_mtime_ns, base.st_ctime_ns, base.st_atime_ns, exact=exact)


def image_size(share_dir, name: str, st: os.stat_result, image_format: str | None) -> int:
    """The virtual size of image file `name` (its lstat `st`): a raw file's length in whole
    sectors, or the size field of a qcow2 header. `image_format` None: as the file's first bytes
    say (a base vfsnap has not met: what the first meeting will record), from the same read."""
    if image_format == "raw":
        return round_size(st.st_size)
    fd = share_dir.open_regular(name, os.O_RDONLY)
    try:
        head = os.pread(fd, 32, 0)
    finally:
        os.close(fd)
    if image_format is None and head[:4] != MAGIC:
        return round_size(st.st_size)
    if len(head) < 32 or head[:4] != MAGIC or int.from_bytes(head[4:8], "big") not in (2, 3):
        raise CorruptImage(f"{name}: invalid qcow2 header")
    size = int.from_bytes(head[24:32], "big")
    if size > 1 << 62:
        raise CorruptImage(f"{name}: invalid qcow2 header: virtual size {size} too large")
    return size & ~511


# Less unsynced data than this is synced where it is (the request thread): it takes little
# time, and syncing it on a worker first would add a sync to the ordered flush that follows
# (measured: mkdir under a 4 KiB writer went from 15 to 25 ms median).
SYNC_ON_WORKER_BYTES = 1 << 20


async def sync_data(image: Image, min_bytes: int = SYNC_ON_WORKER_BYTES) -> None:
    """fdatasync the data written to `image` so far on a worker thread (see
    `Image.begin_data_sync`), if there are at least `min_bytes` of it; a failure is the image's
    write error, as from `flush`."""
    ticket = image.begin_data_sync(min_bytes)
    if ticket is None:
        return
    fd, generation = ticket
    try:
        # Not cancellable: the thread cannot be stopped, so its descriptor is closed only
        # after it returns.
        await trio.to_thread.run_sync(os.fdatasync, fd)
    except OSError as exc:
        raise write_error(exc, image.name, "sync") from None
    finally:
        os.close(fd)
    image.data_synced(generation)

# How long a `.info` read is trusted before it is read again (another host may change it;
# reading the content, not trusting mtimes, also works under NFS attribute caching).
INFO_RECHECK_SECONDS = 0.25  # + the share's own delay: within the 1 s listing bound (docs)


class Volume:
    def __init__(self, share, name: str):
        self.share = share
        self.name = name
        self._info: VolumeInfo | None = None
        self._info_bytes: bytes | None = None
        self._info_checked = 0.0
        self.sidecar_store = SidecarStore(share, sidecar_file(name), meet=lambda: first_record(self))
        self.images = OpenImages(share, name, use_of=self._qemu_use, in_use=lambda: bool(self.open_count))
        self._peeked: tuple[tuple, int] | None = None  # (file identity, virtual size): see stat()
        self._last_stat: VolumeStat | None = None  # for a share that does not answer: see stat()
        self._live_view: View | None = None
        self._snapshot_views: dict[str, View] = {}
        self.open_count = 0
        self.writers = 0
        self.release_pending = False  # `settle_releases` has work a hung share held up
        self.open_snapshots: Counter[str] = Counter()
        self.locks = VolumeLocks(share.dir, name)
        self.chain_changing = False  # set by ChainChange while it holds the share's locks
        # Chain changes of this volume happen one at a time (DESIGN.md section 3).
        self.chain_lock = trio.Lock()
        # Requests in flight, the write lock, and quiescing for chain changes (share/io.py).
        self.gate = RequestGate()
        self.flushing = False  # a background write-back of this volume is under way
        # The merge running now, for `vfsnap status` (set by vfsnap.share.snapshots).
        self.running_merge = None
        self.failed: dict[str, str] = {}  # snapshot -> error of a merge that failed
        self.runner_active = False
        # A committed operation whose journal entry could not be cleared (see snapshots.py), or
        # a journal the mount's recovery has not reached yet.
        self.needs_recovery = share.may_need_recovery(name)

    # -- files ----------------------------------------------------------------------------

    @property
    def info_name(self) -> str:
        return info_file(self.name)

    @property
    def sidecar_name(self) -> str:
        return sidecar_file(self.name)

    @property
    def has_open_images(self) -> bool:
        return bool(self.images)

    def stat(self, *, exact: bool = True) -> "VolumeStat":
        """What `stat` shows of the live volume, cheaply. A volume in use answers from its
        view; any other from its files' metadata, opening no image and writing nothing: size
        from the active image (a raw file's length in whole sectors, or the size field of a
        qcow2 header, read once per change of the file), allocation as the blocks of the files
        its `.info` names (the files of its chain), times of the active image.

        With `exact=False` (the entries of a listing) a volume not in use answers from its base
        file alone, reading nothing: mode and owner are right, size (the last one seen, else the
        base file's), allocation and times may not be, and `exact` in the result says so. A
        listing of 10,000 volumes with chains then reads no image header (issue 13; a volume
        that is its base file alone is listed exactly: `Share.listed_stat`).

        While the share does not answer, the figures last given (DESIGN.md section 4: `stat`
        answers from the last known state); ShareNotAnswering (EAGAIN) if there are none."""
        try:
            figures = self._stat(exact)
        except ShareNotAnswering:
            if self._last_stat is None:
                raise
            return self._last_stat
        if figures.exact:
            self._last_stat = figures
        return figures

    def _stat(self, exact: bool) -> VolumeStat:
        base = self.base_stat()
        view = self._live_view
        if view is not None:
            top = self.share.dir.fstat(view.top.fd, view.top.name)
            return VolumeStat(base.st_mode, base.st_uid, base.st_gid, view.size, self.allocated_bytes(view),
                              top.st_mtime_ns, top.st_ctime_ns, top.st_atime_ns)
        if not exact:
            return base_file_stat(base, self._peeked[1] if self._peeked is not None else None)
        if self._info is not None:
            info = self.info()
        else:  # not read yet: what the index's scan read, if anything
            index = self.share.index
            info = index.info_of(self.name)
            if info is None:
                info = self.info() if self.name in self.share.state().with_info else VolumeInfo(active=self.name)
        stats = {name: self._stat_member(name) for name in {info.active, *info.snapshots.values()} - {self.name}}
        top = base if info.active == self.name else stats[info.active]
        if top is None:
            raise CorruptImage(f"{self.info_name}: active image {info.active} does not exist")
        size = self._peek_size(info.active, top)
        blocks = base.st_blocks + sum(st.st_blocks for st in stats.values() if st is not None)
        return VolumeStat(base.st_mode, base.st_uid, base.st_gid, size, blocks * 512,
                          top.st_mtime_ns, top.st_ctime_ns, top.st_atime_ns)

    def _stat_member(self, name: str) -> os.stat_result | None:
        """lstat of a file `.info` names; None for one that is missing or no file of the volume
        (what `.info` names outside the volume is never looked at, invariant 5)."""
        if not ChainRules(self.name, base_format="raw").belongs(name):
            return None
        return self.share.dir.stat(name)

    def depth(self) -> int:
        """Overlays in the live chain (from `.info` when the volume is not open)."""
        if self._live_view is not None:
            return len(self._live_view.images) - 1
        info = self.info()
        return len({info.active, *info.snapshots.values()} - {self.name})

    def _peek_size(self, name: str, st: os.stat_result) -> int:
        identity = (name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if self._peeked is not None and self._peeked[0] == identity:
            return self._peeked[1]
        if name != self.name:
            image_format = "qcow2"  # overlays always are (ChainRules)
        else:
            recorded = self.sidecar_store.on_share_or_met()
            # Not met yet: what the first meeting will record (probed, not recorded now).
            image_format = recorded.base_format if recorded is not None else None
        size = image_size(self.share.dir, name, st, image_format)
        self._peeked = (identity, size)
        return size

    def base_stat(self) -> os.stat_result:
        st = self.share.dir.stat(self.name)
        if st is None:
            raise NotFound(f"volume {self.name} no longer exists")
        return st

    # -- .info ----------------------------------------------------------------------------

    def info(self) -> VolumeInfo:
        """The volume's `.info`, read again when the last read is older than a moment, except
        while this host changes the chain: it holds the share's CHAIN and WRITER locks, so nobody
        else can change the file, and a read in the middle of its own write (on a share thread,
        `write_info_async`) would take the new file for another host's change."""
        if self._info is not None and (self.chain_changing
                                       or time.monotonic() - self._info_checked < INFO_RECHECK_SECONDS):
            return self._info
        return self.refresh()

    def refresh(self) -> VolumeInfo:
        """Read `.info` now; if someone else (Cinder, another host) changed it, reopen the chain
        but keep the view objects, which open files hold."""
        data = self.share.dir.read_small(self.info_name)
        self._info_checked = time.monotonic()
        self.sidecar_store.forget()  # read again too: another host may have journalled a deletion
        if self._info is not None and data == self._info_bytes:
            return self._info
        changed = self._info is not None
        self._info = VolumeInfo(active=self.name) if data is None else parse_info(data, name=self.info_name)
        self._info_bytes = data
        self.sidecar_store.keep_guesses_of(self._info.snapshots)
        if changed:
            log.info("%s: %s changed on the share; reopening the chain", self.name, self.info_name)
            self.images.drop_all()
            self.rebuild_views()
        return self._info

    def write_info(self, info: VolumeInfo) -> None:
        """Replace `.info` atomically (the commit point of every chain change)."""
        data = info.to_json()
        self.share.dir.write_atomic(self.info_name, data)
        self._info_written(info, data)

    async def write_info_async(self, info: VolumeInfo) -> None:
        """`write_info`, the file written as a data call of the share (on one of its threads
        on a network share); the volume's state changes on the loop, once the file is in place.
        Not cancellable (`ShareIO.run`): the caller knows whether its commit point was passed."""
        data = info.to_json()
        await self.share.io.write(f"write {self.info_name}", self.share.dir.write_atomic, self.info_name, data)
        self._info_written(info, data)

    def _info_written(self, info: VolumeInfo, data: bytes) -> None:
        self._info = info
        self._info_bytes = data
        self._info_checked = time.monotonic()
        self.sidecar_store.keep_guesses_of(info.snapshots)

    # -- the record (sidecar) -------------------------------------------------------------

    def sidecar(self) -> Sidecar:
        """vfsnap's record of the volume (`SidecarStore.get`): a volume that has none is given
        one in memory the first time vfsnap meets it."""
        return self.sidecar_store.get()

    def save_sidecar(self, sidecar: Sidecar) -> None:
        self.sidecar_store.save(sidecar)

    async def save_sidecar_async(self, sidecar: Sidecar) -> None:
        await self.sidecar_store.save_async(sidecar)

    def record(self) -> None:
        """Write the record made when vfsnap met the volume, if the share has none yet: before
        the first write can change what a probe would see (DESIGN.md invariant 4)."""
        if self.sidecar_store.save_first_meeting():
            log.info("%s: first seen; recorded base format %s", self.name, self.sidecar().base_format)

    async def record_async(self) -> None:
        """`record`, the file written as a data call of the share (`save_sidecar_async`)."""
        if self.sidecar_store.unsaved and not self.share.read_only:
            await self.save_sidecar_async(self.sidecar())
            log.info("%s: first seen; recorded base format %s", self.name, self.sidecar().base_format)

    # -- images and chains ----------------------------------------------------------------

    def rules(self) -> ChainRules:
        from vfsnap.share.clone import linked_volumes  # an unfinished clone reads on in its source

        sidecar = self.sidecar()
        return ChainRules(self.name, base_format=sidecar.base_format, max_depth=self.share.options.max_chain_depth,
                          linked=linked_volumes(sidecar))

    def format_of(self, file_name: str) -> str:
        return self.rules().format_of(file_name, None, referrer=self.info_name)

    def open_member(self, name: str, image_format: str) -> Image:
        """The image object of a file of the volume (opened once, shared by every view); the
        active image read-write unless the mount is read-only."""
        writable = not self.share.read_only and self._info is not None and name == self._info.active
        return self.images.open(name, image_format, writable=writable)

    def reopen(self, name: str, *, writable: bool) -> Image:
        """Replace the open image `name` by a fresh one (after its header changed, or to write it).

        Every view gets the new object; the old one is flushed and retired.
        """
        old, image = self.images.reopen(name, self.format_of(name), writable=writable)
        if old is not None:
            for view in self.views():
                if old in view.images:
                    view.set_images([image if img is old else img for img in view.images])
            self.images.retire(old)
        return image

    def live_chain(self) -> list[Image]:
        info = self.info()
        rules = self.rules()
        return backing_chain(info.active, rules.format_of(info.active, None, referrer=self.info_name), rules,
                             self.open_member)

    def snapshot_chain(self, snapshot: str) -> list[Image]:
        """The images of snapshot `snapshot`'s data: the chain below its overlay."""
        overlay = self.info().snapshots[snapshot]
        chain = backing_chain(overlay, "qcow2", self.rules(), self.open_member)
        if len(chain) < 2:
            raise CorruptImage(f"{overlay}: snapshot overlay has no backing file")
        return chain[:-1]

    def live_view(self) -> View:
        self.info()  # notices changes made on the share by others
        if self._live_view is None:
            self._live_view = View(self.live_chain(), name=self.name, budget=self.share.map_budget, split_top=True,
                                   max_chunks=self.share.options.map_cache_chunks, io=self.share.io)
        return self._live_view

    def views(self) -> list[View]:
        """The views of the volume made so far (its snapshots', its live disk's)."""
        views = list(self._snapshot_views.values())
        if self._live_view is not None:
            views.append(self._live_view)
        return views

    def rebuild_views(self) -> None:
        """The chain changed: give every view its new chain, close images nobody uses."""
        info = self.info()
        if self._live_view is not None:
            self._live_view.set_images(self.live_chain())
        for snapshot, view in list(self._snapshot_views.items()):
            if snapshot in info.snapshots:
                view.set_images(self.snapshot_chain(snapshot))
            else:
                del self._snapshot_views[snapshot]
        self.images.keep_only({img.name for view in self.views() for img in view.images} | {info.active})
        self.sync_qemu_locks()

    # -- snapshots as the tree shows them -------------------------------------------------

    def pending_deletes(self) -> list[str]:
        return [e.snapshot for e in self.sidecar_store.journal() if isinstance(e, DeleteEntry)]

    def snapshots(self) -> list[str]:
        """Visible snapshot ids, oldest first (by their overlays' position in the chain).

        Snapshots being deleted left the tree when `rmdir` returned, merged or not.
        """
        info = self.info()
        if not info.snapshots:
            return []
        try:
            order = {image.name: i for i, image in enumerate(self.live_chain())}
        except VfsnapError:
            order = {}
        hidden = set(self.pending_deletes())
        visible = [s for s in info.snapshots if s not in hidden]
        return sorted(visible, key=lambda s: (order.get(info.snapshots[s], len(order)), s))

    def has_snapshot(self, snapshot: str) -> bool:
        return snapshot in self.info().snapshots and snapshot not in self.pending_deletes()

    def latest_snapshot(self) -> str | None:
        snapshots = self.snapshots()
        return snapshots[-1] if snapshots else None

    def snapshot_view(self, snapshot: str) -> View:
        if not self.has_snapshot(snapshot):
            raise NotFound(f"volume {self.name} has no snapshot {snapshot}")
        view = self._snapshot_views.get(snapshot)
        if view is None:
            view = View(self.snapshot_chain(snapshot), name=f"{self.name}@{snapshot}", budget=self.share.map_budget,
                        max_chunks=self.share.options.map_cache_chunks, io=self.share.io)
            self._snapshot_views[snapshot] = view
        return view

    def snapshot_created(self, snapshot: str) -> float:
        """When `snapshot` was taken: recorded, or guessed (kept in memory and written with the
        record's next write: asking never writes)."""
        created = self.sidecar_store.created(snapshot)
        if created is None:
            overlay = self.info().snapshots.get(snapshot)
            created = guess_creation_time(self, overlay) if overlay else time.time()
            if overlay:
                self.sidecar_store.note_guess(snapshot, created)
        return created

    # -- writing --------------------------------------------------------------------------

    def flush(self) -> None:
        """Make every acknowledged write durable on the share."""
        if self._live_view is not None:
            self._live_view.flush()

    async def flush_async(self) -> None:
        """`flush`, with the long part (waiting for the share to store the data) on a worker
        thread, so that requests for other volumes, and reads of this one, go on meanwhile.

        The metadata write-back holds the write lock (share/io.py rule 4): it comes after the
        writes in flight, and on a network share it runs on a worker thread too. Freed clusters
        are given back only once the reads begun before have finished (rule 5)."""
        if self._live_view is not None and self._live_view.dirty:
            await sync_data(self._live_view.top)
        async with self.gate.write_lock:
            view = self._live_view
            if view is None:
                return
            top = view.top
            # metadata, in order; its data sync has only what came in meanwhile
            await self.share.io.write("flush", top.flush_keeping_frees)
            if top.dirty:  # freed clusters wait
                await self.gate.drain(reads_only=True)
                top.apply_pending_frees()

    def close_writes(self) -> None:
        """The last writer closed the volume: write everything back, clear the dirty marks."""
        if self._live_view is not None:
            self._live_view.top.close_writes()

    async def close_writes_async(self) -> None:
        """`close_writes` after the reads in flight, off the loop on a network share."""
        if self._live_view is None:
            return
        if not self.share.io.threaded and not self.gate.write_lock.locked() and not self.gate.reads_in_flight:
            self._live_view.top.close_writes()  # at once: the release is answered before an unmount
            return
        async with self.gate.write_lock:
            if self._live_view is not None:
                await self.gate.drain(reads_only=True)
                await self.share.io.write("close", self._live_view.top.close_writes)

    def allocated_bytes(self, view: View) -> int:
        """Bytes of the share the images of `view` occupy (as last seen, if the share hangs)."""
        return sum(self.share.dir.fstat(image.fd, image.name).st_blocks * 512 for image in view.images)

    # -- requests in flight (vfsnap/share/io.py) ---------------------------------------------

    async def read(self, view: View, offset: int, length: int):
        """A read of `view` that waits for the share: counted in flight (the volume's
        descriptors stay open and its freed clusters unused until it is done), on the share's
        threads. (What the page cache answers, `View.read_cached` answers first.)"""
        gate = self.gate
        seq = await gate.enter(read=True)
        try:
            return await view.read_async(offset, length)
        finally:
            gate.leave(seq)

    def read_now(self, view: View, offset: int, length: int, trio_token):
        """A read on a FUSE reader thread (vfsnap/fs/relay.py), or None to let the loop answer
        it: counted in flight like `read` (the gate: descriptors stay open, freed clusters
        unused, and a chain change waits for it), answered only from maps resolved already
        (`View.read_now`), bounded per share (`ShareIO.run_here`)."""
        gate = self.gate
        seq = gate.enter_now()
        if seq is None:
            return None
        try:
            return self.share.io.run_here("read", view.read_now, offset, length)
        finally:
            gate.leave(seq, trio_token)

    def write_now(self, view: View, offset: int, data, trio_token) -> int | None:
        """A write on a FUSE reader thread (vfsnap/fs/relay.py), or None to let the loop answer
        it: on a network share only (a local one writes on the loop, without the lock), counted
        in flight like `write`, with the write lock (io.py rule 4), bounded per share like the
        reads (`ShareIO.run_here`)."""
        if not self.share.io.threaded:
            return None
        gate = self.gate
        seq = gate.enter_now(read=False)
        if seq is None:
            return None
        try:
            return self.share.io.run_here("write", self._write_locked_now, view, offset, data, trio_token)
        finally:
            gate.leave(seq, trio_token)

    def _write_locked_now(self, view: View, offset: int, data, trio_token) -> int | None:
        lock = self.gate.write_lock
        if not lock.acquire_now():
            return None
        try:
            return view.write_now(offset, data, trio_token)
        finally:
            lock.release(trio_token)

    async def write(self, view: View, offset: int, data) -> int:
        """Write `data` at `offset` of the live `view`. On a network share one write of the
        volume at a time, its system calls on a worker thread (io.py rules 4 and 5); on a local
        disk in place, into the page cache."""
        if not self.share.io.threaded:
            return view.write(offset, data)
        gate = self.gate
        seq = await gate.enter(read=False)
        try:
            async with gate.write_lock:
                return await view.write_async(offset, data)
        finally:
            gate.leave(seq)

    async def opened_async(self, snapshot: str | None = None, *, writing: bool = False) -> None:
        """`opened`. The first writer, or a reader with nobody writing here, re-reads `.info`
        and may give the active image a new descriptor: not under a request in flight."""
        if self.writers:
            self.opened(snapshot, writing=writing)
            return
        async with self.gate.quiesced():
            self.opened(snapshot, writing=writing)

    async def forget_stale_images_async(self) -> None:
        """`forget_stale_images`, not while a read in flight uses the old descriptors (rule 6)."""
        async with self.gate.quiesced():
            self.forget_stale_images()

    async def resize_async(self, new_size: int) -> None:
        """`resize`, with the volume's requests held back (rule 6); EAGAIN on a share that does
        not answer (`Share.check_answering`)."""
        self.share.check_answering(f"resize of {self.name}")
        async with self.gate.quiesced():
            self.share.check_answering(f"resize of {self.name}")
            view = self._check_resize(new_size)
            if new_size != view.size:
                await view.resize_async(new_size, thick=self.share.options.thick)

    @property
    def dirty(self) -> bool:
        return self._live_view is not None and self._live_view.dirty

    def resize(self, new_size: int) -> None:
        """Grow the live volume (only the active image grows; shorter backing files read zeros)."""
        view = self._check_resize(new_size)
        if new_size != view.size:
            view.resize(new_size, thick=self.share.options.thick)

    def _check_resize(self, new_size: int) -> View:
        view = self.live_view()
        if new_size < view.size:
            raise NotPermitted(f"volume {self.name}: shrinking is not supported ({view.size} -> {new_size})")
        return view

    # -- after a crash --------------------------------------------------------------------

    def files(self) -> list[str]:
        """The files of the volume named by `.info`, base first."""
        info = self.info()
        return [self.name] + sorted({info.active, *info.snapshots.values()} - {self.name})

    def dirty_images(self) -> list[str]:
        """qcow2 files of the volume whose header carries the dirty bit (a crash left them while
        they were written): read from their headers only, nothing opened as an image."""
        found = []
        for name in self.files():
            fd = self.share.dir.open_regular(name, os.O_RDONLY)
            try:
                dirty = read_header(fd, os.fstat(fd).st_size, name=name).dirty
            except VfsnapError:
                continue  # not a qcow2 image vfsnap can repair: it fails on use, with its error
            finally:
                os.close(fd)
            if not dirty:
                continue
            # Asked only now, of a file that looks like a dirty qcow2 image: a raw disk whose
            # guest wrote such a header is still raw (invariant 4).
            if self.format_of(name) == "qcow2":
                found.append(name)
        return found

    def repair_dirty_images(self) -> list[str]:
        """Rebuild the refcounts of images a crash left marked dirty (reclaims leaked clusters)."""
        repaired = []
        for name in self.dirty_images():
            image = self.images.open_file(name, "qcow2", writable=True)
            try:
                image.prepare_for_writing()  # rebuilds the refcounts of a dirty image
                image.close_writes()
            finally:
                image.close()
            repaired.append(name)
            log.warning("%s: %s was left dirty by a crash; refcounts rebuilt", self.name, name)
        return repaired

    def finish_journal(self) -> None:
        """Clear what committed operations left in the journal (see `needs_recovery`). The
        caller holds the chain locks (`ChainChange`, or the volume is being closed)."""
        from vfsnap.share.snapshots import recover

        try:
            for line in recover(self):
                log.info("%s", line)
            self.needs_recovery = False
        except (VfsnapError, OSError) as exc:
            log.warning("%s: journal still cannot be cleared: %s", self.name, exc)

    def forget_stale_images(self) -> None:
        """After ESTALE from an image (another host or an admin replaced or deleted the file):
        look the share's names up afresh and reopen the chain by name, so that a retried
        request reads the files that are there now. Not while this host writes the volume or
        changes its chain: then nobody else may replace its files (DESIGN.md invariant 7)."""
        self.share.dir.reresolve()
        if self.writers or self.chain_changing or self.chain_lock.locked():
            return
        log.info("%s: a file of the volume was replaced on the share (stale file handle); reopening its images",
                 self.name)
        self.refresh()
        # One image after the other, each swapped into the views only once its new descriptor
        # is open: a failure midway leaves every view with open (if old) images.
        for name, image in self.images.items():
            self.reopen(name, writable=image.writable)

    # -- QEMU's image locks ---------------------------------------------------------------

    def _qemu_use(self, name: str, image: Image | None) -> ImageUse:
        """How QEMU's locks describe what this host does with image `name` now: written while
        the volume is open for writing here or its chain changes (then only the images opened
        read-write: the active one, a merge's target); read (nobody may change it) while a file
        of the volume is open or its chain changes, except the active image, which another
        vfsnap host may write when this one does not (DESIGN.md invariant 7 keeps them apart)."""
        if image is None:
            return UNUSED
        if image.writable and (self.writers or self.chain_changing):
            return WRITING
        if (self.open_count or self.chain_changing) and (self._info is None or name != self._info.active):
            return READING
        return UNUSED

    def sync_qemu_locks(self, *, strict: bool = False) -> None:
        """QEMU's locks on every image in line with what this host does now (`OpenImages`)."""
        self.images.sync_qemu_locks(strict=strict)

    # -- lifetime -------------------------------------------------------------------------

    def opened(self, snapshot: str | None = None, *, writing: bool = False) -> None:
        self.settle_releases()  # what closes left to do, first (a no-op unless a share hung)
        if writing and not self.writers and not self.share.read_only:
            self.locks.acquire_writer()  # EBUSY while another host writes it
        if not self.writers:
            # Nobody here holds the volume for writing: another host may have changed its chain
            # (`.info`) or written its active image since we last looked. With the writer lock
            # just taken, nobody else can change them any more.
            try:
                self.refresh()
                self._revalidate_active()
            except BaseException:
                if writing:
                    self.locks.release_writer()
                raise
        if snapshot is None:
            # The live disk is in use: its record reaches the share now, before anything can
            # write it (a snapshot is only read: opening one writes nothing).
            try:
                self.record()
            except BaseException:
                if writing and not self.writers:
                    self.locks.release_writer()
                raise
        self.open_count += 1
        if writing:
            self.writers += 1
        try:
            self.sync_qemu_locks(strict=True)  # EBUSY while a QEMU process writes the images
        except Busy:
            self.open_count -= 1
            if writing:
                self.writers -= 1
                if not self.writers and not self.chain_lock.locked():
                    self.locks.release_writer()
            self.sync_qemu_locks()
            raise
        if snapshot is not None:
            self.open_snapshots[snapshot] += 1

    def reload_all(self) -> None:
        """Forget every cached image and reopen the chain (another host may have written it).

        Taken before a chain change when nothing here writes the volume: images another host
        wrote while we held them open are read afresh, never merged from stale tables.
        """
        self.refresh()
        self.images.drop_all()
        self.sidecar_store.forget()
        self.rebuild_views()

    def _revalidate_active(self) -> None:
        """Another host may have written the active image since the volume was last open here
        (that changes its tables without changing `.info`; mtimes are too coarse to tell):
        reload its header and L1 table and forget what was resolved through it."""
        if self._live_view is None:
            return
        top = self._live_view.top
        if top.writable:
            top.close_writes()  # ours first: nothing unwritten, and no dirty mark left behind
        on_share = self.share.dir.stat(top.name)
        replaced = on_share is not None and on_share.st_ino != os.fstat(top.fd).st_ino
        if self.share.network or replaced:
            # A new descriptor, not just a re-read: network filesystems (NFS, GlusterFS)
            # revalidate their caches on open (close-to-open), not on reads of an open file;
            # and a revert on another host renames a new file over the active one.
            top.replace_fd(self.share.dir.open_regular(top.name, os.O_RDWR if top.writable else os.O_RDONLY))
        top.reload()
        self._live_view.invalidate()  # its chunks named the old descriptor, and old tables

    def released(self, snapshot: str | None = None, *, writing: bool = False) -> None:
        self.open_count -= 1
        if writing:
            self.writers -= 1
        if snapshot is not None:
            self.open_snapshots[snapshot] -= 1
            if not self.open_snapshots[snapshot]:
                del self.open_snapshots[snapshot]
        self.release_pending = True
        self.settle_releases()

    def settle_releases(self) -> None:
        """What closing files leaves to do on the share: give the writer lock back when nobody
        writes here any more, close the images retired meanwhile, bring QEMU's locks in line.

        Each is a call on the share (an unlock, a close) made from the loop, which a share that
        hangs would never answer, stalling the mount: on a share that does not answer
        (`Share.check_answering`), they wait for the next open of the volume or the next
        background pass (`Pool.settle_releases`). Until then the volume stays locked as while
        it was open, which keeps other hosts and QEMU out a little longer and loses nothing."""
        if not self.release_pending:
            return
        try:
            self.share.check_answering(f"close of {self.name}")
        except ShareNotAnswering as exc:
            log.info("%s: locks and descriptors given back later: %s", self.name, exc)
            return
        self.release_pending = False
        if not self.writers and not self.chain_lock.locked():
            self.locks.release_writer()  # nothing when not held
        if not self.open_count:
            self.images.close_retired()
        self.sync_qemu_locks()

    def close(self) -> None:
        if self.needs_recovery and not self.share.read_only:
            self.finish_journal()
        self.images.close()
        self._live_view = None
        self._snapshot_views.clear()
        self.locks.close()
