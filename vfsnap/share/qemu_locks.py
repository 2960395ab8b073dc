"""QEMU's own image locks, taken on every image file vfsnap uses, so that QEMU's tools and guests
see vfsnap as one more QEMU (docs/design-notes.md, "QEMU's image locks").

QEMU (block/file-posix.c, `raw_apply_lock_bytes` and `raw_check_lock_bytes`; the layout is the
same from QEMU 2.10 to 7.2 and later) describes what a process does with an image by shared
(read) OFD locks on single bytes of the file:

- byte 100 + i: this process holds permission i;
- byte 200 + i: this process does not let others hold permission i;

with i the bit number of a BLK_PERM_* value (include/block/block-common.h): consistent read 0x1,
write 0x2, write-unchanged 0x4, resize 0x8. Before it uses an image, a process tests (F_OFD_GETLK
with a write lock) byte 200 + i for every permission it wants and byte 100 + i for every
permission it does not share: any shared lock there, held by another open file description,
means "in use", and QEMU refuses with `Failed to get "write" lock`. `-U` (force-share) readers
take no 2xx byte and test none, so `qemu-img info -U` and `convert -U` keep working.

All locks of one file are taken on one descriptor kept for them (per volume, per file name): a
test by F_OFD_GETLK ignores locks of its own open file description, exactly as QEMU's own check
does, so vfsnap never refuses itself, whatever other descriptors of the image it opens and
closes (`Volume.reopen`, retired images). vfsnap's host locks (bytes at 2^62, locks.py) lie
elsewhere in the file and are independent of these.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

import attrs

from vfsnap.errors import Busy

log = logging.getLogger(__name__)

# block/file-posix.c
RAW_LOCK_PERM_BASE = 100
RAW_LOCK_SHARED_BASE = 200

# include/block/block-common.h, BLK_PERM_*
CONSISTENT_READ = 0x01
WRITE = 0x02
WRITE_UNCHANGED = 0x04
RESIZE = 0x08
ALL_PERMISSIONS = 0x0F
PERMISSION_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write", WRITE_UNCHANGED: "write unchanged",
                    RESIZE: "resize"}


@attrs.frozen
class ImageUse:
    """What vfsnap does with an image (`held`) and what it lets others do (`shared`), as QEMU's
    permission bits."""

    held: int
    shared: int

    def lock_bytes(self) -> frozenset[int]:
        """The bytes QEMU would lock for this use (`raw_apply_lock_bytes`)."""
        return frozenset({RAW_LOCK_PERM_BASE + bit for bit in range(4) if self.held & (1 << bit)}
                         | {RAW_LOCK_SHARED_BASE + bit for bit in range(4) if not self.shared & (1 << bit)})

    def conflict_bytes(self) -> dict[int, str]:
        """The bytes another process must not hold for this use (`raw_check_lock_bytes`), with
        what a lock there means."""
        conflicts = {}
        for bit in range(4):
            permission = 1 << bit
            if self.held & permission:
                conflicts[RAW_LOCK_SHARED_BASE + bit] = f'does not share "{PERMISSION_NAMES[permission]}"'
            if not self.shared & permission:
                conflicts[RAW_LOCK_PERM_BASE + bit] = f'holds "{PERMISSION_NAMES[permission]}"'
        return conflicts


# Nothing held, everything shared: no lock at all.
UNUSED = ImageUse(held=0, shared=ALL_PERMISSIONS)
# An image vfsnap reads and caches the tables of (a backing file): nobody may change or resize it.
# What QEMU takes for a read-only image it opens without -U.
READING = ImageUse(held=CONSISTENT_READ, shared=CONSISTENT_READ | WRITE_UNCHANGED)
# An image vfsnap writes: what a QEMU writer takes (readers that tolerate changes, -U, still read).
WRITING = ImageUse(held=CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE, shared=CONSISTENT_READ | WRITE_UNCHANGED)


def _flock(kind: int, start: int) -> bytes:
    return struct.pack("hhqqi", kind, os.SEEK_SET, start, 1, 0)


def _lock_kind(fd: int, byte: int) -> int:
    """The kind of lock another open file description holds on `byte` (F_UNLCK when none)."""
    answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return struct.unpack("hhqqi", answer)[0]


class ImageLocks:
    """QEMU's locks on the image files of one volume, one descriptor per file."""

    def __init__(self, share_dir, volume: str):
        self.share_dir = share_dir
        self.volume = volume
        self._held: dict[str, tuple[int, ImageUse]] = {}  # file name -> (descriptor, use)
        self._unsupported = False

    def use_of(self, name: str) -> ImageUse:
        held = self._held.get(name)
        return UNUSED if held is None else held[1]

    def names(self) -> list[str]:
        return list(self._held)

    def set(self, name: str, use: ImageUse) -> None:
        """Lock `name` for `use`; Busy (nothing changed) when another process's use conflicts.
        A file replaced on the share (ESTALE) is locked afresh, by name."""
        try:
            self._set(name, use)
        except OSError as exc:
            if exc.errno != errno.ESTALE:
                raise
            self.release(name)
            self.share_dir.reresolve()
            self._set(name, use)

    def _set(self, name: str, use: ImageUse) -> None:
        """Lock `name` for `use`; Busy (nothing changed) when another process's use conflicts.

        As QEMU does: the new bytes are locked first, then the conflicts tested, then the bytes
        no longer needed unlocked; on a conflict the old state is put back."""
        if self._unsupported:
            return
        old = self.use_of(name)
        if use == old:
            return
        if use == UNUSED:
            self.release(name)
            return
        fd = self._held[name][0] if name in self._held else self.share_dir.open_regular(name, os.O_RDONLY)
        old_bytes = old.lock_bytes()
        try:
            for byte in sorted(use.lock_bytes() - old_bytes):
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte))
            for byte, meaning in sorted(use.conflict_bytes().items()):
                if _lock_kind(fd, byte) != fcntl.F_UNLCK:
                    self._restore(fd, name, old_bytes, use.lock_bytes())
                    message = (f"volume {self.volume}: {name} is in use by another program (a QEMU process "
                               f"{meaning}: its lock on byte {byte}); refusing to "
                               f"{'write' if use.held & WRITE else 'read'} it")
                    log.warning("%s", message)
                    raise Busy(message)
        except OSError as exc:
            if name not in self._held:
                os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: the share does not support byte-range locks (%s); QEMU's tools are not kept out",
                            self.volume, os.strerror(exc.errno))
                self._unsupported = True
                return
            raise
        for byte in old_bytes - use.lock_bytes():
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, byte))
        self._held[name] = (fd, use)

    def _restore(self, fd: int, name: str, old_bytes: frozenset[int], new_bytes: frozenset[int]) -> None:
        for byte in new_bytes - old_bytes:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, byte))
        if name not in self._held:
            os.close(fd)

    def release(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is not None:
            os.close(held[0])  # closing the description releases its OFD locks

    def close(self) -> None:
        for name in list(self._held):
            self.release(name)
