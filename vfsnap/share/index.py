"""The volume index of a share: which files are volumes, found in one pass over the directory.

Which files are volumes: every regular file with a valid volume name that is not a `.info`
file, not a vfsnap sidecar or temporary file, not named as an image by any volume's `.info`
(overlays `<vol>.<snap>` are listed there), not the overlay of a snapshot another host is taking
(named by the journal in `<vol>`'s sidecar, not yet in `.info`), and not a file of a rename
under way.

One scan costs one `listdir` of the share, an lstat of each `.info` (read again only when it
changed), a read of each rename journal, and a sidecar read only for a file `<vol>.<snap>` that
no `.info` names while `<vol>` has a sidecar (a snapshot being taken, or a leftover). Owners are found by dict lookup, so a scan is
O(files on the share), never O(pairs of files).

A scan is kept until the share directory changes (its mtime, ctime or inode differ) and for at
most `RESCAN_SECONDS` (or ten times as long as the scan took, so that scanning a huge share never
takes more than a tenth of the daemon's time). The interval is what makes another host's change
appear in time: over NFS and GlusterFS the directory's times reach this host through the
client's attribute cache (NFS `acdirmin` is 30 s by default), so they may not show a change in
time; Cinder rewrites `.info` in place, which changes no directory time at all; and on a local
disk the times are coarse (a clock tick), so two changes in one tick leave the same mtime: a
scan whose directory mtime is that close to the moment of the scan is kept only for
`RACY_SECONDS`. Changes made through this mount update the index at once (`added`, `removed`; a
rename drops the scan), whatever the directory's times say.

The last scan (`ShareIndex.state`) is a snapshot of the share readable without touching the
share: what listing, `df` and `status` can fall back to when the share stops answering.
"""

from __future__ import annotations

import logging
import os
import time

import attrs

from vfsnap.errors import VfsnapError
from vfsnap.names import INFO_SUFFIX, SIDECAR_SUFFIX, is_snapshot_name, is_volume_name

log = logging.getLogger(__name__)

# How long a scan is trusted at most (another host's new volume appears within this).
RESCAN_SECONDS = 1.0
# A scan made within this time of the directory's last change may have missed a second change
# in the same clock tick: trusted only this long.
RACY_SECONDS = 0.05


