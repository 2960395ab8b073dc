"""vfsnap's records on the share (sidecars, journal entries, rename plans) are untrusted input:
parsed in one place (vfsnap/share/records.py) into typed records, or refused with CorruptRecord
naming the file and the field. Nothing else may come out of a parse, whatever the document; what
vfsnap wrote before the records were typed still parses, and is written back byte for byte.

The hostile documents placed on a mounted share are in tests/test_hostile.py
(`test_hostile_records_fail_only_their_volume`).
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vfsnap.errors import CorruptRecord
from vfsnap.share.records import (
    CloneEntry,
    DeleteEntry,
    RenamePlan,
    RevertEntry,
    SnapshotEntry,
    UnknownEntry,
    parse_rename_plan,
    parse_sidecar,
)

# Written by vfsnap at 4154a76, before the records were typed (Sidecar.to_json with dict entries,
# rename_volume's json.dumps of the plan): every kind of journal entry and a rename plan.
OLD_SIDECAR = b"""\
{
 "format": "raw",
 "journal": [
  {
   "backing": "vol.s1",
   "op": "snapshot",
   "overlay": "vol.s2",
   "snapshot": "s2"
  },
  {
   "backing": "vol.s2",
   "hidden_for": "copy",
   "op": "snapshot",
   "overlay": "vol.clone-0a1b2c3d4e5f",
   "snapshot": "clone-0a1b2c3d4e5f"
  },
  {
   "op": "delete",
   "overlay": "vol.s1",
   "snapshot": "s1"
  },
  {
   "held_for": "copy",
   "op": "delete",
   "overlay": "vol.clone-0a1b2c3d4e5f",
   "snapshot": "clone-0a1b2c3d4e5f"
  },
  {
   "backing": "vol",
   "backing_format": "raw",
   "drop": {
    "s2": "vol.s2"
   },
   "files": [
    "vol.s2",
    "vol.s3"
   ],
   "op": "revert",
   "overlay": ".vfsnap-revert-0123456789abcdef01234567",
   "size": 1073741824,
   "snapshot": "s1",
   "state": "created",
   "target": "vol.s1"
  }
 ],
 "snapshots": {
  "s1": {
   "created": 1764770000.25
  },
  "s2": {
   "created": 1764770001.5
  }
 },
 "version": 1
}
"""
OLD_CLONE_SIDECAR = b"""\
{
 "format": "qcow2",
 "journal": [
  {
   "linked": [
    [
     "vol",
     "raw"
    ],
    [
     "orig",
     "qcow2"
    ]
   ],
   "op": "clone",
   "pins": [
    "orig",
    "vol"
   ],
   "snapshot": "s1",
   "source": "vol",
   "source_overlay": "vol.s1",
   "top": "vol"
  }
 ],
 "snapshots": {},
 "version": 1
}
"""
OLD_EMPTY_SIDECAR = b"""\
{
 "format": "qcow2",
 "snapshots": {},
 "version": 1
}
"""
OLD_RENAME_PLAN = b"""\
{
 "chain": [
  "a",
  "a.s1",
  "a.s2"
 ],
 "files": {
  "a": "b",
  "a.s1": "b.s1",
  "a.s2": "b.s2"
 },
 "formats": {
  "a": "raw",
  "a.s1": "qcow2",
  "a.s2": "qcow2"
 },
 "from": "a",
 "op": "rename",
 "to": "b"
}"""


@pytest.mark.parametrize("data", [OLD_SIDECAR, OLD_CLONE_SIDECAR, OLD_EMPTY_SIDECAR], ids=["entries", "clone", "empty"])
def test_sidecars_written_before_typing_parse_and_are_written_back_unchanged(data):
    sidecar = parse_sidecar(data, name="vol.vfsnap.json")
    assert sidecar.to_json() == data


def test_sidecar_fields_are_typed():
    sidecar = parse_sidecar(OLD_SIDECAR, name="vol.vfsnap.json")
    assert sidecar.base_format == "raw" and sidecar.version == 1
    assert sidecar.created == {"s1": 1764770000.25, "s2": 1764770001.5}
    assert sidecar.journal == (
        SnapshotEntry(snapshot="s2", overlay="vol.s2", backing="vol.s1"),
        SnapshotEntry(snapshot="clone-0a1b2c3d4e5f", overlay="vol.clone-0a1b2c3d4e5f", backing="vol.s2",
                      hidden_for="copy"),
        DeleteEntry(snapshot="s1", overlay="vol.s1"),
        DeleteEntry(snapshot="clone-0a1b2c3d4e5f", overlay="vol.clone-0a1b2c3d4e5f", held_for="copy"),
        RevertEntry(snapshot="s1", target="vol.s1", overlay=".vfsnap-revert-0123456789abcdef01234567", backing="vol",
                    backing_format="raw", size=1 << 30, drop={"s2": "vol.s2"}, files=("vol.s2", "vol.s3"),
                    state="created"),
    )
    assert [e.snapshot for e in sidecar.entries(DeleteEntry)] == ["s1", "clone-0a1b2c3d4e5f"]
    assert sidecar.journal_overlays() == {"vol.s2", "vol.clone-0a1b2c3d4e5f", "vol.s1",
                                          ".vfsnap-revert-0123456789abcdef01234567"}
    clone = parse_sidecar(OLD_CLONE_SIDECAR, name="copy.vfsnap.json").journal[0]
    assert clone == CloneEntry(source="vol", snapshot="s1", source_overlay="vol.s1", top="vol",
                               linked=(("vol", "raw"), ("orig", "qcow2")), pins=("orig", "vol"))
    assert parse_sidecar(OLD_CLONE_SIDECAR, name="copy.vfsnap.json").journal_overlays() == frozenset()


def test_rename_plan_written_before_typing_parses_and_is_written_back_unchanged():
    plan = parse_rename_plan(OLD_RENAME_PLAN, name=".vfsnap-rename-x")
    assert plan == RenamePlan(old="a", new="b", files={"a": "b", "a.s1": "b.s1", "a.s2": "b.s2"},
                              chain=("a", "a.s1", "a.s2"), formats={"a": "raw", "a.s1": "qcow2", "a.s2": "qcow2"})
    assert plan.to_json() == OLD_RENAME_PLAN
    back = plan.reversed()
    assert (back.old, back.new, back.chain) == ("b", "a", ("b", "b.s1", "b.s2"))
    assert back.reversed() == plan


def test_unknown_operations_are_kept_as_read():
    document = {"format": "qcow2", "journal": [{"op": "defrag", "overlay": "vol.s9", "level": [1, 2]}]}
    sidecar = parse_sidecar(json.dumps(document).encode(), name="vol.vfsnap.json")
    (entry,) = sidecar.journal
    assert isinstance(entry, UnknownEntry) and entry.op == "defrag" and entry.overlay == "vol.s9"
    assert json.loads(sidecar.to_json())["journal"] == document["journal"]
    assert sidecar.without_entry(parse_sidecar(json.dumps(document).encode(), name="x").journal[0]).journal == ()


def _sidecar_with(entry: dict) -> bytes:
    return json.dumps({"format": "raw", "journal": [entry]}).encode()


@pytest.mark.parametrize("data,field", [
    (b"{", "not valid JSON"),
    (b"[]", "must be a JSON object, not a list"),
    (b'{"format": "vmdk"}', "format: 'vmdk' is not one of raw, qcow2"),
    (b'{"snapshots": {}}', "format: missing"),
    (b'{"format": "raw", "version": "1"}', "version: must be an integer"),
    (b'{"format": "raw", "snapshots": {"s1": {}}}', "snapshots.s1.created: missing"),
    (b'{"format": "raw", "snapshots": {"s1": {"created": 1e300}}}', "snapshots.s1.created: must be a time"),
    (b'{"format": "raw", "snapshots": {"s1": {"created": NaN}}}', "snapshots.s1.created: must be a time"),
    (b'{"format": "raw", "journal": {}}', "journal: must be a list"),
    (b'{"format": "raw", "journal": [3]}', "journal[0]: must be a JSON object, not a number"),
    (_sidecar_with({"snapshot": "s1"}), "journal[0].op: missing"),
    (_sidecar_with({"op": "delete", "snapshot": "s1"}), "journal[0].overlay: missing"),
    (_sidecar_with({"op": "delete", "snapshot": "s1", "overlay": 7}), "journal[0].overlay: must be a string"),
    (_sidecar_with({"op": "delete", "snapshot": "s1", "overlay": "../x"}), "journal[0].overlay: '../x' is not a plain"),
    (_sidecar_with({"op": "delete", "snapshot": "s.1", "overlay": "v.s1"}),
     "journal[0].snapshot: 's.1' is not a valid"),
    (_sidecar_with({"op": "snapshot", "snapshot": "s1", "overlay": "vol.s1"}), "journal[0].backing: missing"),
    (_sidecar_with({"op": "revert", "snapshot": "s1", "target": "vol.s1", "overlay": ".vfsnap-revert-x",
                    "backing": "vol",
                    "backing_format": "raw", "size": -1, "drop": {}, "files": [], "state": "started"}),
     "journal[0].size: must be an integer"),
    (_sidecar_with({"op": "revert", "snapshot": "s1", "target": "vol.s1", "overlay": ".vfsnap-revert-x",
                    "backing": "vol",
                    "backing_format": "raw", "size": 1, "drop": {}, "files": [None], "state": "started"}),
     "journal[0].files[0]: must be a string"),
    # What an entry creates, rewrites or deletes is a file of the volume itself.
    (_sidecar_with({"op": "delete", "snapshot": "s1", "overlay": "victim"}),
     "journal[0].overlay: 'victim' is not an overlay file of volume 'vol'"),
    (_sidecar_with({"op": "delete", "snapshot": "s1", "overlay": "vol"}),
     "journal[0].overlay: 'vol' is not an overlay"),
    (_sidecar_with({"op": "snapshot", "snapshot": "s1", "overlay": "vol.s2", "backing": "vol"}),
     "journal[0].overlay: must be 'vol.s1'"),
    (_sidecar_with({"op": "revert", "snapshot": "s1", "target": "vol.s1", "overlay": ".vfsnap-revert-x",
                    "backing": "vol",
                    "backing_format": "raw", "size": 1, "drop": {}, "files": ["victim"], "state": "started"}),
     "journal[0].files[0]: 'victim' is not a file of volume 'vol'"),
    (_sidecar_with({"op": "revert", "snapshot": "s1", "target": "vol.s1", "overlay": "victim", "backing": "vol",
                    "backing_format": "raw", "size": 1, "drop": {}, "files": [], "state": "started"}),
     "journal[0].overlay: 'victim' is not a file a revert creates"),
    (_sidecar_with({"op": "clone", "source": "v", "snapshot": "s1", "source_overlay": "v.s1", "top": "v",
                    "linked": [["v"]], "pins": []}), "journal[0].linked[0]: must be a [volume, format] pair"),
])
def test_a_bad_sidecar_is_refused_naming_the_file_and_the_field(data, field):
    with pytest.raises(CorruptRecord) as exc:
        parse_sidecar(data, name="vol.vfsnap.json")
    assert str(exc.value).startswith("vol.vfsnap.json: ") and field in str(exc.value), str(exc.value)
    assert exc.value.errno == 5  # EIO, as a malformed image


@pytest.mark.parametrize("change,field", [
    ({"op": "delete"}, "op: 'delete' is not 'rename'"),
    ({"chain": []}, "chain: must start with the volume's base 'a'"),
    ({"chain": ["a", "a.s9"]}, "files: has no new name for the chain's file 'a.s9'"),
    ({"formats": {"a": "raw"}}, "formats: has no format for the chain's file 'a.s1'"),
    ({"formats": {"a": "raw", "a.s1": "qcow2", "a.s2": "qcow2", "x": "raw"}}, "formats: names 'x'"),
    ({"files": {"a": "b", "a.s1": "b.s1", "a.s2": "b.s1"}}, "files: names one new file twice"),
    ({"files": {"a": "b.s3", "a.s1": "b.s1", "a.s2": "b.s2"}}, "files.a: must be 'b'"),
    ({"files": {"a": "b", "a.s1": "b.s1", "a.s2": "b.s2", "victim": "b.s3"}}, "files.victim: renames 'victim'"),
    ({"files": {"a": "b", "a.s1": "b.s1", "a.s2": "victim"}}, "files.a.s2: renames 'a.s2' to 'victim'"),
    ({"to": None}, "to: must be a string, not null"),
])
def test_a_bad_rename_plan_is_refused_naming_the_field(change, field):
    document = {**json.loads(OLD_RENAME_PLAN), **change}
    with pytest.raises(CorruptRecord) as exc:
        parse_rename_plan(json.dumps(document).encode(), name=".vfsnap-rename-x")
    assert str(exc.value).startswith(".vfsnap-rename-x: ") and field in str(exc.value), str(exc.value)


# -- any document: a record or CorruptRecord, nothing else ------------------------------------------

FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NAMES = st.sampled_from(["vol", "vol.s1", "vol.s2", "s1", "clone-1", "raw", "qcow2", "op", "delete", "snapshot",
                         "revert", "clone", "rename", "started", "created", "", ".", "..", "a/b", "\x00",
                         "\ud800", "é", "x" * 300, "format", "journal", "snapshots"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), NAMES)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=4) | NAMES, inner, max_size=4), max_leaves=20)


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, path + (i,))


@st.composite
def mutated(draw, seeds: list[bytes]):
    """A valid document with a few of its values replaced, keys dropped or lists emptied."""
    document = json.loads(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(document) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return json.dumps(document).encode()


def _parses_or_refuses(parse, data: bytes, name: str):
    try:
        record = parse(data, name=name)
    except CorruptRecord as exc:
        assert str(exc).startswith(name + ": ")
        return None
    # What parsed is written back as a document that parses to the same record.
    assert parse(record.to_json(), name=name) == record
    return record


@FUZZ
@given(st.one_of(mutated([OLD_SIDECAR, OLD_CLONE_SIDECAR, OLD_EMPTY_SIDECAR]),
                 JSON.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64)))
def test_any_sidecar_document_is_a_record_or_corrupt_record(data):
    sidecar = _parses_or_refuses(parse_sidecar, data, "vol.vfsnap.json")
    if sidecar is not None:
        for entry in sidecar.journal:
            assert isinstance(entry, (SnapshotEntry, DeleteEntry, RevertEntry, CloneEntry, UnknownEntry))
            assert isinstance(entry.op, str)
        assert all(isinstance(t, float) for t in sidecar.created.values())
        assert isinstance(sidecar.journal_overlays(), frozenset)


@FUZZ
@given(st.one_of(mutated([OLD_RENAME_PLAN]), JSON.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64)))
def test_any_rename_plan_document_is_a_plan_or_corrupt_record(data):
    plan = _parses_or_refuses(parse_rename_plan, data, ".vfsnap-rename-x")
    if plan is not None:
        assert plan.reversed().reversed() == plan  # what run_rename's undo relies on


def test_deeply_nested_json_is_refused():
    with pytest.raises(CorruptRecord):
        parse_sidecar(b"[" * 100000 + b"]" * 100000, name="vol.vfsnap.json")
