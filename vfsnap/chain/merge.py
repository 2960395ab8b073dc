"""Merging an overlay down into its backing image, the data half of deleting a snapshot.

Deleting snapshot S whose overlay is O, with backing B below it: the only view whose top is B is
S's own (every other view that reads B reads O above it first), so copying O's clusters into B
changes no other view at any moment (DESIGN.md invariant 2). Once B holds everything O held, the
image above O is rebased onto B (or, if O is the active image, B becomes active) and O goes.
This is the reverse of the 2014 remotefs algorithm, which committed the *higher* overlay into
the deleted one and so rewrote the newer snapshot's data.

When O is the active image, writes keep landing in O while it is copied: a `Merge` watches the
live view's writes and copies the ranges they dirty again, until little is left; the caller then
copies the rest without yielding and switches the volume to B in the same step.
"""

from __future__ import annotations

import logging

from vfsnap.chain.view import View
from vfsnap.format import UNALLOCATED, ZERO, Image
from vfsnap.format.raw import RawImage

log = logging.getLogger(__name__)

STEP_BYTES = 4 << 20  # copied between two yields to the event loop


class Merge:
    """Copy every range `overlay` holds into `target`, reading through `source` (which shows
    the overlay over the target) and writing through `target_view` (the chain ending at target).
    """

    def __init__(self, overlay: Image, source: View, target_view: View):
        self.overlay = overlay
        self.source = source
        self.target_view = target_view
        self.pending: list[tuple[int, int, bool]] = []  # (start, end, zeros)
        for start, end, kind, _ in overlay.map_range(0, overlay.size):
            if kind != UNALLOCATED:
                self._add(start, end, kind == ZERO)
        self.total = sum(end - start for start, end, _ in self.pending)
        self.done = 0
        # Into a raw target, data moves file to file inside the kernel (`_copy_in_kernel`).
        self.kernel_copy = isinstance(target_view.top, RawImage)

    def _add(self, start: int, end: int, zeros: bool) -> None:
        if self.pending:
            p_start, p_end, p_zeros = self.pending[-1]
            if p_end == start and p_zeros == zeros:
                self.pending[-1] = (p_start, end, zeros)
                return
        self.pending.append((start, end, zeros))

    def note_write(self, offset: int, length: int) -> None:
        """A write landed in the overlay while merging: copy that range (again)."""
        self.pending.append((offset, offset + length, False))
        self.total += length

    @property
    def pending_bytes(self) -> int:
        return sum(end - start for start, end, _ in self.pending)

    def grow_target(self) -> None:
        """A target smaller than the overlay grows to its size (QCOW2-NOTES checklist 29)."""
        if self.target_view.size < self.source.size:
            self.target_view.resize(self.source.size)

    def step(self, max_bytes: int = STEP_BYTES) -> bool:
        """Copy up to `max_bytes`; True while something is left."""
        budget = max_bytes
        while self.pending and budget > 0:
            start, end, zeros = self.pending[0]
            piece_end = min(end, start + budget)
            if piece_end > self.source.size:
                piece_end = self.source.size
            if start >= piece_end:
                self.pending.pop(0)
                continue
            if zeros:
                self.target_view.write_zeroes(start, piece_end - start)
            else:
                self._copy(start, piece_end)
            budget -= piece_end - start
            self.done += piece_end - start
            if piece_end >= end:
                self.pending.pop(0)
            else:
                self.pending[0] = (piece_end, end, zeros)
        return bool(self.pending)

    def _copy(self, start: int, end: int) -> None:
        # Only inside the target's size: past it (a live volume grown during the merge) the
        # view's write decides, as for every write.
        if self.kernel_copy and end <= self.target_view.size and self._copy_in_kernel(start, end):
            return
        self.target_view.write(start, self.source.read(start, end - start))

    def _copy_in_kernel(self, start: int, end: int) -> bool:
        """Copy [start, end) of the source into the raw target extent by extent, without the
        bytes passing through Python; False (and no more tries) if the share cannot."""
        target: RawImage = self.target_view.top
        for s, e, fd, host in self.source.extents(start, end):
            if fd >= 0:
                if not target.copy_from(fd, host, s, e - s):
                    log.info("%s: no kernel copy on this share; merging through memory", target.name)
                    self.kernel_copy = False
                    return False  # the caller copies the whole range (again): same bytes
            else:  # zeros, a compressed cluster (or a bad extent: the read raises its error)
                target.write(s, self.source.read(s, e - s))
        return True

    def finish(self) -> None:
        """Copy whatever is left, without yielding, and make the target durable."""
        while self.step(64 << 20):
            pass
        self.target_view.flush()
