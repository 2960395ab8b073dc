"""A volume on a share: its `.info`, its sidecar, its images, and the views of them.

The views of a volume are its live disk (the chain ending at the active image) and one per
snapshot (the chain *below* the overlay created when the snapshot was taken). Images are opened
once and shared by all views of the volume.
"""

from __future__ import annotations

import logging
import os
import time

from vfsnap.chain.backing import ChainRules, backing_chain
from vfsnap.chain.view import View
from vfsnap.errors import CorruptImage, NotFound, NotPermitted, VfsnapError
from vfsnap.format import Image, Qcow2Image, open_image, probe_format
from vfsnap.names import info_file, sidecar_file
from vfsnap.share.info import Sidecar, VolumeInfo, parse_info, parse_sidecar

log = logging.getLogger(__name__)


class Volume:
    def __init__(self, share, name: str):
        self.share = share
        self.name = name
        self._images: dict[str, Image] = {}
        self._info: VolumeInfo | None = None
        self._info_stamp: tuple | None = None
        self._sidecar: Sidecar | None = None
        self._live_view: View | None = None
        self._snapshot_views: dict[str, View] = {}
        self._retired: list[Image] = []
        self.open_count = 0

    # -- files ----------------------------------------------------------------------------

    @property
    def info_name(self) -> str:
        return info_file(self.name)

    @property
    def sidecar_name(self) -> str:
        return sidecar_file(self.name)

    def base_stat(self) -> os.stat_result:
        st = self.share.dir.stat(self.name)
        if st is None:
            raise NotFound(f"volume {self.name} no longer exists")
        return st

    # -- .info and sidecar ----------------------------------------------------------------

    def info(self) -> VolumeInfo:
        """The volume's `.info` (re-read when the file changed on the share)."""
        st = self.share.dir.stat(self.info_name)
        stamp = None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._info is None or stamp != self._info_stamp:
            if self._info is not None:
                log.info("%s: %s changed on the share; reopening the chain", self.name, self.info_name)
                self._reset()
            self._info = self._read_info()
            self._info_stamp = stamp
        return self._info

    def _read_info(self) -> VolumeInfo:
        data = self.share.dir.read_small(self.info_name)
        if data is None:
            return VolumeInfo(active=self.name)
        return parse_info(data, name=self.info_name)

    def sidecar(self) -> Sidecar:
        """vfsnap's record of the volume, made the first time vfsnap meets the volume."""
        if self._sidecar is None:
            data = self.share.dir.read_small(self.sidecar_name)
            if data is not None:
                self._sidecar = parse_sidecar(data, name=self.sidecar_name)
            else:
                self._sidecar = self._first_meeting()
        return self._sidecar

    def _first_meeting(self) -> Sidecar:
        info = self.info()
        base_format = self._declared_base_format(info) or self._probe_base()
        created = {}
        for snapshot, overlay in info.snapshots.items():
            created[snapshot] = self._guess_creation_time(overlay)
        sidecar = Sidecar(base_format=base_format, created=created)
        if not self.share.read_only:
            self.share.dir.write_atomic(self.sidecar_name, sidecar.to_json())
            log.info("%s: first seen; recorded base format %s", self.name, base_format)
        return sidecar

    def _declared_base_format(self, info: VolumeInfo) -> str | None:
        """The base's format as the overlay just above it declares it, if one does."""
        rules = ChainRules(self.name, base_format="raw", max_depth=self.share.options.max_chain_depth)
        name, depth = info.active, 0
        while name != self.name and rules.belongs(name) and depth <= rules.max_depth:
            image = self._open_member(name, "qcow2")
            assert isinstance(image, Qcow2Image)
            if image.backing_file == self.name:
                return image.backing_format
            if image.backing_file is None:
                return None
            name, depth = image.backing_file, depth + 1
        return None

    def _probe_base(self) -> str:
        fd = self.share.dir.open_regular(self.name, os.O_RDONLY)
        try:
            return probe_format(fd)
        finally:
            os.close(fd)

    def _guess_creation_time(self, overlay: str) -> float:
        """For a snapshot vfsnap did not take: when its data stopped changing.

        The data of a snapshot is the chain below its overlay, and the file just below was last
        written right before the snapshot was taken; the overlay's own times move on.
        """
        try:
            image = self._open_member(overlay, "qcow2")
            below = getattr(image, "backing_file", None)
            st = self.share.dir.stat(below) if below else None
            st = st or self.share.dir.stat(overlay)
            return st.st_mtime if st else time.time()
        except VfsnapError:
            return time.time()

    # -- images and views -----------------------------------------------------------------

    def _rules(self) -> ChainRules:
        return ChainRules(self.name, base_format=self.sidecar().base_format, max_depth=self.share.options.max_chain_depth)

    def _open_member(self, name: str, image_format: str) -> Image:
        """Open (once) a file of the volume; the active image read-write unless the mount is ro."""
        writable = not self.share.read_only and self._info is not None and name == self._info.active
        image = self._images.get(name)
        if image is not None and image.format == image_format and (image.writable or not writable):
            return image
        fd = self.share.dir.open_regular(name, os.O_RDWR if writable else os.O_RDONLY)
        try:
            image = open_image(fd, name, image_format, writable=writable, table_cache=self.share.table_cache)
        except BaseException:
            os.close(fd)
            raise
        old = self._images.pop(name, None)
        if old is not None:
            self._retire(old)
        self._images[name] = image
        return image

    def live_chain(self) -> list[Image]:
        info = self.info()
        rules = self._rules()
        top_format = rules.format_of(info.active, None, referrer=self.info_name)
        return backing_chain(info.active, top_format, rules, self._open_member)

    def live_view(self) -> View:
        self.info()  # notices changes made on the share by others
        if self._live_view is None:
            self._live_view = View(self.live_chain(), name=self.name, max_chunks=self.share.options.map_cache_chunks)
        return self._live_view

    # -- writing --------------------------------------------------------------------------

    def flush(self) -> None:
        """Make every acknowledged write durable on the share."""
        if self._live_view is not None:
            self._live_view.flush()

    @property
    def dirty(self) -> bool:
        return self._live_view is not None and self._live_view.dirty

    def resize(self, new_size: int) -> None:
        """Grow the live volume (only the active image grows; shorter backing files read zeros)."""
        view = self.live_view()
        if new_size < view.size:
            raise NotPermitted(f"volume {self.name}: shrinking is not supported ({view.size} -> {new_size})")
        if new_size != view.size:
            view.resize(new_size, thick=self.share.options.thick)

    def snapshots(self) -> list[str]:
        """Snapshot ids, oldest first (by the position of their overlays in the chain)."""
        info = self.info()
        if not info.snapshots:
            return []
        try:
            order = {image.name: i for i, image in enumerate(self.live_chain())}
        except VfsnapError:
            order = {}
        return sorted(info.snapshots, key=lambda s: (order.get(info.snapshots[s], len(order)), s))

    def has_snapshot(self, snapshot: str) -> bool:
        return snapshot in self.info().snapshots

    def latest_snapshot(self) -> str | None:
        snapshots = self.snapshots()
        return snapshots[-1] if snapshots else None

    def snapshot_view(self, snapshot: str) -> View:
        info = self.info()
        overlay = info.snapshots.get(snapshot)
        if overlay is None:
            raise NotFound(f"volume {self.name} has no snapshot {snapshot}")
        view = self._snapshot_views.get(snapshot)
        if view is None:
            rules = self._rules()
            chain = backing_chain(overlay, "qcow2", rules, self._open_member)
            if len(chain) < 2:
                raise CorruptImage(f"{overlay}: snapshot overlay has no backing file")
            view = View(chain[:-1], name=f"{self.name}@{snapshot}", max_chunks=self.share.options.map_cache_chunks)
            self._snapshot_views[snapshot] = view
        return view

    def snapshot_created(self, snapshot: str) -> float:
        created = self.sidecar().created.get(snapshot)
        if created is None:
            overlay = self.info().snapshots.get(snapshot)
            created = self._guess_creation_time(overlay) if overlay else time.time()
        return created

    # -- lifetime -------------------------------------------------------------------------

    def _retire(self, image: Image) -> None:
        """Close an image now, or once no open file uses this volume any more."""
        if self.open_count:
            self._retired.append(image)
        else:
            image.close()

    def _reset(self) -> None:
        for image in self._images.values():
            self._retire(image)
        self._images.clear()
        self._live_view = None
        self._snapshot_views.clear()
        self._sidecar = None

    def opened(self) -> None:
        self.open_count += 1

    def released(self) -> None:
        self.open_count -= 1
        if not self.open_count:
            for image in self._retired:
                image.close()
            self._retired.clear()

    def close(self) -> None:
        for image in list(self._images.values()) + self._retired:
            image.close()
        self._images.clear()
        self._retired.clear()
        self._live_view = None
        self._snapshot_views.clear()
