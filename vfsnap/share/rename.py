"""Renaming a volume: every file of its chain, the relative backing names, `.info`, the sidecar.

`mv volumes/a volumes/b` renames `a` to `b`, each overlay `a.<snap>` to `b.<snap>`, rewrites each
overlay's backing name (relative names of the new files, formats unchanged), writes `b.info`
and moves the sidecar. The plan is journalled in `a`'s sidecar first; every step checks what is
already done, so `recover_rename` can simply run the plan again after a crash, whichever of
`a.vfsnap.json` or `b.vfsnap.json` holds it by then.
"""

from __future__ import annotations

import logging
import os

from vfsnap.errors import AlreadyExists, Busy, NameTooLong, ReadOnly
from vfsnap.format import Qcow2Image, TableCache
from vfsnap.format.header import read_header
from vfsnap.names import NAME_MAX, check_volume_name, info_file, overlay_file, sidecar_file
from vfsnap.share.info import VolumeInfo, parse_info, parse_sidecar

log = logging.getLogger(__name__)


def rename_volume(share, old: str, new: str) -> None:
    new = check_volume_name(new)
    if share.read_only:
        raise ReadOnly("read-only mount")
    volume = share.volume(old)
    if volume.open_count:
        raise Busy(f"volume {old} is open")
    if volume.sidecar().journal:
        raise Busy(f"volume {old} has operations in progress")
    info = volume.info()
    chain = [image.name for image in volume.live_chain()]
    files = {name: new + name[len(old) :] for name in chain}
    for snapshot, overlay in info.snapshots.items():
        files.setdefault(overlay, overlay_file(new, snapshot))
    targets = list(files.values()) + [info_file(new), sidecar_file(new)]
    for target in targets:
        if share.dir.exists(target):
            raise AlreadyExists(f"{target} already exists on {share.path}")
    for target in targets:
        if len(target.encode()) > NAME_MAX:
            raise NameTooLong(f"{target!r} would exceed NAME_MAX")
    entry = {"op": "rename", "from": old, "to": new, "files": files, "chain": chain,
             "formats": {name: volume.format_of(name) for name in chain}}
    volume.save_sidecar(volume.sidecar().with_entry(entry))
    volume.close()
    share.forget_volume(old)
    run_rename(share, entry)


def run_rename(share, entry: dict) -> None:
    """Carry out (or finish) a journalled rename; every step is idempotent."""
    old, new, files = entry["from"], entry["to"], entry["files"]
    chain, formats = entry["chain"], entry["formats"]
    d = share.dir
    # 1. Overlays first, top to bottom, then the base: until the base moves, `old` is the volume.
    for name in reversed(chain[1:]):
        if d.exists(name) and not d.exists(files[name]):
            d.rename(name, files[name])
    for name, target in files.items():
        if name not in chain and d.exists(name) and not d.exists(target):
            d.rename(name, target)
    d.fsync()
    # 2. Backing names: each overlay names the renamed file below it.
    for below, above in zip(chain, chain[1:]):
        _rebase_file(share, files[above], files[below], formats[below])
    # 3. The base.
    if d.exists(old) and not d.exists(new):
        d.rename(old, new)
        d.fsync()
    # 4. `.info` with the new names, then the sidecar, which drops the entry last.
    data = d.read_small(info_file(old))
    if data is not None:
        info = parse_info(data, name=info_file(old))
        renamed = VolumeInfo(active=files.get(info.active, info.active),
                             snapshots={s: files.get(f, f) for s, f in info.snapshots.items()})
        d.write_atomic(info_file(new), renamed.to_json())
        d.unlink(info_file(old))
        d.fsync()
    if d.exists(sidecar_file(old)):
        d.rename(sidecar_file(old), sidecar_file(new))
        d.fsync()
    data = d.read_small(sidecar_file(new))
    if data is not None:
        sidecar = parse_sidecar(data, name=sidecar_file(new))
        d.write_atomic(sidecar_file(new), sidecar.without_entry(entry).to_json())
    log.info("renamed volume %s to %s on %s", old, new, share.path)


def _rebase_file(share, name: str, backing: str, backing_format: str) -> None:
    fd = share.dir.open_regular(name, os.O_RDWR)
    try:
        header = read_header(fd, os.fstat(fd).st_size, name=name)
        if header.backing_file == backing:
            return
        image = Qcow2Image(fd, name, writable=True, table_cache=TableCache(1 << 20))
        image.set_backing(backing, backing_format)
    finally:
        os.close(fd)


def pending_renames(share) -> list[dict]:
    """Rename entries in any sidecar of the share (the volume may be half renamed)."""
    entries = []
    for name in share.dir.listdir():
        if not name.endswith(".vfsnap.json"):
            continue
        data = share.dir.read_small(name)
        if data is None or b'"rename"' not in data:
            continue
        sidecar = parse_sidecar(data, name=name)
        entries += [e for e in sidecar.journal if e["op"] == "rename"]
    return entries
