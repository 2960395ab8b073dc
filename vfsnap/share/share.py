"""A share: one directory holding volumes in Cinder's remotefs layout.

Which files are volumes: every regular file with a valid volume name that is not a `.info`
file, not a vfsnap sidecar or temporary file, and not named as an image by any volume's
`.info` (overlays `<vol>.<snap>` are listed there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat

import attrs

from vfsnap.errors import AlreadyExists, Busy, NotFound, ReadOnly, VfsnapError, share_error
from vfsnap.chain.view import MapBudget
from vfsnap.format import TableCache
from vfsnap.format.create import create_qcow2, round_size
from vfsnap.names import (
    INFO_SUFFIX,
    SIDECAR_SUFFIX,
    check_volume_name,
    info_file,
    is_snapshot_name,
    is_volume_name,
    sidecar_file,
)
from vfsnap.options import MountOptions
from vfsnap.share.files import ShareDir
from vfsnap.share.info import Sidecar, parse_info, parse_sidecar
from vfsnap.share.mounts import coherence_warnings, mount_holding
from vfsnap.share.volume import Volume

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
        self.table_cache = table_cache or TableCache(options.table_cache_size)
        # Resolved maps of every view: bounded by the same size as the table cache.
        self.map_budget = MapBudget(options.table_cache_size)
        self._volumes: dict[str, Volume] = {}
        self.rename_unfinished = False  # a rename failed midway; the background task retries
        # NFS and FUSE filesystems (GlusterFS) cache across opens, not across hosts' writes.
        self.network = filesystem_type(self.path) in NETWORK_FILESYSTEMS
        self.dir.uncached_reads = self.network  # `.info` and sidecars past the client's caches
        if self.network:
            for warning in coherence_warnings(self.path):
                log.warning("%s", warning)
        self._overlay_cache: dict[str, tuple[tuple, frozenset[str]]] = {}

    @property
    def read_only(self) -> bool:
        return self.options.read_only

    def close(self) -> None:
        for volume in self._volumes.values():
            try:
                volume.close()
            except Exception:  # noqa: BLE001 - close the others all the same
                log.exception("%s: closing", volume.name)
        self._volumes.clear()
        self.dir.close()

    # -- which files are volumes ----------------------------------------------------------

    def _cached_names(self, file_name: str, parse) -> frozenset[str] | None:
        """Image names a small document names (cached by the file's identity and mtime);
        None when the document exists but cannot be parsed."""
        st = self.dir.stat(file_name)
        if st is None:
            return frozenset()
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._overlay_cache.get(file_name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            names = frozenset(parse(self.dir.read_small(file_name) or b"{}", file_name))
        except VfsnapError as exc:
            log.warning("%s", exc)
            names = None
        self._overlay_cache[file_name] = (stamp, names)
        return names

    def _overlays_of(self, volume: str) -> frozenset[str] | None:
        """The files of `volume` other than its base: what its `.info` names, and what its
        journal names (a snapshot another host is taking: file made, not yet in `.info`). None when its `.info` is unreadable: then every
        `<volume>.<snap>` file is taken to be its own, never a volume of its own."""

        def from_info(data: bytes, name: str):
            info = parse_info(data, name=name)
            return {info.active, *info.snapshots.values()}

        def from_journal(data: bytes, name: str):
            return {e.get("overlay") for e in parse_sidecar(data, name=name).journal} - {None}

        info_names = self._cached_names(volume + INFO_SUFFIX, from_info)
        journal_names = self._cached_names(sidecar_file(volume), from_journal) or frozenset()
        if info_names is None:
            return None
        return (info_names | journal_names) - {volume}

    def _owned_by(self, owner: str, name: str) -> bool:
        overlays = self._overlays_of(owner)
        if overlays is None:
            return name.startswith(owner + ".") and is_snapshot_name(name[len(owner) + 1 :])
        return name in overlays

    def volume_names(self) -> list[str]:
        from vfsnap.share.rename import pending_renames

        entries = self.dir.listdir()
        owners = set()
        for name in entries:
            for suffix in (INFO_SUFFIX, SIDECAR_SUFFIX):
                if name.endswith(suffix):
                    owners.add(name[: -len(suffix)])
        renaming: set[str] = set()
        for entry in pending_renames(self):  # files of a rename under way: never volumes
            renaming |= (set(entry["files"]) | set(entry["files"].values())) - {entry["from"], entry["to"]}
        volumes = []
        for name in entries:
            if not is_volume_name(name) or name in renaming:
                continue
            if any(self._owned_by(owner, name) for owner in owners if owner != name):
                continue
            st = self.dir.stat(name)
            if st is not None and stat.S_ISREG(st.st_mode):
                volumes.append(name)
        volumes.sort()
        return volumes

    def is_volume(self, name: str) -> bool:
        if not is_volume_name(name):
            return False
        st = self.dir.stat(name)
        if st is None or not stat.S_ISREG(st.st_mode):
            return False
        # An overlay of another volume is not a volume: look only at the volumes that could
        # own it (volume `a` for file `a.b`, `a.b` for `a.b.c`, ...), and at a rename under way.
        parts = name.split(".")
        for i in range(1, len(parts)):
            if self._owned_by(".".join(parts[:i]), name):
                return False
        from vfsnap.share.rename import rename_claims

        return not rename_claims(self, name)

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

    def open_volumes(self) -> list[Volume]:
        return list(self._volumes.values())

    def volumes_with_journal(self) -> list[Volume]:
        """Volumes whose sidecar holds unfinished operations (found by reading sidecars)."""
        found = []
        for name in self.volume_names():
            try:
                data = self.dir.read_small(sidecar_file(name))
                if data is None or b'"journal"' not in data:
                    continue
                found.append(self.volume(name))
            except VfsnapError as exc:
                log.error("%s: cannot resume its operations: %s", name, exc)
        return found

    def recover(self) -> None:
        """Finish or roll back what a crash interrupted (snapshot creation; renames)."""
        from vfsnap.share.rename import pending_renames, run_rename
        from vfsnap.share.snapshots import recover

        for entry in pending_renames(self):
            log.info("%s: finishing the interrupted rename of %s to %s", self.path, entry["from"], entry["to"])
            run_rename(self, entry)
        for volume in self.volumes_with_journal():
            with _held_by_us(volume) as ours:
                if not ours:
                    continue  # another host is working on it right now
                try:
                    for line in recover(volume):
                        log.info("%s", line)
                except VfsnapError as exc:
                    log.error("%s: recovery failed: %s", volume.name, exc)
        for name in self.volume_names():
            try:
                volume = self.volume(name)
                with _held_by_us(volume) as ours:
                    if ours:  # a dirty image another host is writing is not a crash's leftover
                        volume.repair_dirty_images()
            except VfsnapError as exc:
                log.error("%s: cannot repair after a crash: %s", name, exc)

    def flush_all(self) -> None:
        for volume in list(self._volumes.values()):
            if volume.dirty:
                volume.flush()

    def rename_volume(self, old: str, new: str) -> None:
        from vfsnap.share.rename import rename_volume

        rename_volume(self, old, new)

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
        return self.volume(name)

    def remove_volume(self, name: str) -> None:
        """Delete a volume's base, overlays, `.info` and sidecar (EBUSY with snapshots or open)."""
        if self.read_only:
            raise ReadOnly("read-only mount")
        volume = self.volume(name)
        if volume.open_count:
            raise Busy(f"volume {name} is open")
        info = volume.info()
        if info.snapshots:
            raise Busy(f"volume {name} has snapshots; delete them first")
        files = [info.active] if info.active != name else []
        files += [name, info_file(name), sidecar_file(name)]
        volume.close()
        self._volumes.pop(name, None)
        for file_name in files:
            self.dir.unlink(file_name)
        self.dir.fsync()
        log.info("removed volume %s from %s", name, self.path)

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


def open_share(path: str, options: MountOptions) -> Share:
    share = Share(path, options)
    if not share.read_only:
        for name in share.dir.remove_stale_temp_files():
            log.info("%s: removed stale temporary file %s", share.path, name)
        share.recover()
    return share


__all__ = ["Capacity", "NotFound", "Share", "open_share"]