@attrs.frozen
class ShareState:
    """One scan of a share directory."""

    volumes: tuple[str, ...]  # sorted
    volume_set: frozenset[str]
    with_info: frozenset[str]  # volumes that have a `.info`
    with_sidecar: frozenset[str]  # volumes that have a sidecar
    stamp: tuple[int, int, int]  # the directory's (mtime_ns, ctime_ns, inode) before the scan
    scanned_at: float  # time.monotonic() at the end of the scan
    valid_for: float  # seconds the scan is trusted while the directory's stamp stays the same

    def __contains__(self, name: str) -> bool:
        return name in self.volume_set

    def fresh(self, stamp: tuple[int, int, int], now: float) -> bool:
        return stamp == self.stamp and now - self.scanned_at < self.valid_for

    def changed(self, *, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> "ShareState":
        """This state after a change made through the mount (the stamp stays: the next look at
        the directory sees it changed and scans again, which also picks up the `.info`)."""
        volume_set = (self.volume_set - set(remove)) | set(add)
        return attrs.evolve(self, volumes=tuple(sorted(volume_set)), volume_set=frozenset(volume_set),
                            with_info=self.with_info - set(remove), with_sidecar=self.with_sidecar - set(remove))


class ShareIndex:
    """The volume index of one share directory (`vfsnap.share.files.ShareDir`)."""

    def __init__(self, share_dir):
        self.dir = share_dir
        self.state: ShareState | None = None
        self._entries: dict[str, os.DirEntry] = {}  # documents' entries, during a scan
        self._infos: dict = {}  # volume -> its parsed `.info` (VolumeInfo)
        self.scans = 0
        # Parsed `.info` and sidecar journals, by file name: (contents, names); parsed again
        # only when the contents change (and a broken one is logged once, not at every scan).
        self._documents: dict[str, tuple[tuple, frozenset[str] | None]] = {}

    def _stamp(self) -> tuple[tuple[int, int, int], float]:
        st = os.fstat(self.dir.fd)
        return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino), st.st_mtime

    def current(self) -> ShareState:
        """The index, scanned again if the directory changed or the last scan is too old."""
        stamp, _ = self._stamp()
        state = self.state
        if state is not None and state.fresh(stamp, time.monotonic()):
            return state
        return self.scan()

    def invalidate(self) -> None:
        self.state = None

    def scan(self) -> ShareState:
        stamp, mtime = self._stamp()
        wall, started = time.time(), time.monotonic()
        regular: list[str] = []  # regular files other than documents: the candidate volumes
        names: set[str] = set()
        with_info: set[str] = set()
        with_sidecar: set[str] = set()
        documents: dict[str, os.DirEntry] = {}
        self._entries = documents
        info_cut, sidecar_cut = -len(INFO_SUFFIX), -len(SIDECAR_SUFFIX)
        # One pass, each name classified once (a share of 10,000 volumes with chains has 50,000).
        with os.scandir(self.dir.fd) as entries:
            for entry in entries:
                name = entry.name
                names.add(name)
                if name.endswith(INFO_SUFFIX):
                    with_info.add(name[:info_cut])
                    documents[name] = entry
                elif name.endswith(SIDECAR_SUFFIX):
                    with_sidecar.add(name[:sidecar_cut])
                    documents[name] = entry
                else:
                    try:
                        if entry.is_file(follow_symlinks=False):  # d_type; lstat only if unknown
                            regular.append(name)
                    except OSError:
                        pass  # gone meanwhile
        owner_of: dict[str, str] = {}  # file -> the volume whose `.info` names it
        unreadable: set[str] = set()  # volumes whose `.info` cannot be parsed
        for owner in with_info:
            files = self._info_names(owner)
            if files is None:
                unreadable.add(owner)
                continue
            for file_name in files:
                if file_name != owner:
                    owner_of.setdefault(file_name, owner)
        renaming = self._renaming(names)
        volumes = []
        for name in regular:
            if name in owner_of or name in renaming or not is_volume_name(name):
                continue
            if "." in name and self._claimed(name, with_info, with_sidecar, unreadable):
                continue
            volumes.append(name)
        volumes.sort()
        volume_set = frozenset(volumes)
        for stale in set(self._documents) - names:
            del self._documents[stale]
            self._infos.pop(stale[: -len(INFO_SUFFIX)], None)
        self._entries = {}
        ended = time.monotonic()
        if abs(wall - mtime) < 2 * RACY_SECONDS:
            valid_for = RACY_SECONDS
        else:  # and never more than a tenth of the time goes to scanning
            valid_for = max(RESCAN_SECONDS, 10 * (ended - started))
        state = ShareState(
            volumes=tuple(volumes),
            volume_set=volume_set,
            with_info=frozenset(with_info & volume_set),
            with_sidecar=frozenset(with_sidecar & volume_set),
            stamp=stamp,
            scanned_at=ended,
            valid_for=valid_for,
        )
        self.state = state
        self.scans += 1
        return state

    def _claimed(self, name: str, with_info: set[str], with_sidecar: set[str], unreadable: set[str]) -> bool:
        """Is `name` = `<owner>.<snap>` an overlay of `owner` that its `.info` does not name:
        `owner`'s `.info` is unreadable (then every such file is taken to be its own, never a
        volume of its own), or `owner`'s journal names it (a snapshot being taken)."""
        parts = name.split(".")
        for i in range(1, len(parts)):
            owner = ".".join(parts[:i])
            if not is_snapshot_name(name[len(owner) + 1 :]):
                continue
            if owner in unreadable:
                return True
            if owner in with_sidecar and name in (self._journal_names(owner) or ()):
                return True
        return False

    def _document(self, file_name: str, parse) -> frozenset[str] | None:
        """The names a small document lists, read again only when its identity, size or times
        changed (its lstat, from the scan's directory entry)."""
        entry = self._entries.get(file_name)
        try:
            st = entry.stat(follow_symlinks=False) if entry is not None else self.dir.stat(file_name)
        except FileNotFoundError:
            st = None
        if st is None:
            self._documents.pop(file_name, None)
            return frozenset()
        identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._documents.get(file_name)
        if cached is not None and cached[0] == identity:
            return cached[1]
        try:
            data = self.dir.read_small(file_name)
            result = frozenset(parse(data or b"{}", file_name)) if data is not None else frozenset()
        except VfsnapError as exc:
            log.warning("%s", exc)
            result = None
        self._documents[file_name] = (identity, result)
        return result

    def _info_names(self, volume: str) -> frozenset[str] | None:
        from vfsnap.share.info import parse_info

        def names(data: bytes, file_name: str):
            info = parse_info(data, name=file_name)
            self._infos[volume] = info
            return {info.active, *info.snapshots.values()}

        return self._document(volume + INFO_SUFFIX, names)

    def info_of(self, volume: str):
        """The `.info` of `volume` as the last scan read it (a `VolumeInfo`), or None when it
        had none or could not parse it: for `stat` of a volume not in use, no read."""
        state = self.current()
        if volume not in state.with_info or self._documents.get(volume + INFO_SUFFIX, (None, None))[1] is None:
            return None
        return self._infos.get(volume)

    def _journal_names(self, volume: str) -> frozenset[str] | None:
        from vfsnap.share.records import parse_sidecar

        def names(data: bytes, file_name: str):
            return parse_sidecar(data, name=file_name).journal_overlays()

        return self._document(volume + SIDECAR_SUFFIX, names)

    def _renaming(self, names: set[str]) -> set[str]:
        """Files of renames under way (neither the old nor the new volume name): never volumes."""
        from vfsnap.share.rename import JOURNAL_PREFIX, read_journal

        files: set[str] = set()
        for journal in names:
            if not journal.startswith(JOURNAL_PREFIX):
                continue
            try:
                entry = read_journal(_ShareOf(self.dir), journal)
            except VfsnapError as exc:
                log.warning("%s", exc)
                continue
            if entry is not None:
                files |= (set(entry.files) | set(entry.files.values())) - {entry.old, entry.new}
        return files

    # -- changes made through the mount ---------------------------------------------------

    def added(self, name: str) -> None:
        if self.state is not None:
            self.state = self.state.changed(add=(name,))

    def removed(self, name: str) -> None:
        if self.state is not None:
            self.state = self.state.changed(remove=(name,))


@attrs.frozen
class _ShareOf:
    """What `read_journal` needs of a share: its directory."""

    dir: object


__all__ = ["RESCAN_SECONDS", "ShareIndex", "ShareState"]
