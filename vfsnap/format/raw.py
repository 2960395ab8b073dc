"""Raw images: the guest offset is the file offset, and the file size is the virtual size,
rounded up to whole 512-byte sectors as QEMU counts it (a 1000-byte file is a 1024-byte disk
whose last 24 bytes read as zeros)."""

from __future__ import annotations

import errno
import os

from vfsnap.errors import NotPermitted, ReadOnly
from vfsnap.format.create import round_size
from vfsnap.format.image import DATA, Image
from vfsnap.format.tables import sync, write_error


# copy_file_range errors that mean "not here" rather than a failing share.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSUP}


class RawImage(Image):
    format = "raw"

    def __init__(self, fd: int, name: str, *, writable: bool):
        super().__init__(fd, name, writable=writable)
        self._size = round_size(os.fstat(fd).st_size)

    @property
    def size(self) -> int:
        return self._size

    @property
    def granularity(self) -> int:
        return 512

    def reload(self) -> None:
        self._size = round_size(os.fstat(self.fd).st_size)

    def map_range(self, start: int, end: int) -> list[tuple[int, int, int, object]]:
        end = min(end, self._size)
        if start >= end:
            return []
        return [(start, end, DATA, start)]

    # -- writing --------------------------------------------------------------------------

    def write(self, offset: int, data) -> None:
        if not self.writable:
            raise ReadOnly(f"{self.name}: image is open read-only")
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self.fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            raise write_error(exc, self.name) from None
        self._data_dirty = True
        self._data_generation += len(data)

    def copy_from(self, src_fd: int, src_offset: int, offset: int, length: int) -> bool:
        """Copy `length` bytes of another file into this one at `offset` inside the kernel
        (copy_file_range: no trip through user space; on NFS 4.2 a server-side copy). What lies
        past the source's end reads as zeros, as in `pread_full`. False, with nothing counted,
        where the kernel or the share cannot do it (the caller then reads and writes)."""
        if not self.writable:
            raise ReadOnly(f"{self.name}: image is open read-only")
        done = 0
        try:
            while done < length:
                copied = os.copy_file_range(src_fd, self.fd, length - done, src_offset + done, offset + done)
                if copied == 0:
                    break
                done += copied
        except OSError as exc:
            if exc.errno in _NO_KERNEL_COPY and not done:
                return False
            raise write_error(exc, self.name) from None
        self._data_dirty = True
        self._data_generation += done
        if done < length:  # the source ends here: the rest reads as zeros
            self.write(offset + done, bytes(length - done))
        return True

    def write_zeroes(self, offset: int, length: int) -> None:
        """Punch a hole: reads as zeros, frees the blocks on filesystems that can."""
        if not self.writable:
            raise ReadOnly(f"{self.name}: image is open read-only")
        try:
            _punch_hole(self.fd, offset, length)
        except OSError:
            self.write(offset, bytes(length))
        self._data_dirty = True
        self._data_generation += length

    @property
    def dirty(self) -> bool:
        return self._data_dirty

    def flush(self) -> None:
        if self.dirty:
            sync(self.fd, self.name)
            self._data_dirty = False
            self._synced_generation = self._data_generation

    def resize(self, new_size: int, *, thick: bool = False) -> None:
        new_size = round_size(new_size)
        if new_size < self._size:
            raise NotPermitted(f"{self.name}: shrinking a volume is not supported")
        if not self.writable:
            raise ReadOnly(f"{self.name}: image is open read-only")
        try:
            if thick:
                os.posix_fallocate(self.fd, self._size, new_size - self._size)
            else:
                os.ftruncate(self.fd, new_size)
            os.fsync(self.fd)
        except OSError as exc:
            raise write_error(exc, self.name) from None
        self._size = new_size




FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
