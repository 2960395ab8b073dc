"""A share: one directory holding volumes in Cinder's remotefs layout.

Which files are volumes is the share's index (`vfsnap.share.index`): one scan of the directory,
kept until it changes. Nothing of a volume is opened before the volume is used.
"""

from __future__ import annotations

import contextlib
import logging
import os

import attrs

from vfsnap.errors import AlreadyExists, Busy, NotFound, ReadOnly, ShareNotAnswering, VfsnapError, share_error
from vfsnap.chain.view import MapBudget
from vfsnap.format import TableCache
from vfsnap.format.create import create_qcow2, round_size
from vfsnap.names import (
    SIDECAR_SUFFIX,
    check_volume_name,
    info_file,
    is_volume_name,
    sidecar_file,
)
from vfsnap.options import MountOptions
from vfsnap.share.files import ShareDir
from vfsnap.share.index import ShareIndex, ShareState
from vfsnap.share.io import ShareIO
from vfsnap.share.records import Sidecar
from vfsnap.share.mounts import coherence_warnings, mount_holding
from vfsnap.share.volume import Volume, VolumeStat, base_file_stat, image_size

log = logging.getLogger(__name__)


@attrs.frozen
class Capacity:
    total: int
    free: int  # bytes free for root
    available: int  # bytes free for unprivileged users
    block_size: int

    @classmethod
    def of(cls, st: os.statvfs_result) -> "Capacity":
        return cls(total=st.f_blocks * st.f_frsize, free=st.f_bfree * st.f_frsize,
                   available=st.f_bavail * st.f_frsize, block_size=st.f_frsize)


