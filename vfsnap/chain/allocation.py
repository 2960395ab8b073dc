"""Allocation maps of views and the extents changed since a snapshot (`vfsnap map`, `vfsnap diff`).

A view's map is `qemu-img map --output=json` of its chain: every byte of the virtual disk is in
exactly one entry, which says whether it is `data`, whether it reads as `zero`, whether some image
of the chain holds it (`present`), and at which `depth` (0: the view's top image) that was
decided. QEMU's `get_block_status` asks each image from the top down until one answers with data
or zeros; an overlay reads zeros past the end of a shorter backing file (`present` false, at the
overlay's depth), and a qcow2 bottom image reads zeros where it holds nothing (`present` false).
Entries with equal flags are merged (QEMU also splits on host offsets, which mean nothing through
the mount).

What may differ between a snapshot S and a later view F of the same volume: S's data is the chain
below S's overlay, and F's chain is that same chain with S's overlay and the images above it up to
F's top on top of it. Outside the ranges those upper images hold (as data or zero flags), F reads
exactly what S reads. This stays exact across merges of deleted snapshots in between: a merge
copies an overlay's ranges into the overlay below it, which is still above S's boundary
(`vfsnap.chain.merge`). Every function here reads metadata only (`vfsnap.format.allocation`).
"""

from __future__ import annotations

import attrs

from vfsnap.format import DATA, UNALLOCATED, ZERO, Image
from vfsnap.format.allocation import allocation


@attrs.frozen
class MapEntry:
    """One entry of a view's map, in `qemu-img map --output=json` terms."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool

    @property
    def end(self) -> int:
        return self.start + self.length

    def same_flags(self, other: "MapEntry") -> bool:
        return (self.depth, self.present, self.zero, self.data) == (other.depth, other.present, other.zero, other.data)


@attrs.frozen
class ChangedExtent:
    """One entry of a diff, in `rbd diff --format json` terms: `exists` false where the view now
    reads zeros without data (a zeroed or discarded range)."""

    offset: int
    length: int
    exists: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


def view_map(images: list[Image], start: int, end: int) -> list[MapEntry]:
    """The map of guest [start, end) of the view whose chain is `images` (bottom first)."""
    end = min(end, images[-1].size)
    pieces: list[tuple[int, int, int, bool, bool, bool]] = []  # start, end, depth, present, zero, data
    pending = [(start, end)] if start < end else []
    for depth, image in enumerate(reversed(images)):
        if not pending:
            break
        below: list[tuple[int, int]] = []
        for s, e in pending:
            if e > image.size:  # past the end of a shorter backing file: the overlay reads zeros
                pieces.append((max(s, image.size), e, depth - 1, False, True, False))
                e = image.size
            for run_start, run_end, kind in allocation(image, s, e):
                if kind == UNALLOCATED:
                    below.append((run_start, run_end))
                else:
                    pieces.append((run_start, run_end, depth, True, kind == ZERO, kind == DATA))
        pending = below
    for s, e in pending:  # held by no image: a qcow2 bottom image reads zeros there
        pieces.append((s, e, len(images) - 1, False, True, False))
    pieces.sort()
    entries: list[MapEntry] = []
    for s, e, depth, present, zero, data in pieces:
        entry = MapEntry(s, e - s, depth, present, zero, data)
        if entries and entries[-1].end == s and entries[-1].same_flags(entry):
            entry = attrs.evolve(entries[-1], length=e - entries[-1].start)
            entries[-1] = entry
        else:
            entries.append(entry)
    return entries


def changed_ranges(upper: list[Image], below_size: int, start: int, end: int) -> list[tuple[int, int]]:
    """Sorted, merged ranges of guest [start, end) that `upper` (the images above a snapshot's
    boundary, bottom first) hold as data or zeros; plus what lies past the end of an upper image
    shorter than the snapshot (`below_size`), where the view above reads zeros instead."""
    ranges: list[tuple[int, int]] = []
    for image in upper:
        for run_start, run_end, kind in allocation(image, start, end):
            if kind != UNALLOCATED:
                ranges.append((run_start, run_end))
    shortest = min(image.size for image in upper)
    if shortest < below_size:
        ranges.append((max(start, shortest), min(end, below_size)))
    ranges.sort()
    merged: list[tuple[int, int]] = []
    for s, e in ranges:
        if s >= e:
            continue
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def diff_extents(images: list[Image], boundary: int | None, start: int, end: int) -> list[ChangedExtent]:
    """The extents of guest [start, end) of the view `images` that may differ from the snapshot
    whose data is `images[:boundary]`; with `boundary` None, every extent holding data (as
    `rbd diff` without `--from-snap`)."""
    end = min(end, images[-1].size)
    if boundary is None:
        return _merge_extents([ChangedExtent(e.start, e.length, True) for e in view_map(images, start, end) if e.data])
    if not 0 < boundary < len(images):
        raise ValueError(f"boundary {boundary} outside a chain of {len(images)} images")
    out: list[ChangedExtent] = []
    for s, e in changed_ranges(images[boundary:], images[boundary - 1].size, start, end):
        out += (ChangedExtent(entry.start, entry.length, entry.data) for entry in view_map(images, s, e))
    return _merge_extents(out)


def _merge_extents(extents: list[ChangedExtent]) -> list[ChangedExtent]:
    merged: list[ChangedExtent] = []
    for extent in extents:
        if merged and merged[-1].end == extent.offset and merged[-1].exists == extent.exists:
            merged[-1] = attrs.evolve(merged[-1], length=extent.end - merged[-1].offset)
        else:
            merged.append(extent)
    return merged


def paged(compute, start: int, size: int, max_entries: int, *, first_window: int = 16 << 20) -> tuple[list, int]:
    """Entries of `compute(s, e)` from `start` on, at most `max_entries` of them, and where the
    next page starts (`size` when done). Works through windows that grow while they are sparse,
    so a page costs about what its own entries cost, whatever the virtual size."""
    out: list = []
    pos, window = start, first_window
    while pos < size:
        window_end = min(size, pos + window)
        found = compute(pos, window_end)
        out += found
        pos = window_end
        if len(out) >= max_entries:
            out = out[:max_entries]
            pos = out[-1].end
            break
        if len(found) < max_entries // 8:
            window *= 4
    return out, pos
