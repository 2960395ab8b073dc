"""The FUSE operations: the tree of DESIGN.md section 2 translated into calls on the pool.

Handlers stay thin: they find the node an inode names, call the share/chain layers, and fill in
attributes. Errors cross into FUSE in one place (`fuse_errors`): a `VfsnapError` becomes its
errno, anything else is logged and becomes EIO, because any other exception escaping a pyfuse3
handler would abort the whole mount.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
import stat
import time

import pyfuse3

import trio

from vfsnap.errors import NotFound, VfsnapError
from vfsnap.fs import commands, control
from vfsnap.fs.inodes import CONTROL, ROOT, SNAPSHOTS, VOLUMES, InodeTable
from vfsnap.fs.tree import (ControlFile, Directory, FixedNode, LatestLink, Node, RootDir, SnapshotDir, SnapshotFile,
                            SnapshotNode, SnapshotsDir, VolumeFile, VolumesDir, VolumeSnapshotsDir, belongs_to, parent)
from vfsnap.names import is_snapshot_name
from vfsnap.share import changes, snapshots
from vfsnap.share.pool import Pool

log = logging.getLogger(__name__)

CONTROL_NAME = ".vfsnap"
LATEST = "latest"
# Others can change the share (Cinder, another host): keep kernel caches short.
ENTRY_TIMEOUT = 1.0
ATTR_TIMEOUT = 1.0
DIR_MODE = stat.S_IFDIR | 0o755
RO_BITS = ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
# The mount's recovery runs in slices this long between requests.
RECOVERY_SLICE_SECONDS = 0.005


def directory_mode(file_mode: int) -> int:
    """Permission bits for a directory standing for a file: read gives r-x, write gives w."""
    mode = stat.S_IMODE(file_mode) & 0o666
    for read_bit, exec_bit in ((stat.S_IRUSR, stat.S_IXUSR), (stat.S_IRGRP, stat.S_IXGRP), (stat.S_IROTH, stat.S_IXOTH)):
        if mode & read_bit:
            mode |= exec_bit
    return mode


def fuse_error(exc: BaseException, where: str) -> pyfuse3.FUSEError:
    """The one place where exceptions become errnos for the kernel."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, VfsnapError):
        if exc.errno == errno.EIO:
            log.error("%s: %s", where, exc)
        else:
            log.debug("%s: %s", where, exc)
        return pyfuse3.FUSEError(exc.errno)
    if isinstance(exc, OSError) and exc.errno:
        log.error("%s: %s", where, exc)
        return pyfuse3.FUSEError(exc.errno)
    log.exception("%s: unexpected error", where)
    return pyfuse3.FUSEError(errno.EIO)


def is_stale(exc: BaseException) -> bool:
    """ESTALE from the share: a file another host replaced (retried once, never answered)."""
    return isinstance(exc, (OSError, VfsnapError)) and exc.errno == errno.ESTALE


# Handlers that change nothing, so that a second run after ESTALE is safe.
RETRIED_ON_STALE = frozenset({"lookup", "getattr", "readlink", "opendir", "readdir", "open", "getxattr",
                              "listxattr", "statfs"})


def handler(func):
    """Wrap a handler so that only FUSEError leaves it; one that changes nothing is run once
    more after ESTALE, with the share's names looked up afresh."""
    retried = func.__name__ in RETRIED_ON_STALE

    @functools.wraps(func)
    async def wrapper(self, *args):
        try:
            return await func(self, *args)
        except Exception as exc:  # noqa: BLE001 - this is the error boundary
            if not (retried and is_stale(exc)):
                raise fuse_error(exc, func.__name__) from None
        try:
            self.pool.forget_stale_handles()
            return await func(self, *args)
        except Exception as exc:  # noqa: BLE001 - this is the error boundary
            raise fuse_error(exc, func.__name__) from None

    return wrapper


class Handle:
    __slots__ = ("view", "volume", "node", "writable", "snapshot", "sync")

    def __init__(self, view, volume, node: Node, writable=False, sync=False):
        self.view = view
        self.volume = volume
        self.node = node
        self.writable = writable
        self.snapshot = node.snapshot if isinstance(node, SnapshotFile) else None
        # O_DSYNC/O_SYNC: with direct_io the kernel sends no fsync after such writes, so
        # every write of this handle is made durable before it is acknowledged.
        self.sync = sync