class Share:
    def __init__(self, path: str, options: MountOptions, table_cache: TableCache | None = None):
        self.options = options
        self.dir = ShareDir(path)
        self.path = self.dir.path
        # One memory budget for tables and resolved maps (the pool gives all shares the same).
        self.table_cache = table_cache or TableCache(options.memory_budget)
        self.map_budget = MapBudget(options.memory_budget, tables=self.table_cache)
        self._volumes: dict[str, Volume] = {}
        self.rename_unfinished = False  # a rename failed midway; the background task retries
        # NFS and FUSE filesystems (GlusterFS) cache across opens, not across hosts' writes.
        self.network = filesystem_type(self.path) in NETWORK_FILESYSTEMS
        self.index = ShareIndex(self.dir)
        self.recovery_pending = False  # the mount's recovery has not yet seen every journal
        self.dir.uncached_reads = self.network  # `.info` and sidecars past the client's caches
        if self.network:
            for warning in coherence_warnings(self.path):
                log.warning("%s", warning)
        # Requests in flight to this share, and whether it answers (vfsnap/share/io.py).
        threaded = options.share_io == "threads" or (options.share_io == "auto" and self.network)
        self.io = ShareIO(self.path, threads=options.share_threads, threaded=threaded)
        if threaded:
            self.dir.io = self.io

    @property
    def read_only(self) -> bool:
        return self.options.read_only

    def check_answering(self, what: str) -> None:
        """Raise ShareNotAnswering (EAGAIN) if the share is not answering, or does not answer a
        `stat` of its directory within `io.ANSWER_WAIT`. Chain changes and resizes make their
        calls on the share from the loop: started on a share that hangs, they would stall every
        volume of the mount, so they ask first (a hang in the middle of one still stalls it:
        docs/design-notes.md, "Still on the loop")."""
        if self.io.threaded:
            self.io.answer(what, os.stat, self.path)

    def close(self) -> None:
        for volume in self._volumes.values():
            try:
                volume.close()
            except Exception:  # noqa: BLE001 - close the others all the same
                log.exception("%s: closing", volume.name)
        self._volumes.clear()
        self.io.close()
        self.dir.close()

    # -- which files are volumes (vfsnap.share.index) ------------------------------------

    def state(self) -> ShareState:
        """The share's index (`ShareIndex.current`); while the share does not answer, the last
        one it gave (DESIGN.md section 4: listings answer from the last known state)."""
        if self.dir.io is None:
            return self.index.current()
        try:
            return self.dir.io.answer("listing", self.index.current)
        except ShareNotAnswering:
            if self.index.state is None:
                raise
            return self.index.state

    def volume_names(self) -> list[str]:
        return list(self.state().volumes)

    def is_volume(self, name: str) -> bool:
        return is_volume_name(name) and name in self.state()

    def volume(self, name: str) -> Volume:
        """The volume `name`, or NotFound."""
        volume = self._volumes.get(name)
        if volume is not None and self.dir.exists(name):
            return volume
        if not self.is_volume(name):
            if volume is not None:
                self._forget(name)
            raise NotFound(f"no volume {name!r} on {self.path}")
        if volume is None:
            volume = self._volumes[name] = Volume(self, name)
        return volume

    def listed_stat(self, name: str) -> VolumeStat:
        """What a listing shows of volume `name` (`Volume.stat(exact=False)`), without making a
        `Volume` of every name a listing passes (10,000 of them cost a third of the listing)."""
        volume = self._volumes.get(name)
        if volume is not None:
            return volume.stat(exact=False)
        base = self.dir.stat(name)
        state = self.state()
        if base is None or not is_volume_name(name) or name not in state:
            raise NotFound(f"no volume {name!r} on {self.path}")
        if name not in state.with_info and name not in state.with_sidecar:
            # Never met and no chain: the base file is the whole volume, its size one read of
            # its head away; exact, so `ls -l` asks nothing more of it. A damaged head is found
            # by `stat` (the volume is still listed).
            try:
                return base_file_stat(base, image_size(self.dir, name, base, None), exact=True)
            except VfsnapError:
                pass
        return base_file_stat(base)

    def open_volumes(self) -> list[Volume]:
        return list(self._volumes.values())

    def met_volumes(self) -> list[str]:
        """Names with a sidecar: the volumes vfsnap has met (from one listdir, no index)."""
        return sorted(n[: -len(SIDECAR_SUFFIX)] for n in self.dir.listdir() if n.endswith(SIDECAR_SUFFIX))

    def volumes_with_journal(self) -> list[Volume]:
        """Volumes whose sidecar holds unfinished operations (found by reading sidecars)."""
        found = []
        for name in self.met_volumes():
            try:
                data = self.dir.read_small(sidecar_file(name))
                if data is None or b'"journal"' not in data or not self.is_volume(name):
                    continue
                found.append(self.volume(name))
            except VfsnapError as exc:
                log.error("%s: cannot resume its operations: %s", name, exc)
        return found

    def may_need_recovery(self, name: str) -> bool:
        """Could volume `name` hold a crash's leftovers not yet seen to (the mount's recovery
        is still under way, and the volume has a sidecar, where a journal would be)?"""
        state = self.index.state
        return self.recovery_pending and (state is None or name in state.with_sidecar)

    def recover(self) -> None:
        """Finish or roll back what a crash interrupted (renames, snapshot creation; images
        left dirty), all at once (`vfsnap check`, tests). The mount runs `recovery()` in the
        background instead, after it answers."""
        for _ in self.recovery(every_volume=True):
            pass

    def recovery(self, *, every_volume: bool = False):
        """The steps of `recover`, one volume per step (a generator), so that the mount can
        answer first and run them between requests. Volumes already in use here are left to
        their users: a journal is finished by the first chain change (`needs_recovery`), a dirty
        image has its refcounts rebuilt before its first write (`prepare_for_writing`)."""
        from vfsnap.share.clone import recover_share
        from vfsnap.share.rename import pending_renames, run_rename
        from vfsnap.share.snapshots import recover

        self.recovery_pending = True
        try:
            for line in recover_share(self):
                log.info("%s", line)
                self.index.invalidate()
            for entry in pending_renames(self):
                log.info("%s: finishing the interrupted rename of %s to %s", self.path, entry.old, entry.new)
                try:
                    run_rename(self, entry)
                except VfsnapError as exc:  # a plan that does not fit the files: the others go on
                    log.error("%s: renaming %s to %s cannot be finished: %s", self.path, entry.old, entry.new, exc)
                self.index.invalidate()
            yield
            for volume in self.volumes_with_journal():
                if volume.open_count:
                    continue
                with _held_by_us(volume) as ours:
                    if not ours:
                        continue  # another host is working on it right now
                    try:
                        for line in recover(volume):
                            log.info("%s", line)
                        volume.needs_recovery = False
                    except VfsnapError as exc:
                        log.error("%s: recovery failed: %s", volume.name, exc)
                yield
            self.recovery_pending = False
            # A mount writes only volumes it has met (recorded at their first open: they have a
            # sidecar); what another program (QEMU) left dirty, it repairs itself. `recover`
            # (check, the library) looks at every volume, which may have been written unrecorded.
            for name in self.volume_names() if every_volume else self.met_volumes():
                used = self._volumes.get(name)
                if used is not None and (used.open_count or used.has_open_images):
                    continue
                if not is_volume_name(name) or not self.dir.exists(name):
                    continue
                volume = used or Volume(self, name)
                try:
                    if volume.dirty_images() and self.is_volume(name):
                        with _held_by_us(volume) as ours:
                            if ours:  # a dirty image another host is writing is not a crash's leftover
                                volume.repair_dirty_images()
                except VfsnapError as exc:
                    log.error("%s: cannot repair after a crash: %s", name, exc)
                finally:
                    if used is None:
                        volume.close()  # met for the sweep only: nothing of it stays in memory
                yield
        finally:
            self.recovery_pending = False

    def flush_all(self) -> None:
        for volume in list(self._volumes.values()):
            if volume.dirty:
                volume.flush()

    async def rename_volume(self, old: str, new: str) -> None:
        from vfsnap.share.rename import rename_volume

        try:
            await rename_volume(self, old, new)
        finally:
            self.index.invalidate()  # done, undone or half done: look again

    def forget_volume(self, name: str) -> None:
        self._volumes.pop(name, None)

    def _forget(self, name: str) -> None:
        volume = self._volumes.pop(name, None)
        if volume is not None and not volume.open_count:
            volume.close()

    # -- creating and removing volumes ----------------------------------------------------

    def create_volume(self, name: str, size: int = 0, *, mode: int = 0o644, owner: tuple[int, int] | None = None) -> Volume:
        """Create the base file of a new volume in the mount's format, and record the format."""
        name = check_volume_name(name)
        if self.read_only:
            raise ReadOnly("read-only mount")
        for file_name in (name, info_file(name), sidecar_file(name)):
            if self.dir.exists(file_name):
                raise AlreadyExists(f"{file_name} already exists on {self.path}")
        image_format = self.options.volume_format
        size = round_size(size)  # whole sectors, as QEMU sees any disk
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o7777,
                         dir_fd=self.dir.fd)
        except FileExistsError:
            raise AlreadyExists(f"{name} already exists on {self.path}") from None
        try:
            try:
                if owner is not None and os.geteuid() == 0:
                    os.fchown(fd, *owner)  # the volume belongs to whoever created it
                if image_format == "qcow2":
                    create_qcow2(fd, size)
                elif size:
                    if self.options.thick:
                        os.posix_fallocate(fd, 0, size)
                    else:
                        os.ftruncate(fd, size)
                    os.fsync(fd)
            finally:
                os.close(fd)
            self.dir.write_atomic(sidecar_file(name), Sidecar(base_format=image_format).to_json())
        except OSError as exc:
            self.dir.unlink(name)
            raise share_error(exc, f"creating volume {name} on {self.path}") from None
        except VfsnapError:
            self.dir.unlink(name)
            raise
        log.info("created volume %s (%s, %d bytes) on %s", name, image_format, size, self.path)
        self.index.added(name)
        volume = self._volumes[name] = Volume(self, name)
        return volume

    async def remove_volume(self, name: str) -> None:
        """Delete a volume's base, overlays, `.info` and sidecar (EBUSY with snapshots or open);
        the files are removed as one data call of the share (on its threads on a network share)."""
        if self.read_only:
            raise ReadOnly("read-only mount")
        volume = self.volume(name)
        if volume.open_count:
            raise Busy(f"volume {name} is open")
        info = volume.info()
        from vfsnap.share.clone import pinned_by

        clone = pinned_by(self, volume.files())
        if clone is not None:
            raise Busy(f"volume {name}: clone {clone} still reads from it (its copy is running; see vfsnap status)")
        if info.snapshots:
            raise Busy(f"volume {name} has snapshots; delete them first")
        files = [info.active] if info.active != name else []
        files += [name, info_file(name), sidecar_file(name)]
        volume.close()
        self._volumes.pop(name, None)
        await self.io.write(f"remove {name}", self._unlink_all, files)
        self.index.removed(name)
        log.info("removed volume %s from %s", name, self.path)

    def _unlink_all(self, files: list[str]) -> None:
        for file_name in files:
            self.dir.unlink(file_name)
        self.dir.fsync()

    # -- capacity -------------------------------------------------------------------------

    def capacity(self) -> Capacity:
        return Capacity.of(self.dir.statvfs())


