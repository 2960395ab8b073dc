"""`vfsnap check SHARE [--repair]`: verify every volume of a share offline.

For each volume: `.info` and the sidecar parse, every file they name exists, the backing chain
obeys the rules (relative names of the volume's own files, formats, no loops), every snapshot's
overlay is in the chain, no journal entry is left, and every qcow2 image's metadata is
consistent (refcounts against references, COPIED flags, no dirty bit). Share-wide: stale
temporary files and interrupted renames. Without `--repair` nothing is written.

`--repair` finishes or rolls back interrupted operations (the journal), runs pending merges,
rebuilds the refcounts of images with leaks or refcount errors, and removes temporary files.
What cannot be repaired (a missing or truncated image) is reported and left alone.

Exit status: 0 when the share is (now) clean, 2 when problems remain, 1 on usage errors.
"""

from __future__ import annotations

import os
import sys

import attrs
import trio

from vfsnap.cli.main import EXIT_CHECK_FAILED, EXIT_OK, QuietError
from vfsnap.errors import VfsnapError
from vfsnap.format import Qcow2Image
from vfsnap.format.check import check_image, rebuild_refcounts
from vfsnap.names import SIDECAR_SUFFIX, TEMP_PREFIX
from vfsnap.options import MountOptions
from vfsnap.share import snapshots
from vfsnap.share.mounts import mount_table
from vfsnap.share.records import CloneEntry, DeleteEntry
from vfsnap.share.rename import pending_renames, run_rename
from vfsnap.share.share import Share


@attrs.define
class Report:
    problems: list[str] = attrs.field(factory=list)
    repaired: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)  # states that are fine, worth knowing

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def fixed(self, text: str) -> None:
        self.repaired.append(text)


def check(path: str, *, repair: bool = False, out=sys.stdout) -> int:
    if not os.path.isdir(path):
        raise QuietError(f"{path} is not a directory")
    if repair and _mounted_by_vfsnap(path):
        raise QuietError(f"{path} is mounted by vfsnap; unmount it before --repair")
    share = Share(path, MountOptions(read_only=not repair))
    try:
        report = check_share(share, repair=repair)
    finally:
        share.close()
    for line in report.notes:
        print(f"note: {line}", file=out)
    for line in report.repaired:
        print(f"repaired: {line}", file=out)
    for line in report.problems:
        print(f"problem: {line}", file=out)
    if report.problems:
        print(f"{path}: {len(report.problems)} problem(s)" + (" left" if repair else ""), file=out)
        return EXIT_CHECK_FAILED
    print(f"{path}: clean" + (f" ({len(report.repaired)} repair(s))" if report.repaired else ""), file=out)
    return EXIT_OK


def check_share(share: Share, *, repair: bool) -> Report:
    report = Report()
    for name in share.dir.listdir():
        if name.startswith(TEMP_PREFIX):
            if repair:
                share.dir.unlink(name)
                report.fixed(f"removed temporary file {name}")
            else:
                report.problem(f"temporary file {name} left by an interrupted write")
    corrupt: list[VfsnapError] = []
    for entry in pending_renames(share, corrupt=corrupt):
        if repair:
            run_rename(share, entry)
            report.fixed(f"finished renaming volume {entry.old} to {entry.new}")
        else:
            report.problem(f"interrupted rename of volume {entry.old} to {entry.new}")
    for exc in corrupt:
        report.problem(f"unreadable rename plan, left alone: {exc}")
    # Interrupted operations first: they explain (or, repaired, remove) files that would
    # otherwise look like volumes of their own (an overlay created but never committed).
    journal_files: set[str] = set()
    volumes = share.volumes_with_journal()
    # Clones first: a finished copy releases the source's point in time, whose merge follows.
    volumes.sort(key=lambda v: _is_clone(v) is False)
    for volume in volumes:
        try:
            _check_journal(volume, report, repair=repair)
            if volume.share.dir.exists(volume.sidecar_name):
                journal_files |= volume.sidecar().journal_overlays()
        except VfsnapError as exc:
            report.problem(f"{volume.name}: {exc}")
    for name in share.volume_names():
        if name in journal_files:
            continue
        try:
            _check_volume(share, name, report, repair=repair)
        except VfsnapError as exc:
            report.problem(f"{name}: {exc}")
    _check_strays(share, report, repair=repair)
    return report


