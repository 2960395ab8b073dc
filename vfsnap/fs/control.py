"""Extended attributes: `user.vfsnap.*` on volumes and snapshots, and the `.vfsnap` control file.

Tools (`vfsnap status`, `vfsnap sync`, `getfattr -d`) talk to the running daemon through the
mounted tree itself, as S3QL's control tools do: no side channel to secure or discover.
"""

from __future__ import annotations

import datetime
import errno
import json

import pyfuse3

from vfsnap import __version__
from vfsnap.fs import extents
from vfsnap.fs.tree import ControlFile, ImageNode, Node, VolumeFile

PREFIX = "user.vfsnap."


VOLUME_ATTRIBUTES = ("share", "format", "active", "chain", "allocated", "size")
SNAPSHOT_ATTRIBUTES = ("share", "format", "created", "overlay", "chain", "allocated", "size")


def _volume_attributes(pool, node: ImageNode) -> dict[str, str]:
    volume = pool.volume(node.volume)
    attrs: dict[str, str] = {"share": volume.share.path, "format": volume.sidecar().base_format}
    if isinstance(node, VolumeFile):
        view = volume.live_view()
        attrs["active"] = volume.info().active
    else:
        view = volume.snapshot_view(node.snapshot)
        created = volume.snapshot_created(node.snapshot)
        attrs["created"] = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat()
        attrs["overlay"] = volume.info().snapshots[node.snapshot]
    attrs["chain"] = " <- ".join(image.name for image in view.images)
    attrs["allocated"] = str(volume.allocated_bytes(view))
    attrs["size"] = str(view.size)
    return attrs


def status(pool) -> dict:
    """What `vfsnap status` prints: every volume, its chain and snapshots, running operations,
    and each share and whether it answers (a share that does not is shown as last seen)."""
    volumes = []
    for name in pool.volume_names():
        entry: dict = {"name": name}
        try:
            # From what is known without opening the volume (status must not open them all).
            volume = pool.volume(name)
            st = volume.stat()
            info = volume.info()
            entry.update(
                share=volume.share.path,
                format=volume.sidecar().base_format,  # made in memory if new: nothing written
                size=st.size,
                allocated=st.allocated,
                depth=volume.depth(),
                active=info.active,
                snapshots=volume.snapshots() if info.snapshots else [],
            )
        except Exception as exc:  # noqa: BLE001 - one broken volume must not hide the rest
            entry["error"] = str(exc)
        volumes.append(entry)
    operations = pool.operations()
    return {"version": __version__, "volumes": volumes, "operations": operations, "memory": pool.memory(),
            "recovering": pool.recovering, "shares": pool.share_states()}


def attribute_names(pool, node: Node) -> list[str]:
    if isinstance(node, ControlFile):
        return [PREFIX + "status", PREFIX + "version"]
    if isinstance(node, ImageNode):
        # Names only: listing them (`ls -l` asks, for ACLs) must not open the volume.
        pool.volume(node.volume)
        names = VOLUME_ATTRIBUTES if isinstance(node, VolumeFile) else SNAPSHOT_ATTRIBUTES
        return [PREFIX + name for name in names]
    return []


def get_attribute(pool, node: Node, name: str) -> bytes:
    if not name.startswith("user."):
        # vfsnap keeps no security., system. or trusted. attributes. Saying the namespace is not
        # supported (rather than ENODATA per file) lets `ls -l` stop asking for SELinux labels
        # and ACLs after the first file of the mount: two requests per file fewer.
        raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
    if extents.is_request(name):  # `vfsnap map` / `vfsnap diff` pages (vfsnap.fs.extents)
        value = extents.answer(pool, node, name)
        if value is not None:
            return value
    if isinstance(node, ControlFile):
        if name == PREFIX + "status":
            return json.dumps(status(pool), indent=1, sort_keys=True).encode()
        if name == PREFIX + "version":
            return __version__.encode()
    elif isinstance(node, ImageNode) and name.startswith(PREFIX):
        value = _volume_attributes(pool, node).get(name[len(PREFIX) :])
        if value is not None:
            return value.encode()
    raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def set_attribute(pool, node: Node, name: str, value: bytes) -> None:
    raise pyfuse3.FUSEError(errno.EPERM)