NETWORK_FILESYSTEMS = frozenset({"nfs", "nfs4", "fuse.glusterfs", "glusterfs", "ceph", "cifs", "smb3", "9p"})


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding `path` ("" when unknown)."""
    entry = mount_holding(path)
    return "" if entry is None else entry.kind


@contextlib.contextmanager
def _held_by_us(volume):
    """Both share locks of a volume for a moment, or False when another host holds one."""
    from vfsnap.share.locks import CHAIN, WRITER

    locks = volume.locks
    ours = locks.try_lock(CHAIN)
    if ours and not locks.try_lock(WRITER):
        locks.unlock(CHAIN)
        ours = False
    try:
        yield ours
    finally:
        if ours:
            locks.unlock(WRITER)
            locks.unlock(CHAIN)


def open_share(path: str, options: MountOptions, *, recover: bool = True) -> Share:
    """Open a share; with `recover=False` the caller runs `share.recovery()` itself (the mount
    does, in the background, so that it answers without reading any volume's files)."""
    share = Share(path, options)
    if not share.read_only:
        for name in share.dir.remove_stale_temp_files():
            log.info("%s: removed stale temporary file %s", share.path, name)
        if recover:
            share.recover()
        else:
            share.recovery_pending = True
    return share


__all__ = ["Capacity", "NotFound", "Share", "open_share"]