def _check_journal(volume, report: Report, *, repair: bool) -> None:
    from vfsnap.share import clone

    entry = clone.clone_entry(volume.sidecar())
    if entry is not None:
        _check_clone(volume, entry, report, repair=repair)
        if len(volume.sidecar().journal) == (0 if repair else 1):
            return
    if repair:
        for line in snapshots.recover(volume):
            report.fixed(line)
        trio.run(snapshots.run_pending, volume)
        for snapshot, error in volume.failed.items():
            report.problem(f"{volume.name}: deleting snapshot {snapshot} failed: {error}")
    else:
        for entry in volume.sidecar().journal:
            if isinstance(entry, CloneEntry):
                continue
            if isinstance(entry, DeleteEntry) and clone.holds(volume.share, entry):
                report.notes.append(f"{volume.name}: point in time of clone {entry.held_for} kept until "
                                    f"its copy is done")
                continue
            what = getattr(entry, "snapshot", "")
            report.problem(f"{volume.name}: interrupted operation {entry.op} {what}".rstrip())


def _is_clone(volume) -> bool:
    from vfsnap.share import clone

    try:
        return clone.clone_entry(volume.sidecar()) is not None
    except VfsnapError:
        return False


def _check_clone(volume, entry: CloneEntry, report: Report, *, repair: bool) -> None:
    """A clone whose background copy has not finished is a normal state (the mount resumes
    the copy): its chain may read the source's files it pins, and those must exist."""
    from vfsnap.share import clone

    missing = [f for f in entry.pins if not volume.share.dir.exists(f)]
    if missing:
        report.problem(f"{volume.name}: unfinished clone of {entry.source}: source files missing: "
                       f"{' '.join(missing)}")
        return
    if not repair:
        report.notes.append(f"{volume.name}: unfinished clone of {entry.source}@{entry.snapshot} "
                            f"(reads {entry.top} until its copy is done)")
        return
    trio.run(clone.run_copy, volume)
    error = clone.copy_state(volume).error
    if error is not None:
        report.problem(f"{volume.name}: copying the clone's data failed: {error}")
    else:
        report.fixed(f"{volume.name}: finished copying the clone's data from {entry.source}")


def _check_volume(share: Share, name: str, report: Report, *, repair: bool) -> None:
    volume = share.volume(name)
    volume.sidecar()
    missing = [f for f in volume.files() if not share.dir.exists(f)]
    for file_name in missing:
        report.problem(f"{name}: {file_name} is named by {volume.info_name} but does not exist")
    if missing:
        return
    info = volume.info()
    chain = volume.live_chain()
    chain_names = [image.name for image in chain]
    for snapshot, overlay in info.snapshots.items():
        if overlay not in chain_names:
            report.problem(f"{name}: snapshot {snapshot}'s overlay {overlay} is not in the live chain")
    for image in chain:
        if not isinstance(image, Qcow2Image):
            continue
        result = check_image(image)
        if result.clean and not image.header.dirty:
            continue
        if repair and not result.unrepairable:
            writable = share.dir.open_regular(image.name, os.O_RDWR)
            fixed = Qcow2Image(writable, image.name, writable=True, table_cache=share.table_cache)
            try:
                rebuild_refcounts(fixed)
                fixed.close_writes()
            finally:
                fixed.close()
            report.fixed(f"{name}: {image.name}: refcounts rebuilt ({'; '.join(result.lines()) or 'dirty bit'})")
        else:
            for line in result.lines() or [f"{image.name}: dirty bit set (refcounts may be stale)"]:
                report.problem(f"{name}: {line}")


def _check_strays(share: Share, report: Report, *, repair: bool) -> None:
    """`.info` files and sidecars of no volume: the volume is gone, or the file they are named
    after is another volume's overlay (a sidecar written for it by mistake)."""
    names = set(share.dir.listdir())
    for file_name in sorted(names):
        for suffix in (".info", SIDECAR_SUFFIX):
            if not file_name.endswith(suffix) or file_name.endswith(".vfsnap" + suffix):
                continue
            volume = file_name[: -len(suffix)]
            if volume not in names:
                why = f"{volume} does not exist"
            elif not share.is_volume(volume):
                why = f"{volume} is not a volume but another volume's file"
            else:
                continue
            if repair and suffix == SIDECAR_SUFFIX:
                share.dir.unlink(file_name)
                report.fixed(f"removed {file_name} ({why})")
            else:
                report.problem(f"{file_name} belongs to no volume ({why})")


def _mounted_by_vfsnap(path: str) -> bool:
    real = os.path.realpath(path)
    return any(entry.kind == "fuse.vfsnap" and os.path.realpath(entry.source) == real for entry in mount_table())
