"""The image files one volume has open, one object per file, and QEMU's locks on them.

Every view of a volume (its live disk, its snapshots, a merge's source and target) uses the same
object for a file: their caches stay coherent, and no stale copy of a header is ever written
back. An image that leaves the chain (or is reopened) is retired: written back at once, closed
once no open file of the volume is left (a request in flight may still read through it). QEMU's
OFD locks (`vfsnap.share.qemu_locks`) follow what this host does with each file; what that is
depends on the volume's state, so the volume supplies it (`use_of`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from vfsnap.errors import Busy, VfsnapError
from vfsnap.format import Image, open_image
from vfsnap.share.qemu_locks import ImageLocks, ImageUse

log = logging.getLogger(__name__)


class OpenImages:
    def __init__(self, share, volume_name: str, *, use_of: Callable[[str, Image | None], ImageUse],
                 in_use: Callable[[], bool]):
        self.share = share
        self.volume_name = volume_name
        self._use_of = use_of  # how QEMU's locks describe this host's use of a file now
        self._in_use = in_use  # whether a file of the volume is open (retired images wait for it)
        self._images: dict[str, Image] = {}
        self._retired: list[Image] = []
        self.qemu_locks = ImageLocks(share.dir, volume_name)

    def __bool__(self) -> bool:
        """Whether any image of the volume is open, in the chain or retired."""
        return bool(self._images or self._retired)

    def get(self, name: str) -> Image | None:
        return self._images.get(name)

    def items(self) -> list[tuple[str, Image]]:
        return list(self._images.items())

    def open_file(self, name: str, image_format: str, *, writable: bool) -> Image:
        """A new image object for file `name`, neither kept here nor locked (the caller closes it)."""
        fd = self.share.dir.open_regular(name, os.O_RDWR if writable else os.O_RDONLY)
        try:
            return open_image(fd, name, image_format, writable=writable, table_cache=self.share.table_cache)
        except BaseException:
            os.close(fd)
            raise

    def open(self, name: str, image_format: str, *, writable: bool) -> Image:
        """The one object for file `name` (opened now if it is not open as asked: in that format,
        and read-write if `writable`)."""
        image = self._images.get(name)
        if image is not None and image.format == image_format and (image.writable or not writable):
            return image
        image = self._open_locked(name, image_format, writable=writable)
        old = self._images.pop(name, None)
        if old is not None:
            self.retire(old)
        self._images[name] = image
        return image

    def reopen(self, name: str, image_format: str, *, writable: bool) -> tuple[Image | None, Image]:
        """A fresh object for file `name` (its header changed, or it is to be written); returns
        (old object or None, new object). The caller gives the views the new one, then retires
        the old one."""
        old = self._images.get(name)
        if old is not None and old.writable:
            # Clean on disk first: the new object reads the header, and must not see (and later
            # write back) a dirty mark the old one is about to clear.
            old.close_writes()
        image = self._open_locked(name, image_format, writable=writable)
        self._images[name] = image
        return old, image

    def _open_locked(self, name: str, image_format: str, *, writable: bool) -> Image:
        """Open file `name` with QEMU's locks for it; Busy (nothing left open) when a QEMU
        process's use conflicts."""
        image = self.open_file(name, image_format, writable=writable)
        try:
            self.qemu_locks.set(name, self._use_of(name, image))
        except BaseException:
            image.close()
            raise
        return image

    def drop(self, name: str) -> None:
        """File `name` leaves the chain (or is about to change on the share): retire its object."""
        image = self._images.pop(name, None)
        if image is not None:
            self.retire(image)

    def drop_all(self) -> None:
        for image in self._images.values():
            self.retire(image)
        self._images.clear()

    def keep_only(self, names: set[str]) -> None:
        """Retire every image not named in `names` (nobody uses it any more)."""
        for name in [n for n in self._images if n not in names]:
            self.retire(self._images.pop(name))

    def retire(self, image: Image) -> None:
        """Close an image now, or once no open file uses the volume any more."""
        if image.writable:
            try:
                image.close_writes()
            except (VfsnapError, OSError) as exc:
                log.error("%s: flushing %s before closing it: %s", self.volume_name, image.name, exc)
        if self._in_use():
            self._retired.append(image)
        else:
            image.close()

    def close_retired(self) -> None:
        """The last open file of the volume closed: nobody reads through retired images now."""
        for image in self._retired:
            image.close()
        self._retired.clear()

    def sync_qemu_locks(self, *, strict: bool = False) -> None:
        """Bring QEMU's locks on every image in line with what this host does with it now.

        Strict: the first conflict raises Busy (when something starts: an open, a chain change);
        else a conflict is logged and that image keeps its locks (when something ends)."""
        for name in set(self._images) | set(self.qemu_locks.names()):
            try:
                self.qemu_locks.set(name, self._use_of(name, self._images.get(name)))
            except Busy:
                if strict:
                    raise
            except (VfsnapError, OSError) as exc:
                if strict:
                    raise
                log.warning("%s: QEMU's locks on %s: %s", self.volume_name, name, exc)

    def close(self) -> None:
        """Write back and close every image, release QEMU's locks (the volume is closed)."""
        for image in list(self._images.values()) + self._retired:
            if image.writable and not image.closed:
                try:
                    image.close_writes()
                except (VfsnapError, OSError) as exc:
                    # Written as far as the share allowed; the dirty mark (if any) stays, and
                    # the next mount rebuilds the refcounts.
                    log.error("%s: final flush of %s: %s", self.volume_name, image.name, exc)
            image.close()
        self._images.clear()
        self._retired.clear()
        self.qemu_locks.close()
