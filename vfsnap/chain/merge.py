"""Merging an overlay down into its backing image, the data half of deleting a snapshot.

Deleting snapshot S whose overlay is O, with backing B below it: the only view whose top is B is
S's own (every other view that reads B reads O above it first), so copying O's clusters into B
changes no other view at any moment (DESIGN.md invariant 2). Once B holds everything O held, the
image above O is rebased onto B (or, if O is the active image, B becomes active) and O goes.
This is the reverse of the 2014 remotefs algorithm, which committed the *higher* overlay into
the deleted one and so rewrote the newer snapshot's data.

When O is the active image, writes keep landing in O while it is copied: a `Merge` watches the
live view's writes and copies the ranges they dirty again, until little is left; the caller then
copies the rest with the volume's requests held back and switches the volume to B.

Threads (vfsnap/share/io.py rule 1): a step of the copy (`copy_step`) touches no view's resolved
chunks: it reads the source and writes the target through the images' tables, so that on a
network share it runs on one of the share's threads and a share that hangs stalls the merge,
not the mount. The loop patches what it wrote into the target view afterwards. The ranges left
to copy (`pending`) belong to the step; writes the loop notes meanwhile wait in `noted` and join
them between two steps (`take_noted`).
"""

from __future__ import annotations

import logging

from vfsnap.chain.view import View, resolve_extents
from vfsnap.format import UNALLOCATED, ZERO, Image
from vfsnap.format.raw import RawImage

log = logging.getLogger(__name__)

STEP_BYTES = 4 << 20  # copied between two yields to the event loop
FINAL_STEP_BYTES = 64 << 20  # the same with the volume's requests held back (`finish`)


class Merge:
    """Copy every range `overlay` holds into `target`, reading through `source` (which shows
    the overlay over the target) and writing through `target_view` (the chain ending at target).
    """

    def __init__(self, overlay: Image, source: View, target_view: View):
        self.overlay = overlay
        self.source = source
        self.target_view = target_view
        self.pending: list[tuple[int, int, bool]] = []  # (start, end, zeros)
        self.noted: list[tuple[int, int, bool]] = []  # written meanwhile, not yet in `pending`
        self.planned = False  # what the overlay holds is read by the first step
        # Progress, for `vfsnap status`: each counter has one writer (the step's thread, the
        # loop), so no update is lost.
        self.planned_bytes = 0
        self.noted_bytes = 0
        self.done = 0
        # Into a raw target, data moves file to file inside the kernel (`_copy_in_kernel`).
        self.kernel_copy = isinstance(target_view.top, RawImage)

    def _plan(self) -> None:
        for start, end, kind, _ in self.overlay.map_range(0, self.overlay.size):
            if kind != UNALLOCATED:
                self._add(start, end, kind == ZERO)
                self.planned_bytes += end - start
        self.planned = True

    def _add(self, start: int, end: int, zeros: bool) -> None:
        if self.pending:
            p_start, p_end, p_zeros = self.pending[-1]
            if p_end == start and p_zeros == zeros:
                self.pending[-1] = (p_start, end, zeros)
                return
        self.pending.append((start, end, zeros))

    def note_write(self, offset: int, length: int) -> None:
        """A write landed in the overlay while merging: copy that range (again). On the loop."""
        self.noted.append((offset, offset + length, False))
        self.noted_bytes += length

    @property
    def total(self) -> int:
        return self.planned_bytes + self.noted_bytes

    def take_noted(self) -> None:
        """On the loop, between two steps: the ranges noted meanwhile join those to copy."""
        if self.noted:
            self.pending.extend(self.noted)
            self.noted.clear()

    @property
    def pending_bytes(self) -> int:
        return sum(end - start for start, end, _ in self.pending + self.noted)

    def grow_target(self) -> None:
        """A target smaller than the overlay grows to its size (QCOW2-NOTES checklist 29),
        also when the live volume grew during the merge."""
        if self.target_view.size < self.source.size:
            self.target_view.resize(self.source.size)

    def step(self, max_bytes: int = STEP_BYTES) -> bool:
        """Copy up to `max_bytes` on this thread; True while something is left."""
        self.take_noted()
        self.grow_target()
        self.target_view.apply_patches(self.copy_step(max_bytes))
        return bool(self.pending or self.noted)

    async def step_async(self, io, max_bytes: int = STEP_BYTES) -> bool:
        """`step`, the copy as a data call of the share's `io` (a worker thread on a network
        share); True while something is left."""
        self.take_noted()
        self.grow_target()
        self.target_view.apply_patches(await io.write("merge copy", self.copy_step, max_bytes))
        return bool(self.pending or self.noted)

    def copy_step(self, max_bytes: int) -> list[tuple[int, int, int, int]]:
        """Copy up to `max_bytes` of `pending`, touching no view's chunks (for a worker thread);
        returns the extents written, for the loop to patch into the target view."""
        if not self.planned:
            self._plan()
        patches: list[tuple[int, int, int, int]] = []
        budget = max_bytes
        while self.pending and budget > 0:
            start, end, zeros = self.pending[0]
            piece_end = min(end, start + budget, self.source.size)
            if start >= piece_end:
                self.pending.pop(0)
                continue
            if zeros:
                patches += self.target_view.write_zeroes_on_worker(start, piece_end - start)
            else:
                self._copy(start, piece_end, patches)
            budget -= piece_end - start
            self.done += piece_end - start
            if piece_end >= end:
                self.pending.pop(0)
            else:
                self.pending[0] = (piece_end, end, zeros)
        return patches

    def _copy(self, start: int, end: int, patches: list) -> None:
        # Only inside the target's size (grown to the source's before each step).
        if self.kernel_copy and end <= self.target_view.size and self._copy_in_kernel(start, end):
            return
        patches += self.target_view.write_on_worker(start, self.source.read_resolved(start, end - start))

    def _copy_in_kernel(self, start: int, end: int) -> bool:
        """Copy [start, end) of the source into the raw target extent by extent, without the
        bytes passing through Python; False (and no more tries) if the share cannot."""
        target: RawImage = self.target_view.top
        for s, e, fd, host in resolve_extents(self.source.images, start, end):
            if fd >= 0:
                if not target.copy_from(fd, host, s, e - s):
                    log.info("%s: no kernel copy on this share; merging through memory", target.name)
                    self.kernel_copy = False
                    return False  # the caller copies the whole range (again): same bytes
            else:  # zeros, a compressed cluster (or a bad extent: the read raises its error)
                target.write(s, self.source.read_resolved(s, e - s))
        return True

    def finish(self) -> None:
        """Copy whatever is left and make the target durable."""
        while self.step(FINAL_STEP_BYTES):
            pass
        self.target_view.flush()

    async def finish_async(self, io) -> None:
        """`finish` through `step_async`, the flush a data call of `io` as well."""
        while await self.step_async(io, FINAL_STEP_BYTES):
            pass
        await io.write("merge flush", self.target_view.flush)
