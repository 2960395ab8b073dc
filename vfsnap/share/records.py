"""vfsnap's own records on the share, typed, and validated in the one place they are read.

The share is written by others (Cinder, other hosts, an admin), so every document vfsnap keeps
there is untrusted input: the sidecar `<vol>.vfsnap.json` (base format, creation times, the
journal of chain changes) and the plan of a rename under way (`.vfsnap-rename-<hash>`). This
module turns their JSON into frozen records (`parse_sidecar`, `parse_rename_plan`) or refuses the
document with `CorruptRecord` (EIO), naming the file and the field; nothing else comes out of a
parse, whatever the bytes (tests/test_records.py fuzzes it). Everything past this point reads
attributes that are known to be there and of the right type.

Writing goes through the same records (`to_json`), in the format earlier versions wrote, byte for
byte: `json.dumps(document, indent=1, sort_keys=True)`, with a final newline for the sidecar only.
Keys a record does not know are dropped when it is written again (as before); a journal entry of
an operation this version does not know (`UnknownEntry`) is kept as it was read.

Journal entries, one class per operation (`op`), each written before the operation's first step
and removed after its last (DESIGN.md invariant 3; docs/design-notes.md):
  snapshot  `SnapshotEntry`  taking a snapshot (vfsnap/share/snapshots.py)
  delete    `DeleteEntry`    deleting one: merge pending or running (snapshots.py)
  revert    `RevertEntry`    reverting to one (vfsnap/share/revert.py)
  clone     `CloneEntry`     a clone's copy not finished yet (vfsnap/share/clone.py)
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Union

import attrs

from vfsnap.errors import CorruptRecord
from vfsnap.names import NAME_MAX, SIDECAR_SUFFIX, is_file_of, is_snapshot_name, overlay_file

FORMATS = ("raw", "qcow2")
# Creation times are served as st_mtime_ns (int64) and as ISO dates: kept within both.
MAX_TIME = float(1 << 33)  # year 2242


# -- reading one JSON object with typed fields --------------------------------------------------


class _Fields:
    """The fields of one JSON object of a record; every failure names the file and the field."""

    def __init__(self, document: Any, *, file: str, where: str):
        self.file = file
        self.where = where  # e.g. "journal[2]"; "" for the document itself
        if not isinstance(document, dict):
            raise self.error(None, f"must be a JSON object, not {_kind(document)}")
        self.document = document

    def error(self, key: str | None, message: str) -> CorruptRecord:
        field = ".".join(p for p in (self.where, key) if p)
        return CorruptRecord(f"{self.file}: {field + ': ' if field else ''}{message}")

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.document:
            if optional:
                return None
            raise self.error(key, "missing")
        return self.document[key]

    def text(self, key: str, *, optional: bool = False) -> str | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, not {_kind(value)}")
        return value

    def name(self, key: str, *, optional: bool = False) -> str | None:
        """A plain file name on the share (no path, fits NAME_MAX)."""
        value = self.text(key, optional=optional)
        if value is not None:
            self._check_name(key, value)
        return value

    def own(self, key: str, volume: str | None, *, base: bool = True) -> str:
        """A file of `volume`'s own chain (`<vol>` when `base`, or `<vol>.<snap>`): what a journal
        entry creates, rewrites or deletes may be nothing else (another volume's file, say)."""
        value = self.name(key)
        if volume is not None and not (is_file_of(volume, value) and (base or value != volume)):
            raise self.error(key, f"{value!r} is not {'a' if base else 'an overlay'} file of volume {volume!r}")
        return value

    def own_names(self, key: str, volume: str | None) -> tuple[str, ...]:
        values = self.names(key)
        for i, value in enumerate(values):
            if volume is not None and not is_file_of(volume, value):
                raise self.error(f"{key}[{i}]", f"{value!r} is not a file of volume {volume!r}")
        return values

    def snapshot(self, key: str) -> str:
        value = self.text(key)
        self._check_name(key, value)
        if not is_snapshot_name(value):
            raise self.error(key, f"{value!r} is not a valid snapshot name")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.text(key)
        if value not in options:
            raise self.error(key, f"{value!r} is not one of {', '.join(options)}")
        return value

    def integer(self, key: str, *, default: int | None = None, minimum: int = 0, maximum: int = 1 << 63) -> int:
        value = self._get(key, default is not None)
        if value is None and default is not None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            raise self.error(key, f"must be an integer from {minimum} to {maximum}, not {_short(value)}")
        return value

    def time(self, key: str) -> float:
        value = self._get(key, False)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and 0 <= value < MAX_TIME):
            raise self.error(key, f"must be a time in seconds since 1970, not {_short(value)}")
        return float(value)

    def names(self, key: str) -> tuple[str, ...]:
        value = self._get(key, False)
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, not {_kind(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.error(f"{key}[{i}]", f"must be a string, not {_kind(item)}")
            self._check_name(f"{key}[{i}]", item)
        return tuple(value)

    def name_map(self, key: str, *, values: tuple[str, ...] | None = None, snapshot_keys: bool = False) -> dict:
        """An object of names to names (or to one of `values`)."""
        value = self._get(key, False)
        if not isinstance(value, dict):
            raise self.error(key, f"must be a JSON object, not {_kind(value)}")
        for k, v in value.items():
            self._check_name(key, k)
            if snapshot_keys and not is_snapshot_name(k):
                raise self.error(key, f"{k!r} is not a valid snapshot name")
            if not isinstance(v, str):
                raise self.error(f"{key}.{k}", f"must be a string, not {_kind(v)}")
            if values is not None and v not in values:
                raise self.error(f"{key}.{k}", f"{v!r} is not one of {', '.join(values)}")
            if values is None:
                self._check_name(f"{key}.{k}", v)
        return dict(value)

    def objects(self, key: str, *, default: Any) -> list[_Fields]:
        """A list of JSON objects (journal entries)."""
        value = self._get(key, True)
        if value is None:
            value = default
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, not {_kind(value)}")
        return [_Fields(item, file=self.file, where=f"{self.where + '.' if self.where else ''}{key}[{i}]")
                for i, item in enumerate(value)]

    def _check_name(self, key: str, value: str) -> None:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            raise self.error(key, f"{_short(value)} is not valid UTF-8") from None
        if not value or "/" in value or "\0" in value or value in (".", "..") or size > NAME_MAX:
            raise self.error(key, f"{_short(value)} is not a plain file name on the share")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _load(data: bytes, file: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CorruptRecord(f"{file}: not valid JSON ({exc})") from None


# -- journal entries ------------------------------------------------------------------------------


def _optional(key: str, value: str | None) -> dict:
    return {} if value is None else {key: value}


@attrs.frozen
class SnapshotEntry:
    """Snapshot `snapshot` being taken: `overlay` created over the active image `backing`.
    `hidden_for`: the point in time of clone `hidden_for`, deleted as soon as it is taken."""

    op: ClassVar[str] = "snapshot"
    snapshot: str
    overlay: str
    backing: str
    hidden_for: str | None = None

    @classmethod
    def parse(cls, f: _Fields, volume: str | None) -> SnapshotEntry:
        entry = cls(snapshot=f.snapshot("snapshot"), overlay=f.own("overlay", volume, base=False),
                    backing=f.own("backing", volume), hidden_for=f.name("hidden_for", optional=True))
        if volume is not None and entry.overlay != overlay_file(volume, entry.snapshot):
            raise f.error("overlay", f"must be {overlay_file(volume, entry.snapshot)!r}")
        return entry

    def to_json(self) -> dict:
        return {"op": self.op, "snapshot": self.snapshot, "overlay": self.overlay, "backing": self.backing,
                **_optional("hidden_for", self.hidden_for)}


@attrs.frozen
class DeleteEntry:
    """Snapshot `snapshot` deleted (hidden from the tree); its `overlay` is merged in the
    background. `held_for`: a clone's point in time, kept while that clone reads from it."""

    op: ClassVar[str] = "delete"
    snapshot: str
    overlay: str
    held_for: str | None = None

    @classmethod
    def parse(cls, f: _Fields, volume: str | None) -> DeleteEntry:
        return cls(snapshot=f.snapshot("snapshot"), overlay=f.own("overlay", volume, base=False),
                   held_for=f.name("held_for", optional=True))

    def to_json(self) -> dict:
        return {"op": self.op, "snapshot": self.snapshot, "overlay": self.overlay,
                **_optional("held_for", self.held_for)}


REVERT_STATES = ("started", "created")
REVERT_PREFIX = ".vfsnap-revert-"  # vfsnap/share/revert.py fresh_file


@attrs.frozen
class RevertEntry:
    """A revert to `snapshot`: the fresh image `overlay` (over `backing`, `size` bytes) replaces
    the snapshot's overlay `target`; `files` (the images above it) go, and with them the
    snapshots in `drop`. `state` "created": past the fresh image, rolled forward after a crash."""

    op: ClassVar[str] = "revert"
    snapshot: str
    target: str
    overlay: str
    backing: str
    backing_format: str
    size: int
    drop: dict[str, str]  # newer snapshot -> its overlay
    files: tuple[str, ...]
    state: str

    @classmethod
    def parse(cls, f: _Fields, volume: str | None) -> RevertEntry:
        entry = cls(snapshot=f.snapshot("snapshot"), target=f.own("target", volume, base=False),
                    overlay=f.name("overlay"), backing=f.own("backing", volume),
                    backing_format=f.choice("backing_format", FORMATS), size=f.integer("size"),
                    drop=f.name_map("drop", snapshot_keys=True), files=f.own_names("files", volume),
                    state=f.choice("state", REVERT_STATES))
        if not entry.overlay.startswith(REVERT_PREFIX):
            raise f.error("overlay", f"{entry.overlay!r} is not a file a revert creates ({REVERT_PREFIX}*)")
        if entry.backing == entry.target:
            raise f.error("backing", "is the file the revert replaces")
        return entry

    def to_json(self) -> dict:
        return {"op": self.op, "snapshot": self.snapshot, "target": self.target, "overlay": self.overlay,
                "backing": self.backing, "backing_format": self.backing_format, "size": self.size,
                "drop": dict(self.drop), "files": list(self.files), "state": self.state}


@attrs.frozen
class CloneEntry:
    """A clone of `source`@`snapshot` whose copy has not finished: its chain runs on into the
    `linked` volumes' files (nearest first, with their base formats), and the files in `pins`
    may not change meanwhile. `source_overlay` is the snapshot's overlay, `top` the image the
    clone's base is backed by."""

    op: ClassVar[str] = "clone"
    source: str
    snapshot: str
    source_overlay: str
    top: str
    linked: tuple[tuple[str, str], ...]
    pins: tuple[str, ...]

    @classmethod
    def parse(cls, f: _Fields, volume: str | None) -> CloneEntry:
        raw = f._get("linked", False)
        if not isinstance(raw, list):
            raise f.error("linked", f"must be a list, not {_kind(raw)}")
        linked = []
        for i, pair in enumerate(raw):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise f.error(f"linked[{i}]", "must be a [volume, format] pair of strings")
            f._check_name(f"linked[{i}]", pair[0])
            if pair[1] not in FORMATS:
                raise f.error(f"linked[{i}]", f"{pair[1]!r} is not one of {', '.join(FORMATS)}")
            linked.append((pair[0], pair[1]))
        return cls(source=f.name("source"), snapshot=f.snapshot("snapshot"), source_overlay=f.name("source_overlay"),
                   top=f.name("top"), linked=tuple(linked), pins=f.names("pins"))

    def to_json(self) -> dict:
        return {"op": self.op, "source": self.source, "snapshot": self.snapshot,
                "source_overlay": self.source_overlay, "top": self.top,
                "linked": [list(pair) for pair in self.linked], "pins": list(self.pins)}


@attrs.frozen
class UnknownEntry:
    """An entry of an operation this version does not know (a newer vfsnap's): left alone,
    written back as it was read."""

    op: str
    document: dict = attrs.field(eq=False)
    _key: str = attrs.field(default="", repr=False)  # compared by content

    @classmethod
    def parse(cls, f: _Fields, volume: str | None) -> UnknownEntry:
        return cls(op=f.text("op"), document=dict(f.document), key=json.dumps(f.document, sort_keys=True))

    @property
    def overlay(self) -> str | None:
        value = self.document.get("overlay")
        return value if isinstance(value, str) else None

    def to_json(self) -> dict:
        return dict(self.document)


JournalEntry = Union[SnapshotEntry, DeleteEntry, RevertEntry, CloneEntry, UnknownEntry]
_ENTRY_TYPES = {cls.op: cls for cls in (SnapshotEntry, DeleteEntry, RevertEntry, CloneEntry)}


def _parse_entry(f: _Fields, volume: str | None) -> JournalEntry:
    op = f.text("op")
    return _ENTRY_TYPES.get(op, UnknownEntry).parse(f, volume)


# -- the sidecar ---------------------------------------------------------------------------------


@attrs.frozen
class Sidecar:
    """The contents of `<vol>.vfsnap.json`.

    `journal` lists the chain changes that were started and not yet finished, oldest first
    (DESIGN.md invariant 3): each entry is written durably before the first step of its
    operation and removed after the last, so the next mount can finish or roll back.
    """

    base_format: str
    created: dict[str, float] = attrs.field(factory=dict)  # snapshot id -> creation time (s)
    journal: tuple[JournalEntry, ...] = ()
    version: int = 1

    def to_json(self) -> bytes:
        document: dict[str, Any] = {"version": self.version, "format": self.base_format, "snapshots": {
            snap: {"created": created} for snap, created in sorted(self.created.items())
        }}
        if self.journal:
            document["journal"] = [entry.to_json() for entry in self.journal]
        return json.dumps(document, indent=1, sort_keys=True).encode() + b"\n"

    def entries(self, kind: type) -> list:
        """The journal's entries of one kind (`DeleteEntry`, ...), oldest first."""
        return [entry for entry in self.journal if isinstance(entry, kind)]

    def journal_overlays(self) -> frozenset[str]:
        """The files the journal names as overlays of the volume itself (being created,
        deleted or replaced): never volumes of their own."""
        return frozenset(entry.overlay for entry in self.journal
                         if not isinstance(entry, CloneEntry) and entry.overlay is not None)

    def with_created(self, snapshot: str, created: float) -> Sidecar:
        return attrs.evolve(self, created={**self.created, snapshot: created})

    def without(self, snapshot: str) -> Sidecar:
        return attrs.evolve(self, created={k: v for k, v in self.created.items() if k != snapshot})

    def with_entry(self, entry: JournalEntry) -> Sidecar:
        return attrs.evolve(self, journal=self.journal + (entry,))

    def without_entry(self, entry: JournalEntry) -> Sidecar:
        return attrs.evolve(self, journal=tuple(e for e in self.journal if e != entry))

    def replace_entry(self, old: JournalEntry, new: JournalEntry) -> Sidecar:
        return attrs.evolve(self, journal=tuple(new if e == old else e for e in self.journal))


def parse_sidecar(data: bytes, *, name: str) -> Sidecar:
    """The sidecar in `data` (the file `name`), or CorruptRecord naming the field at fault.

    The files a journal entry creates, rewrites or deletes must be files of the volume itself
    (named as its chain's files are: `<vol>`, `<vol>.<snap>`), the volume being the sidecar's
    (`name` is `<vol>.vfsnap.json`): a record does not make vfsnap touch another volume's file.
    """
    volume = name[: -len(SIDECAR_SUFFIX)] if name.endswith(SIDECAR_SUFFIX) else None
    f = _Fields(_load(data, name), file=name, where="")
    base_format = f.choice("format", FORMATS)
    version = f.integer("version", default=1)
    snapshots = f._get("snapshots", True)
    if snapshots is None:
        snapshots = {}
    if not isinstance(snapshots, dict):
        raise f.error("snapshots", f"must be a JSON object, not {_kind(snapshots)}")
    created = {snap: _Fields(record, file=name, where=f"snapshots.{snap}").time("created")
               for snap, record in snapshots.items()}
    journal = tuple(_parse_entry(entry, volume) for entry in f.objects("journal", default=[]))
    return Sidecar(base_format=base_format, created=created, journal=journal, version=version)


# -- the plan of a rename -------------------------------------------------------------------------


@attrs.frozen
class RenamePlan:
    """Volume `old` renamed to `new`: every file of `files` to its new name; `chain` lists the
    old chain's files, base first, with their `formats`, for the backing names to rewrite."""

    op: ClassVar[str] = "rename"
    old: str
    new: str
    files: dict[str, str]  # old file name -> new file name
    chain: tuple[str, ...]
    formats: dict[str, str]  # chain file -> its format

    def to_json(self) -> bytes:
        document = {"op": self.op, "from": self.old, "to": self.new, "files": dict(self.files),
                    "chain": list(self.chain), "formats": dict(self.formats)}
        return json.dumps(document, indent=1, sort_keys=True).encode()

    def reversed(self) -> RenamePlan:
        """The plan that takes a (partly) renamed volume back to its old names."""
        files = self.files
        return RenamePlan(old=self.new, new=self.old, files={new: old for old, new in files.items()},
                          chain=tuple(files[name] for name in self.chain),
                          formats={files[name]: fmt for name, fmt in self.formats.items()})


def parse_rename_plan(data: bytes, *, name: str) -> RenamePlan:
    """The rename plan in `data` (the file `name`), or CorruptRecord naming the field at fault."""
    f = _Fields(_load(data, name), file=name, where="")
    if f.text("op") != RenamePlan.op:
        raise f.error("op", f"{f.document['op']!r} is not 'rename'")
    plan = RenamePlan(old=f.name("from"), new=f.name("to"), files=f.name_map("files"), chain=f.names("chain"),
                      formats=f.name_map("formats", values=FORMATS))
    # What the steps of a rename rely on (vfsnap/share/rename.py run_rename).
    if not plan.chain or plan.chain[0] != plan.old:
        raise f.error("chain", f"must start with the volume's base {plan.old!r}")
    for file in plan.chain:
        if file not in plan.files:
            raise f.error("files", f"has no new name for the chain's file {file!r}")
        if file not in plan.formats:
            raise f.error("formats", f"has no format for the chain's file {file!r}")
    for file in plan.formats:
        if file not in plan.chain:
            raise f.error("formats", f"names {file!r}, not a file of the chain")
    for file, target in plan.files.items():
        if not is_file_of(plan.old, file) or not is_file_of(plan.new, target):
            raise f.error(f"files.{file}",
                          f"renames {file!r} to {target!r}: not files of {plan.old!r} and {plan.new!r}")
    if plan.files[plan.old] != plan.new:
        raise f.error(f"files.{plan.old}", f"must be {plan.new!r}")
    if len(set(plan.files.values())) != len(plan.files):
        raise f.error("files", "names one new file twice")
    return plan
