"""What vfsnap records of a volume it meets for the first time (one it did not create).

The record (`Sidecar`, kept by `vfsnap.share.sidecar_store`) says the base image's format, as the
overlay just above the base declares it, or else as the base's first bytes look (DESIGN.md
invariant 4: once recorded, never probed again; docs/security.md on why the first meeting is
trust on first use), and when each snapshot found in `.info` was taken, as far as the files'
times tell. Only reads: the record reaches the share later (`SidecarStore.save_first_meeting`).
"""

from __future__ import annotations

import os
import time

from vfsnap.chain.backing import ChainRules
from vfsnap.errors import VfsnapError
from vfsnap.format import Qcow2Image, probe_format
from vfsnap.share.info import VolumeInfo
from vfsnap.share.records import Sidecar


def first_record(volume) -> Sidecar:
    """The record of `volume` as vfsnap first meets it."""
    info = volume.info()
    base_format = declared_base_format(volume, info) or probe_base(volume)
    created = {snapshot: guess_creation_time(volume, overlay) for snapshot, overlay in info.snapshots.items()}
    return Sidecar(base_format=base_format, created=created)


def declared_base_format(volume, info: VolumeInfo) -> str | None:
    """The base's format as the overlay just above it declares it, if one does."""
    rules = ChainRules(volume.name, base_format="raw", max_depth=volume.share.options.max_chain_depth)
    name, depth = info.active, 0
    while name != volume.name and rules.belongs(name) and depth <= rules.max_depth:
        image = volume.open_member(name, "qcow2")
        assert isinstance(image, Qcow2Image)
        if image.backing_file == volume.name:
            return image.backing_format
        if image.backing_file is None:
            return None
        name, depth = image.backing_file, depth + 1
    return None


def probe_base(volume) -> str:
    """The base's format as its first bytes look (only for a volume not recorded yet)."""
    fd = volume.share.dir.open_regular(volume.name, os.O_RDONLY)
    try:
        return probe_format(fd)
    finally:
        os.close(fd)


def guess_creation_time(volume, overlay: str) -> float:
    """For a snapshot vfsnap did not take: when its data stopped changing.

    The data of a snapshot is the chain below its overlay, and the file just below was last
    written right before the snapshot was taken; the overlay's own times move on.
    """
    try:
        image = volume.open_member(overlay, "qcow2")
        below = getattr(image, "backing_file", None)
        st = volume.share.dir.stat(below) if below else None
        st = st or volume.share.dir.stat(overlay)
        return st.st_mtime if st else time.time()
    except VfsnapError:
        return time.time()
