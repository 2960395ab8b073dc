"""vfsnap's record of one volume (its sidecar `<vol>.vfsnap.json`), as this mount knows it.

The record says the base image's format (DESIGN.md invariant 4: recorded at the first meeting,
never probed again), when each snapshot was taken, and the journal of chain changes under way.
A volume vfsnap meets for the first time is given a record in memory (`meet`, supplied by the
volume: it looks at the chain's files); it reaches the share only when the volume is first
opened or changed (`save_first_meeting`, `save`), never on a read path (docs/design-notes.md,
"Which files are volumes").

Creation times of snapshots someone else took (Cinder) are guessed when first asked for, kept
here in memory, and written with the next write of the record: asking never writes.
"""

from __future__ import annotations

from collections.abc import Callable

from vfsnap.share.records import Sidecar, parse_sidecar


class SidecarStore:
    def __init__(self, share, file_name: str, meet: Callable[[], Sidecar]):
        self.share = share
        self.file_name = file_name
        self._meet = meet
        self._sidecar: Sidecar | None = None
        self._saved = False  # False: made at the first meeting, not on the share yet
        self._stale = False  # the share's copy may have changed: read it again at the next use
        self._guessed: dict[str, float] = {}  # snapshot -> guessed creation time, not written yet

    def get(self) -> Sidecar:
        """The record: the share's, else the one made at the first meeting (in memory)."""
        if self._sidecar is None or self._stale:
            data = self.share.dir.read_small(self.file_name)
            if data is not None:
                # A damaged record raises here, and again at every use (nothing is kept of it).
                sidecar, saved = parse_sidecar(data, name=self.file_name), True
            elif self._sidecar is None or self._saved:
                # Never met, or the share's record went (the volume was replaced): meet it now.
                # An unsaved record stays as it is: probing again could give another answer.
                sidecar, saved = self._meet(), False
            else:
                sidecar, saved = self._sidecar, False
            self._sidecar, self._saved, self._stale = sidecar, saved, False
        return self._sidecar

    def on_share_or_met(self) -> Sidecar | None:
        """The record if the share has one or this mount has met the volume; None otherwise,
        without meeting it (which would open its images): for cheap reads of a volume."""
        if self._sidecar is None and not self.share.dir.exists(self.file_name):
            return None
        return self.get()

    def forget(self) -> None:
        """Another host may have changed the share's record: read it again at the next use."""
        self._stale = True

    def save(self, sidecar: Sidecar) -> None:
        """Write `sidecar` to the share atomically, with the creation times guessed so far."""
        sidecar = self._with_guesses(sidecar)
        self.share.dir.write_atomic(self.file_name, sidecar.to_json())
        self._saved_as(sidecar)

    async def save_async(self, sidecar: Sidecar) -> None:
        """`save`, the file written as a data call of the share (on one of its threads on a
        network share: a share that is slow or hangs holds back the caller, not the mount);
        this record changes on the loop, once the file is in place."""
        sidecar = self._with_guesses(sidecar)
        await self.share.io.write(f"write {self.file_name}", self.share.dir.write_atomic, self.file_name,
                                  sidecar.to_json())
        self._saved_as(sidecar)

    def _with_guesses(self, sidecar: Sidecar) -> Sidecar:
        for snapshot, created in self._guessed.items():
            if snapshot not in sidecar.created:
                sidecar = sidecar.with_created(snapshot, created)
        return sidecar

    def _saved_as(self, sidecar: Sidecar) -> None:
        self._sidecar = sidecar
        self._saved = True
        self._stale = False
        # (guesses made while the file was written wait for the next write)
        self._guessed = {s: t for s, t in self._guessed.items() if s not in sidecar.created}

    @property
    def unsaved(self) -> bool:
        """The record is the one made at the first meeting, not yet on the share."""
        self.get()
        return not self._saved

    def save_first_meeting(self) -> bool:
        """Write the record made at the first meeting, if the share has none yet (and the mount
        may write); True when it was written."""
        sidecar = self.get()
        if self._saved or self.share.read_only:
            return False
        self.save(sidecar)
        return True

    def created(self, snapshot: str) -> float | None:
        """When `snapshot` was taken, as recorded or guessed so far; None if neither."""
        created = self.get().created.get(snapshot)
        return created if created is not None else self._guessed.get(snapshot)

    def note_guess(self, snapshot: str, created: float) -> None:
        """Keep a guessed creation time, to be written with the record's next write."""
        self._guessed[snapshot] = created

    def keep_guesses_of(self, snapshots) -> None:
        """Forget the guesses of snapshots that are gone (`.info` no longer names them)."""
        self._guessed = {s: t for s, t in self._guessed.items() if s in snapshots}

    def journal(self) -> tuple:
        """The journal of chain changes under way (empty for a volume never met)."""
        sidecar = self.on_share_or_met()
        return sidecar.journal if sidecar is not None else ()