class DirHandle:
    """An open directory: the entries listed at its first readdir, served in batches."""

    __slots__ = ("node", "entries", "offsets")

    def __init__(self, node: Node):
        self.node = node
        self.entries: list[tuple[int, str, Node]] | None = None
        self.offsets: list[int] = []


class VfsnapOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, pool: Pool):
        super().__init__()
        self.pool = pool
        self.inodes = InodeTable()
        self._handles: dict[int, Handle] = {}
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_fh = 1
        self._mount_time_ns = time.time_ns()
        self._nursery: trio.Nursery | None = None
        self.trio_token = None  # the loop's, for reads answered on FUSE reader threads

    # -- attributes -----------------------------------------------------------------------

    def _entry(self, ino: int, node: Node, *, listing: bool = False) -> pyfuse3.EntryAttributes:
        """The attributes of `node`. For a listing's entries (`listing`, READDIRPLUS) a
        volume not in use gets what its base file says, marked as expiring at once, so that a
        `stat` asks again and gets the exact figures (see `Volume.stat`)."""
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.entry_timeout = ENTRY_TIMEOUT
        attr.attr_timeout = ATTR_TIMEOUT
        attr.st_blksize = 65536
        now = self._mount_time_ns
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = now
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        if isinstance(node, RootDir | VolumesDir | SnapshotsDir):
            attr.st_mode = DIR_MODE
            attr.st_nlink = 2
        elif isinstance(node, VolumeSnapshotsDir | SnapshotDir):
            # Whoever may write the volume may take and delete its snapshots: the directory
            # gets the volume's owner and its permission bits (r -> r-x, w -> w).
            base = self.pool.listed_stat(node.volume)
            attr.st_mode = stat.S_IFDIR | directory_mode(base.mode)
            attr.st_uid, attr.st_gid = base.uid, base.gid
            attr.st_nlink = 2
            if isinstance(node, SnapshotDir):
                volume = self.pool.volume(node.volume)
                created_ns = int(volume.snapshot_created(node.snapshot) * 1e9)
                attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = created_ns
                attr.st_mode &= RO_BITS
        elif isinstance(node, ControlFile):
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
        elif isinstance(node, LatestLink):
            volume = self.pool.volume(node.volume)
            target = volume.latest_snapshot()
            if target is None:
                raise NotFound(f"volume {node.volume} has no snapshot")
            attr.st_mode = stat.S_IFLNK | 0o777
            attr.st_nlink = 1
            attr.st_size = len(target.encode())
        elif isinstance(node, VolumeFile):
            # Cheap for a volume not in use: no image opened, nothing written (Volume.stat).
            st = self.pool.listed_stat(node.volume) if listing else self.pool.volume(node.volume).stat()
            if not st.exact:
                attr.attr_timeout = 0
            attr.st_mode = stat.S_IFREG | stat.S_IMODE(st.mode)
            attr.st_nlink = 1
            attr.st_uid, attr.st_gid = st.uid, st.gid
            attr.st_size = st.size
            attr.st_blocks = (st.allocated + 511) // 512
            attr.st_mtime_ns, attr.st_ctime_ns, attr.st_atime_ns = st.mtime_ns, st.ctime_ns, st.atime_ns
        elif isinstance(node, SnapshotFile):
            volume = self.pool.volume(node.volume)
            base = volume.base_stat()
            view = volume.snapshot_view(node.snapshot)
            attr.st_mode = stat.S_IFREG | (stat.S_IMODE(base.st_mode) & RO_BITS)
            attr.st_nlink = 1
            attr.st_uid, attr.st_gid = base.st_uid, base.st_gid
            attr.st_size = view.size
            attr.st_blocks = (volume.allocated_bytes(view) + 511) // 512
            created_ns = int(volume.snapshot_created(node.snapshot) * 1e9)
            attr.st_mtime_ns = attr.st_ctime_ns = attr.st_atime_ns = created_ns
        else:  # pragma: no cover
            raise pyfuse3.FUSEError(errno.ENOENT)
        return attr

    def _check_exists(self, node: Node) -> None:
        """Raise ENOENT if the object `node` names no longer exists."""
        if isinstance(node, FixedNode):
            return
        volume = self.pool.volume(node.volume)
        if isinstance(node, SnapshotNode) and not volume.has_snapshot(node.snapshot):
            raise NotFound(f"volume {node.volume} has no snapshot {node.snapshot}")

    def _lookup_node(self, directory: Node, name: str) -> Node:
        """The node `name` names in `directory`, if the share has it."""
        if isinstance(directory, RootDir):
            if name == "volumes":
                return VolumesDir()
            if name == "snapshots":
                return SnapshotsDir()
            if name == CONTROL_NAME:
                return ControlFile()
        elif isinstance(directory, VolumesDir):
            self.pool.volume(name)
            return VolumeFile(name)
        elif isinstance(directory, SnapshotsDir):
            self.pool.volume(name)
            return VolumeSnapshotsDir(name)
        elif isinstance(directory, VolumeSnapshotsDir):
            volume = self.pool.volume(directory.volume)
            if name == LATEST:
                if volume.latest_snapshot() is not None:
                    return LatestLink(directory.volume)
            elif is_snapshot_name(name) and volume.has_snapshot(name):
                return SnapshotDir(directory.volume, name)
        elif isinstance(directory, SnapshotDir):
            self._check_exists(directory)
            if name == directory.volume:
                return SnapshotFile(directory.volume, directory.snapshot)
        raise NotFound(name)

    @handler
    async def lookup(self, parent_inode, name, ctx=None):
        directory = self.inodes.node(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            node = directory
        elif text == "..":
            node = parent(directory)
        else:
            if len(name) > 255:
                raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
            node = self._lookup_node(directory, text)
        ino = self.inodes.ino(node)
        attr = self._entry(ino, node)
        if text not in (".", ".."):
            self.inodes.looked_up(ino)
        return attr

    @handler
    async def getattr(self, inode, ctx=None):
        node = self.inodes.node(inode)
        if not self.inodes.is_current(inode):
            raise NotFound("deleted")
        self._check_exists(node)
        return self._entry(inode, node)

    async def forget(self, inode_list):
        for ino, count in inode_list:
            try:
                self.inodes.forget(ino, count)
            except Exception:  # noqa: BLE001 - forget must never raise
                log.exception("forget(%d)", ino)

    @handler
    async def readlink(self, inode, ctx):
        node = self.inodes.node(inode)
        if not isinstance(node, LatestLink):
            raise pyfuse3.FUSEError(errno.EINVAL)
        target = self.pool.volume(node.volume).latest_snapshot()
        if target is None:
            raise NotFound("no snapshot")
        return target.encode()

    # -- directories ----------------------------------------------------------------------

    @handler
    async def opendir(self, inode, ctx):
        node = self.inodes.node(inode)
        if not isinstance(node, Directory):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        self._check_exists(node)
        fh = self._next_fh
        self._next_fh += 1
        self._dir_handles[fh] = DirHandle(node)
        return fh

    def _children(self, directory: Node) -> list[tuple[str, Node]]:
        """What `directory` lists (`.vfsnap` is found by name, never listed)."""
        if isinstance(directory, RootDir):
            return [("volumes", VolumesDir()), ("snapshots", SnapshotsDir())]
        if isinstance(directory, VolumesDir):
            return [(name, VolumeFile(name)) for name in self.pool.volume_names()]
        if isinstance(directory, SnapshotsDir):
            return [(name, VolumeSnapshotsDir(name)) for name in self.pool.volume_names()]
        if isinstance(directory, VolumeSnapshotsDir):
            snapshots = self.pool.volume(directory.volume).snapshots()
            children: list[tuple[str, Node]] = [(snap, SnapshotDir(directory.volume, snap)) for snap in snapshots]
            if snapshots:
                children.append((LATEST, LatestLink(directory.volume)))
            return children
        if isinstance(directory, SnapshotDir):
            self._check_exists(directory)
            return [(directory.volume, SnapshotFile(directory.volume, directory.snapshot))]
        return []

    @handler
    async def readdir(self, fh, start_id, token):
        handle = self._dir_handles[fh]
        # Entries in inode order, resumed by inode number: stable under concurrent
        # creation (new names get higher numbers) and deletion (nothing shifts).
        # Offsets start at ino + 3 to stay clear of the NFS-special cookies 1 and 2.
        # The list is made once per opendir (and again by a rewinddir) from the share's
        # index, so that each batch the kernel asks for costs only its own entries.
        if handle.entries is None or start_id == 0:
            entries = [(self.inodes.ino(child), name, child) for name, child in self._children(handle.node)]
            entries.sort()
            handle.entries = entries
            handle.offsets = [ino + 3 for ino, _, _ in entries]
        entries = handle.entries
        for i in range(bisect.bisect_right(handle.offsets, start_id), len(entries)):
            ino, name, child = entries[i]
            if not self.inodes.is_current(ino):
                continue  # deleted or renamed through the mount since opendir
            try:
                attr = self._entry(ino, child, listing=True)
            except (VfsnapError, OSError) as exc:
                # One broken volume must not hide the others: list it, it fails on use.
                log.warning("listing %s: %s", name, exc)
                attr = pyfuse3.EntryAttributes()
                attr.st_ino = ino
                attr.st_mode = stat.S_IFREG | 0o000
                attr.attr_timeout = attr.entry_timeout = 0  # a stat asks again (a hung share may be back)
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, ino + 3):
                return
            self.inodes.looked_up(ino)

    async def releasedir(self, fh):
        self._dir_handles.pop(fh, None)

    # -- files ----------------------------------------------------------------------------

    @handler
    async def open(self, inode, flags, ctx):
        node = self.inodes.node(inode)
        if not self.inodes.is_current(inode):
            raise NotFound("deleted")
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if isinstance(node, ControlFile):
            if writing:
                raise pyfuse3.FUSEError(errno.EACCES)
            return pyfuse3.FileInfo(fh=self._new_handle(Handle(None, None, node)))
        if not isinstance(node, VolumeFile | SnapshotFile):
            raise pyfuse3.FUSEError(errno.EISDIR)
        volume = self.pool.volume(node.volume)
        if isinstance(node, SnapshotFile):
            if writing:
                raise pyfuse3.FUSEError(errno.EROFS)
            view = volume.snapshot_view(node.snapshot)
            keep_cache = True  # a snapshot never changes (invariant 2)
        else:
            if writing and self.pool.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            view = volume.live_view()
            if flags & os.O_TRUNC and view.size:
                raise pyfuse3.FUSEError(errno.EPERM)  # truncating a disk to zero: shrinking
            keep_cache = False  # another host may have written it since
        # An O_DIRECT open (a hypervisor with cache=none, fio direct=1) gets FUSE's direct_io:
        # no page cache, and no round trip per write: through the page cache path the kernel
        # asks getxattr("security.capability") before each write (file_remove_privs) once a
        # filesystem has xattrs; measured: 4 KiB writes 6.6k -> 11.3k IOPS. Buffered opens keep
        # the page cache, so that shared mmap works. Snapshot files always keep it.
        direct = bool(flags & os.O_DIRECT)
        sync = direct and bool(writing) and bool(flags & (os.O_DSYNC | os.O_SYNC))
        return await self._open_handle(Handle(view, volume, node, bool(writing), sync), keep_cache, direct_io=direct)

    async def _open_handle(self, handle: Handle, keep_cache: bool, direct_io: bool = False) -> pyfuse3.FileInfo:
        await handle.volume.opened_async(handle.snapshot, writing=handle.writable)
        return pyfuse3.FileInfo(fh=self._new_handle(handle), keep_cache=keep_cache, direct_io=direct_io)

    def _new_handle(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    async def read(self, fh, off, size):
        # Hot path: no decorator frame; the same error boundary inline. What the maps and the
        # page cache answer is answered here; the rest waits on the share's threads, and
        # other requests go on meanwhile (vfsnap/share/io.py).
        try:
            handle = self._handles[fh]
            data = handle.view.read_cached(off, size)
            if data is not None:
                return data
            return await handle.volume.read(handle.view, off, size)
        except Exception as exc:  # noqa: BLE001 - error boundary
            handle = self._handles.get(fh)
            if handle is not None and handle.volume is not None and is_stale(exc):
                try:  # an image replaced on the share: once more, by name
                    await handle.volume.forget_stale_images_async()
                    return await handle.volume.read(handle.view, off, size)
                except Exception as again:  # noqa: BLE001 - error boundary
                    exc = again
            raise fuse_error(exc, f"read {handle.node if handle else fh} at {off}+{size}") from None

    def read_now(self, fh, off, size):
        """A read on a FUSE reader thread (vfsnap/fs/relay.py): its data, or None for `read`
        on the loop to answer it (errors included)."""
        handle = self._handles.get(fh)
        if handle is None or handle.volume is None:
            return None
        return handle.volume.read_now(handle.view, off, size, self.trio_token)

    def write_now(self, fh, off, buf):
        """A write on a FUSE reader thread (vfsnap/fs/relay.py): the bytes written, or None for
        `write` on the loop to answer it. Its errors are answered from here (FUSEError): the
        write may have been partly done, so it is not handed on."""
        handle = self._handles.get(fh)
        if handle is None or handle.volume is None or not handle.writable or handle.sync:
            return None
        try:
            return handle.volume.write_now(handle.view, off, buf, self.trio_token)
        except Exception as exc:  # noqa: BLE001 - error boundary
            raise fuse_error(exc, f"write {handle.node} at {off}+{len(buf)}") from None

    async def write(self, fh, off, buf):
        # Hot path: no decorator frame; the same error boundary inline.
        try:
            handle = self._handles[fh]
            if not handle.writable:
                raise pyfuse3.FUSEError(errno.EBADF)
            written = await handle.volume.write(handle.view, off, buf)
            if handle.sync:
                await handle.volume.flush_async()
            return written
        except Exception as exc:  # noqa: BLE001 - error boundary
            handle = self._handles.get(fh)
            raise fuse_error(exc, f"write {handle.node if handle else fh} at {off}+{len(buf)}") from None

    async def release(self, fh):
        # The kernel discards errors of release: log them, whatever the errno, or nobody hears.
        handle = self._handles.pop(fh, None)
        if handle is None or handle.volume is None:
            return
        try:
            if handle.writable and handle.volume.writers == 1:
                await handle.volume.close_writes_async()  # last writer gone: nothing stays only in memory
        except Exception as exc:  # noqa: BLE001 - error boundary
            if isinstance(exc, VfsnapError):
                log.error("release of %s: %s", handle.node.volume, exc)
            else:
                log.exception("release of %s", handle.node.volume)
        finally:
            try:
                handle.volume.released(handle.snapshot, writing=handle.writable)
            except Exception:  # noqa: BLE001
                log.exception("releasing %s", handle.node.volume)

    @handler
    async def flush(self, fh):
        # close(2): write back what this file wrote, so errors reach the closing program.
        handle = self._handles.get(fh)
        if handle is not None and handle.writable:
            await handle.volume.flush_async()

    @handler
    async def fsync(self, fh, datasync):
        handle = self._handles.get(fh)
        if handle is not None and handle.volume is not None:
            await handle.volume.flush_async()

    # -- namespace operations vfsnap refuses deliberately -----------------------------------

    def _refuse_create(self, parent_inode: int) -> None:
        directory = self.inodes.node(parent_inode)
        if isinstance(directory, SnapshotsDir | VolumeSnapshotsDir | SnapshotDir):
            raise pyfuse3.FUSEError(errno.EPERM)
        if self.pool.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        raise pyfuse3.FUSEError(errno.EPERM)

    @handler
    async def mkdir(self, parent_inode, name, mode, ctx):
        directory = self.inodes.node(parent_inode)
        if not isinstance(directory, VolumeSnapshotsDir):
            self._refuse_create(parent_inode)
        if self.pool.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if len(name) > 255:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        text = os.fsdecode(name)
        await changes.take_snapshot(self.pool.volume(directory.volume), text)
        child = SnapshotDir(directory.volume, text)
        self.inodes.retire(child)
        self.inodes.retire(SnapshotFile(directory.volume, text))
        ino = self.inodes.ino(child)
        attr = self._entry(ino, child)
        self.inodes.looked_up(ino)
        return attr

    @handler
    async def rmdir(self, parent_inode, name, ctx):
        directory = self.inodes.node(parent_inode)
        if not isinstance(directory, VolumeSnapshotsDir):
            raise pyfuse3.FUSEError(errno.EPERM)
        if self.pool.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        text = os.fsdecode(name)
        if text == LATEST or not is_snapshot_name(text):
            raise pyfuse3.FUSEError(errno.ENOENT if text != LATEST else errno.ENOTDIR)
        volume = self.pool.volume(directory.volume)
        await changes.delete_snapshot(volume, text)
        self.inodes.retire(SnapshotDir(directory.volume, text))
        self.inodes.retire(SnapshotFile(directory.volume, text))
        self.start_merges(volume)

    async def _finish_journals(self) -> None:
        """Clear journal entries of operations that completed but could not record it (the
        share failed right after their commit point), without waiting for the next mount."""
        for volume in self.pool.volumes_needing_recovery():
            try:
                await changes.finish_journal(volume)
            except VfsnapError as exc:
                log.warning("%s: journal still cannot be cleared: %s", volume.name, exc)

    def start_merges(self, volume) -> None:
        """Run the volume's journalled deletions in the background (or at the next mount)."""
        if self._nursery is not None and not volume.runner_active:
            self._nursery.start_soon(snapshots.run_pending, volume)
        commands.start_copy(self, volume)  # a clone's copy (resumed at mount)

    @property
    def running(self) -> bool:
        """Whether the mount's background tasks can be started (`start_background`)."""
        return self._nursery is not None

    def start_background(self, task) -> None:
        """Run `task()` among the mount's background tasks (only while `running`)."""
        assert self._nursery is not None
        self._nursery.start_soon(task)

    @handler
    async def create(self, parent_inode, name, mode, flags, ctx):
        directory = self.inodes.node(parent_inode)
        if not isinstance(directory, VolumesDir) or self.pool.read_only:
            self._refuse_create(parent_inode)
        text = os.fsdecode(name)
        volume = self.pool.create_volume(text, 0, mode=stat.S_IMODE(mode) & ~ctx.umask, owner=(ctx.uid, ctx.gid))
        child = VolumeFile(text)
        self.inodes.retire(child)  # a fresh inode: never the cached pages of an older one
        ino = self.inodes.ino(child)
        attr = self._entry(ino, child)
        self.inodes.looked_up(ino)
        info = await self._open_handle(Handle(volume.live_view(), volume, child, True), keep_cache=False)
        return info, attr

    @handler
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @handler
    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @handler
    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    @handler
    async def unlink(self, parent_inode, name, ctx):
        directory = self.inodes.node(parent_inode)
        if not isinstance(directory, VolumesDir):
            raise pyfuse3.FUSEError(errno.EROFS if isinstance(directory, SnapshotDir) else errno.EPERM)
        if self.pool.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        text = os.fsdecode(name)
        await changes.remove_volume(self.pool, text)
        self._retire_volume(text)
        commands.start_held_merges(self)  # a clone removed mid-copy releases its source

    def _retire_volume(self, volume: str) -> None:
        self.inodes.retire_where(lambda node: belongs_to(node, volume))

    @handler
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        old_parent, new_parent = self.inodes.node(parent_inode_old), self.inodes.node(parent_inode_new)
        within_volumes = isinstance(old_parent, VolumesDir) and isinstance(new_parent, VolumesDir)
        if not within_volumes or flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EPERM)
        if self.pool.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        old, new = os.fsdecode(name_old), os.fsdecode(name_new)
        if len(name_new) > 255:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if old == new:
            return
        await changes.rename_volume(self.pool, old, new)
        self.inodes.rename(VolumeFile(old), VolumeFile(new))
        self._retire_volume(old)

    @handler
    async def setattr(self, inode, attr, fields, fh, ctx):
        node = self.inodes.node(inode)
        if isinstance(node, SnapshotFile):
            raise pyfuse3.FUSEError(errno.EROFS)
        if isinstance(node, VolumeFile):
            if fields.update_size:
                if self.pool.read_only:
                    raise pyfuse3.FUSEError(errno.EROFS)
                await self.pool.volume(node.volume).resize_async(attr.st_size)
            if fields.update_mode or fields.update_uid or fields.update_gid:
                raise pyfuse3.FUSEError(errno.EPERM)
            # Timestamps (touch) are accepted and ignored: the share's files keep theirs.
            return self._entry(inode, node)
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- capacity and extended attributes -------------------------------------------------

    @handler
    async def statfs(self, ctx):
        capacity = self.pool.capacity()
        data = pyfuse3.StatvfsData()
        block = capacity.block_size
        data.f_bsize = block
        data.f_frsize = block
        data.f_blocks = capacity.total // block
        data.f_bfree = capacity.free // block
        data.f_bavail = capacity.available // block
        data.f_files = 1 << 20
        data.f_ffree = 1 << 20
        data.f_favail = 1 << 20
        data.f_namemax = 255
        return data

    @handler
    async def getxattr(self, inode, name, ctx):
        node = self.inodes.node(inode)
        return control.get_attribute(self.pool, node, os.fsdecode(name))

    @handler
    async def listxattr(self, inode, ctx):
        node = self.inodes.node(inode)
        return [n.encode() for n in control.attribute_names(self.pool, node)]

    @handler
    async def setxattr(self, inode, name, value, ctx):
        node = self.inodes.node(inode)
        if os.fsdecode(name) == "fuse_stacktrace" and isinstance(node, RootDir):
            pyfuse3.stacktrace() if hasattr(pyfuse3, "stacktrace") else None
            return
        if commands.handles(node, os.fsdecode(name)):
            await commands.run(self, node, os.fsdecode(name), value)
            return
        control.set_attribute(self.pool, node, os.fsdecode(name), value)

    @handler
    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # -- lifetime -------------------------------------------------------------------------

    async def background_tasks(self) -> None:
        """Merges of deleted snapshots (resumed from the journal), and the periodic write-back
        of metadata, so a crash loses little that was not fsynced."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._recover()
            try:
                pending = self.pool.volumes_with_pending_work()
            except Exception:  # noqa: BLE001 - a broken share file must not take the mount down
                log.exception("looking for interrupted operations")
                pending = []
            # Tests wait for this line (the first scan of the share done), and so can an operator.
            log.info("background tasks running; %d volume(s) with interrupted operations", len(pending))
            for volume in pending:
                self.start_merges(volume)
            interval = self.pool.options.metadata_flush_interval
            while interval > 0:
                await trio.sleep(interval)
                await self._flush_dirty_volumes()
                try:
                    self.pool.settle_releases()
                    self.pool.retry_unfinished()
                    await self._finish_journals()
                except Exception:  # noqa: BLE001 - keep flushing the other volumes next time
                    log.exception("background flush")
            await trio.sleep_forever()

    async def _recover(self) -> None:
        """What a crash left (journals, renames, dirty images), seen to after the mount answers,
        one volume at a time between requests (`Pool.recovery`)."""
        steps = self.pool.recovery()
        while True:
            until = time.monotonic() + RECOVERY_SLICE_SECONDS
            try:
                while time.monotonic() < until:
                    if next(steps, StopIteration) is StopIteration:
                        return
            except Exception:  # noqa: BLE001 - a broken share file must not take the mount down
                log.exception("recovering after a crash")
                return
            await trio.sleep(0)  # requests first

    async def _flush_dirty_volumes(self) -> None:
        """The periodic write-back, each volume in a task of its own: one on a share that does
        not answer waits alone, and is not started again while it waits. A failing one does not
        stop the others (its writer sees the error at its next fsync)."""
        for volume in self.pool.dirty_volumes():
            if not volume.flushing and self._nursery is not None:
                volume.flushing = True
                self._nursery.start_soon(self._flush_volume, volume)

    @staticmethod
    async def _flush_volume(volume) -> None:
        try:
            await volume.flush_async()
        except VfsnapError as exc:
            log.error("%s: background write-back failed: %s", volume.name, exc)
        except Exception:  # noqa: BLE001 - keep flushing the other volumes
            log.exception("%s: background write-back", volume.name)
        finally:
            volume.flushing = False

    def destroy(self) -> None:
        """Write back and close every volume (after `pyfuse3.main` returned)."""
        try:
            self.pool.flush_all()
        except VfsnapError as exc:
            # A full or failing share: what was fsynced is safe; the rest of the write-back
            # is lost, and images left dirty are rebuilt at the next mount.
            log.error("final write-back failed: %s", exc)
        except Exception:  # noqa: BLE001 - still close what can be closed
            log.exception("final flush")
        for handle in self._handles.values():
            if handle.volume is not None:
                handle.volume.released(handle.snapshot, writing=handle.writable)
        self._handles.clear()
        try:
            self.pool.close()
        except Exception:  # noqa: BLE001 - unmount must go on (a full share, a dead server)
            log.exception("closing the shares")


__all__ = ["ROOT", "SNAPSHOTS", "VOLUMES", "CONTROL", "VfsnapOperations"]
