"""File operations on a share directory: confined to it, symlink-proof and crash-safe.

Every path is a plain name opened relative to the share's directory descriptor with
O_NOFOLLOW, so nothing on the share (a symlink, a `..` name) can lead vfsnap outside it.
Small documents (`.info`, sidecars) are replaced atomically: temp file, fsync, rename,
fsync of the directory, as DESIGN.md section 1 requires.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat

from vfsnap.errors import CorruptImage, NoSpace, NotFound, VfsnapError
from vfsnap.names import TEMP_PREFIX

log = logging.getLogger(__name__)


class ShareDir:
    """A directory on the share, opened once; all names are relative to it."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            raise NotFound(f"share directory {self.path} does not exist") from None

    def close(self) -> None:
        os.close(self.fd)

    def listdir(self) -> list[str]:
        return os.listdir(self.fd)

    def stat(self, name: str) -> os.stat_result | None:
        """lstat of `name`, or None when it does not exist."""
        _check_plain(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return self.stat(name) is not None

    def open_regular(self, name: str, flags: int, mode: int = 0o644) -> int:
        """Open a regular file of the share; symlinks and other file types are refused."""
        _check_plain(name)
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
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CorruptImage(f"{name}: not a regular file")
        os.set_blocking(fd, True)
        return fd

    def read_small(self, name: str, limit: int = 1 << 20) -> bytes | None:
        """Contents of a small document (at most `limit` bytes), or None when absent."""
        try:
            fd = self.open_regular(name, os.O_RDONLY)
        except NotFound:
            return None
        try:
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise CorruptImage(f"{name}: larger than {limit} bytes")
        return data

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
        return os.fstatvfs(self.fd)

    def remove_stale_temp_files(self) -> list[str]:
        """Delete temporary files left by an interrupted atomic write."""
        removed = []
        for name in self.listdir():
            if name.startswith(TEMP_PREFIX):
                self.unlink(name)
                removed.append(name)
        return removed


def _check_plain(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise CorruptImage(f"{name!r} is not a plain file name on the share")


def _share_error(exc: OSError, name: str) -> VfsnapError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{name}: share is full ({exc.strerror})")
    return VfsnapError(f"{name}: {os.strerror(exc.errno or errno.EIO)}", errno=exc.errno or errno.EIO)
