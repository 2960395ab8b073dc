"""Cinder's `<vol>.info` file and vfsnap's own `<vol>.vfsnap.json` sidecar.

`.info` is a JSON object: `"active"` names the file receiving writes, every other key is a
snapshot id mapped to the overlay created when it was taken. It is written exactly as Cinder's
remotefs driver writes it: `json.dump(info, f, indent=1, sort_keys=True)`.

The sidecar holds what Cinder has no place for: the recorded format of the base image
(invariant 4: never probed again once recorded), each snapshot's creation time and the journal;
it is parsed and written with vfsnap's other records in `vfsnap.share.records`.
"""

from __future__ import annotations

import json

import attrs

from vfsnap.errors import CorruptImage
from vfsnap.names import is_snapshot_name
from vfsnap.share.records import Sidecar, parse_sidecar

# The sidecar's home is vfsnap.share.records; importable from here as before.
__all__ = ["Sidecar", "VolumeInfo", "parse_info", "parse_sidecar"]


@attrs.frozen
class VolumeInfo:
    """The contents of `<vol>.info`."""

    active: str
    snapshots: dict[str, str] = attrs.field(factory=dict)  # snapshot id -> overlay file

    def to_json(self) -> bytes:
        document = {"active": self.active, **self.snapshots}
        # Cinder: json.dump(snap_info, f, indent=1, sort_keys=True); no trailing newline.
        return json.dumps(document, indent=1, sort_keys=True).encode()

    def with_snapshot(self, snapshot: str, overlay: str, *, active: str) -> "VolumeInfo":
        return VolumeInfo(active=active, snapshots={**self.snapshots, snapshot: overlay})

    def without_snapshot(self, snapshot: str, *, active: str | None = None) -> "VolumeInfo":
        snapshots = {k: v for k, v in self.snapshots.items() if k != snapshot}
        return VolumeInfo(active=active or self.active, snapshots=snapshots)


def parse_info(data: bytes, *, name: str) -> VolumeInfo:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptImage(f"{name}: not valid JSON ({exc})") from None
    # JSON object keys are always strings: only the values need a look (a set of their types,
    # not a generator per item: the share's index parses every `.info` of the share).
    if not isinstance(document, dict) or not {type(v) for v in document.values()} <= {str}:
        raise CorruptImage(f"{name}: must be a JSON object of strings")
    active = document.pop("active", None)
    for snapshot in document:
        if not is_snapshot_name(snapshot):
            raise CorruptImage(f"{name}: snapshot id {snapshot!r} is not a valid snapshot name")
    if active is None:
        if document:
            raise CorruptImage(f"{name}: has snapshots but no 'active' key")
        raise CorruptImage(f"{name}: has no 'active' key")
    return VolumeInfo(active=active, snapshots=document)
