"""File operations on a share directory: confined to it, symlink-proof and crash-safe.

Every path is a plain name opened relative to the share's directory descriptor with
O_NOFOLLOW, so nothing on the share (a symlink, a `..` name) can lead vfsnap outside it.
Small documents (`.info`, sidecars) are replaced atomically: temp file, fsync, rename,
fsync of the directory, as DESIGN.md section 1 requires.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import secrets
import stat

from vfsnap.errors import CorruptImage, NotFound, ShareNotAnswering, VfsnapError, share_error
from vfsnap.names import TEMP_PREFIX

log = logging.getLogger(__name__)

# How many times a document the share's listing has, but an open by name does not find, is
# looked up afresh and opened again before the name is reported stale (`ShareDir._open_listed`).
LISTED_OPEN_ATTEMPTS = 5


def retry_stale(operation):
    """Run `operation` of a ShareDir; on ESTALE, re-resolve the share directory and run it once
    more, by name (docs/design-notes.md, "Several hosts on one share").

    NFS and GlusterFS answer ESTALE for a handle of a file another host replaced (`.info` or a
    sidecar renamed over, an overlay deleted by a merge) while the kernel still has the old one
    cached; as an NFS client does, the call is repeated by path, which looks the name up afresh.
    """

    @functools.wraps(operation)
    def retrying(self, *args, **kwargs):
        try:
            return operation(self, *args, **kwargs)
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
        except VfsnapError as exc:
            if exc.errno != errno.ESTALE:
                raise
        log.debug("%s: stale file handle in %s%s; retried by name", self.path, operation.__name__, args[:1])
        self.reresolve()
        return operation(self, *args, **kwargs)

    return retrying


class ShareDir:
    """A directory on the share, opened once; all names are relative to it.

    With `io` set (a `ShareIO`, on network shares), the lookups a request makes from the FUSE
    loop (stat, listdir, reading a small document, statvfs, fstat, open) wait at most a moment
    for the share; when it does not answer they give the last answer they had for the same
    question (DESIGN.md section 4: "listing, df and status answer from its last known state"),
    or raise ShareNotAnswering (EAGAIN).
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        # Set by the share when it is a network filesystem: small documents (`.info`, sidecars)
        # are then read with O_DIRECT, past the client's page and content caches.
        self.uncached_reads = False
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise NotFound(f"share directory {self.path} does not exist") from None
        self.io = None
        self._last: dict[tuple, object] = {}  # (question, name) -> last answer, when io is set

    def _answer(self, question: str, name, fn, *args):
        """`fn(*args)` through the share's I/O guard, remembering the answer for a hung share."""
        if self.io is None:
            return fn(*args)
        key = (question, name)
        try:
            result = self.io.answer(f"{question} {name or ''}".strip(), fn, *args)
        except ShareNotAnswering:
            if key in self._last:
                return self._last[key]
            raise
        self._last[key] = result
        return result

    def close(self) -> None:
        os.close(self.fd)

    def reresolve(self) -> list[str] | None:
        """Make the kernel look the share's names up afresh: open the directory again by its
        path (its own handle may be the stale one) and list it. A listing refreshes every name
        the kernel has cached (FUSE's READDIRPLUS replaces an entry whose file changed; NFS
        revalidates the directory), where a second open by the same name could be given the
        same stale handle again (GlusterFS's open-behind answers an open before it looks).
        Returns the listing (None when it failed)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("%s: reopening the share directory: %s", self.path, exc.strerror)
            return None
        os.close(self.fd)
        self.fd = fd
        try:
            return os.listdir(fd)
        except OSError as exc:
            log.warning("%s: listing the share directory: %s", self.path, exc.strerror)
            return None

    def listdir(self) -> list[str]:
        return self._answer("listdir", None, self._listdir)

    @retry_stale
    def _listdir(self) -> list[str]:
        return os.listdir(self.fd)

    def stat(self, name: str) -> os.stat_result | None:
        """lstat of `name`, or None when it does not exist."""
        _check_plain(name)
        return self._answer("stat", name, self._lstat, name)

    def fstat(self, fd: int, name: str) -> os.stat_result:
        """fstat of an open file of the share named `name` (the last one when it hangs)."""
        return self._answer("fstat", name, os.fstat, fd)

    @retry_stale
    def _lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    def open_regular(self, name: str, flags: int, mode: int = 0o644) -> int:
        """Open a regular file of the share; symlinks and other file types are refused."""
        _check_plain(name)
        if self.io is not None:
            return self.io.answer(f"open {name}", self._open_regular, name, flags, mode)
        return self._open_regular(name, flags, mode)

    @retry_stale
    def _open_regular(self, name: str, flags: int, mode: int = 0o644) -> int:
        try:
            # O_NONBLOCK: opening a FIFO planted on the share must not wait for a writer.
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise CorruptImage(f"{name}: is a symlink; images must be regular files on the share") from None
            if exc.errno == errno.ENOENT:
                raise NotFound(f"{name}: no such file on the share") from None
            if exc.errno in (errno.EISDIR, errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
                raise CorruptImage(f"{name}: not a regular file ({exc.strerror})") from None
            raise _share_error(exc, name) from None
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError as exc:
            _close_quietly(fd)
            if exc.errno == errno.ENOENT:
                # Opened, then replaced by another host (GlusterFS answers fstat of a file
                # unlinked elsewhere with ENOENT): a stale handle, opened again by name.
                raise OSError(errno.ESTALE, f"{name}: replaced while being opened") from None
            raise
        if not regular:
            os.close(fd)
            raise CorruptImage(f"{name}: not a regular file")
        os.set_blocking(fd, True)
        return fd

    def read_small(self, name: str, limit: int = 1 << 20) -> bytes | None:
        """Contents of a small document (at most `limit` bytes), or None when absent.

        On a network share, "absent" is checked by a listing first: a name the kernel still
        maps to a file another host has just replaced (renamed over) can answer ENOENT, and a
        `.info` read as absent under the chain lock would lose every snapshot."""
        return self._answer("read", name, self._read_small, name, limit)

    @retry_stale
    def _read_small(self, name: str, limit: int) -> bytes | None:
        try:
            fd = self._open_regular(name, os.O_RDONLY | (os.O_DIRECT if self.uncached_reads else 0))
        except NotFound:
            if not self.uncached_reads:
                return None
            fd = self._open_listed(name)
            if fd is None:
                return None
        except VfsnapError as exc:
            if exc.errno != errno.EINVAL or not self.uncached_reads:
                raise
            # A filesystem that refuses O_DIRECT: nothing to bypass there.
            self.uncached_reads = False
            return self._read_small(name, limit)
        try:
            data = _read_direct(fd, limit + 1) if self.uncached_reads else os.read(fd, limit + 1)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                # Opened, then replaced by another host before the read (GlusterFS answers the
                # read of a file unlinked elsewhere with ENOENT): a stale handle, read again by name.
                raise OSError(errno.ESTALE, f"{name}: replaced while being read") from None
            raise
        finally:
            _close_quietly(fd)  # only read: a failed close loses nothing
        if len(data) > limit:
            raise CorruptImage(f"{name}: larger than {limit} bytes")
        return data

    def _open_listed(self, name: str, attempts: int = LISTED_OPEN_ATTEMPTS) -> int | None:
        """Open `name` (O_DIRECT) that an open by name just answered ENOENT for: None once a
        fresh listing no longer has it; while the listing has it, that ENOENT was a name the kernel
        still mapped to a replaced file, so look the names up afresh and open again. Another
        host replacing the file over and over can make a few opens in a row miss it; after
        `attempts` the stale name is reported (ESTALE) rather than taken for absent."""
        for _ in range(attempts):
            listing = self.reresolve()
            if listing is not None and name not in listing:
                return None
            try:
                return self._open_regular(name, os.O_RDONLY | os.O_DIRECT)
            except NotFound:
                continue
        raise OSError(errno.ESTALE, f"{name}: listed, but not found when opened {attempts} times")

    def write_atomic(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """Replace `name` with `data` so that a crash leaves either the old or the new file."""
        _check_plain(name)
        temp = TEMP_PREFIX + secrets.token_hex(8)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as exc:
            try:
                os.unlink(temp, dir_fd=self.fd)
            except OSError:
                pass
            raise _share_error(exc, name) from None
        # The new file is in place now, for every reader: report success whatever follows. A
        # directory fsync that fails leaves the rename to the share's own next write-back; the
        # caller must not act as if the old file were still there.
        try:
            self.fsync()
        except OSError as exc:
            log.error("%s: renamed into place, but syncing the directory failed: %s", name, exc.strerror)

    def rename(self, old: str, new: str) -> None:
        _check_plain(old)
        _check_plain(new)
        os.rename(old, new, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str, *, missing_ok: bool = True) -> None:
        _check_plain(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def fsync(self) -> None:
        """Make renames, creations and removals in the directory durable."""
        os.fsync(self.fd)

    def statvfs(self) -> os.statvfs_result:
        return self._answer("statvfs", None, os.fstatvfs, self.fd)

    def remove_stale_temp_files(self) -> list[str]:
        """Delete temporary files left by an interrupted atomic write."""
        removed = []
        for name in self.listdir():
            if name.startswith(TEMP_PREFIX):
                self.unlink(name)
                removed.append(name)
        return removed


def _read_direct(fd: int, size: int) -> bytes:
    """Read up to `size` bytes from offset 0 of a descriptor opened with O_DIRECT, into a
    page-aligned buffer of whole pages (what O_DIRECT may require)."""
    buffer = mmap.mmap(-1, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE)
    try:
        length = os.preadv(fd, [buffer], 0)
        return buffer[: min(length, size)]
    finally:
        buffer.close()


def _close_quietly(fd: int) -> None:
    """Close a descriptor that already failed (the descriptor is freed even when close fails)."""
    try:
        os.close(fd)
    except OSError:
        pass


def _check_plain(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise CorruptImage(f"{name!r} is not a plain file name on the share")


def _share_error(exc: OSError, name: str) -> VfsnapError:
    return share_error(exc, name)
