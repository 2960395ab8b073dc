"""Cinder's `<vol>.info` file and vfsnap's own `<vol>.vfsnap.json` sidecar.

`.info` is a JSON object: `"active"` names the file receiving writes, every other key is a
snapshot id mapped to the overlay created when it was taken. It is written exactly as Cinder's
remotefs driver writes it: `json.dump(info, f, indent=1, sort_keys=True)`.

The sidecar holds what Cinder has no place for: the recorded format of the base image
(invariant 4: never probed again once recorded) and each snapshot's creation time.
"""

from __future__ import annotations

import json

import attrs

from vfsnap.errors import CorruptImage
from vfsnap.names import is_snapshot_name


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


@attrs.frozen
class Sidecar:
    """The contents of `<vol>.vfsnap.json`.

    `journal` lists the chain changes that were started and not yet finished, oldest first
    (DESIGN.md invariant 3): each entry is written durably before the first step of its
    operation and removed after the last, so the next mount can finish or roll back.
    """

    base_format: str
    created: dict[str, float] = attrs.field(factory=dict)  # snapshot id -> creation time (s)
    journal: tuple[dict, ...] = ()
    version: int = 1

    def to_json(self) -> bytes:
        document = {"version": self.version, "format": self.base_format, "snapshots": {
            snap: {"created": created} for snap, created in sorted(self.created.items())
        }}
        if self.journal:
            document["journal"] = list(self.journal)
        return json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"

    def with_created(self, snapshot: str, created: float) -> "Sidecar":
        return attrs.evolve(self, created={**self.created, snapshot: created})

    def without(self, snapshot: str) -> "Sidecar":
        return attrs.evolve(self, created={k: v for k, v in self.created.items() if k != snapshot})

    def with_entry(self, entry: dict) -> "Sidecar":
        return attrs.evolve(self, journal=self.journal + (entry,))

    def without_entry(self, entry: dict) -> "Sidecar":
        return attrs.evolve(self, journal=tuple(e for e in self.journal if e != entry))

    def replace_entry(self, old: dict, new: dict) -> "Sidecar":
        return attrs.evolve(self, journal=tuple(new if e == old else e for e in self.journal))


def parse_sidecar(data: bytes, *, name: str) -> Sidecar:
    try:
        document = json.loads(data)
        base_format = document["format"]
        snapshots = document.get("snapshots", {})
        created = {str(k): float(v["created"]) for k, v in snapshots.items()}
        version = int(document.get("version", 1))
        journal = tuple(dict(e) for e in document.get("journal", []))
        if not all(isinstance(e.get("op"), str) for e in journal):
            raise ValueError("journal entries need an 'op'")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptImage(f"{name}: unreadable vfsnap record ({exc!r})") from None
    if base_format not in ("raw", "qcow2"):
        raise CorruptImage(f"{name}: unknown base format {base_format!r}")
    return Sidecar(base_format=base_format, created=created, journal=journal, version=version)
