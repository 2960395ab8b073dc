"""`vfsnap map` and `vfsnap diff` over extended attributes of the volume and snapshot files.

An xattr value is at most 64 KiB (Linux XATTR_SIZE_MAX) and a large volume's map may have
thousands of entries, so the answer comes in pages; the request is in the attribute's name
(docs/backup.md has the protocol):

    user.vfsnap.map.<start>            the view's map from guest offset <start> on
    user.vfsnap.diff.<start>           its extents holding data, from <start> on
    user.vfsnap.diff.<start>.<snap>    its extents that may differ from snapshot <snap>

Each answer is a JSON object: `entries` (compact arrays), `next` (where the next page starts;
the view's `size` when this was the last), and `generation`, which changes when the view's chain
does (snapshot taken, merge finished), so that the tool starts again instead of joining pages of
two chains. A request that cannot be answered (unknown snapshot, one not older than the file)
gets `{"error": ...}`: an errno alone could not say which. The names are not listed by
`listxattr` (`getfattr -d` would compute maps). Every page is computed in one go on the event
loop, so no write or chain change happens in the middle of one.
"""

from __future__ import annotations

import hashlib
import json

from vfsnap.chain.allocation import diff_extents, paged, view_map
from vfsnap.errors import VfsnapError
from vfsnap.fs.tree import ImageNode, Node, VolumeFile

MAP_PREFIX = "user.vfsnap.map."
DIFF_PREFIX = "user.vfsnap.diff."
MAX_PAGE_ENTRIES = 1000
XATTR_SIZE_MAX = 65536


def is_request(name: str) -> bool:
    return name.startswith((MAP_PREFIX, DIFF_PREFIX))


def answer(pool, node: Node, name: str) -> bytes | None:
    """The page `name` asks for of the file `node` names; None when `name` is no such request."""
    if not isinstance(node, ImageNode):
        return None
    is_map = name.startswith(MAP_PREFIX)
    fields = name[len(MAP_PREFIX if is_map else DIFF_PREFIX) :].split(".")
    if not fields[0].isdigit() or len(fields) > (1 if is_map else 2) or (len(fields) == 2 and not fields[1]):
        return None
    start = int(fields[0])
    since = fields[1] if len(fields) == 2 else None
    try:
        volume = pool.volume(node.volume)
        view = volume.live_view() if isinstance(node, VolumeFile) else volume.snapshot_view(node.snapshot)
        images = list(view.images)
        boundary = None if since is None else _boundary(volume, node, images, since)
    except VfsnapError as exc:
        return _encode({"error": str(exc)})
    if is_map:
        def compute(s: int, e: int) -> list:
            return view_map(images, s, e)

        def fields(m) -> list:
            return [m.start, m.length, m.depth, int(m.present), int(m.zero), int(m.data)]
    else:
        def compute(s: int, e: int) -> list:
            return diff_extents(images, boundary, s, e)

        def fields(x) -> list:
            return [x.offset, x.length, int(x.exists)]
    names = [image.name for image in images] + ([] if boundary is None else [f"boundary {boundary}"])
    document = {"volume": volume.name, "size": view.size,
                "generation": hashlib.sha1("\0".join(names).encode()).hexdigest()[:16]}
    limit = MAX_PAGE_ENTRIES
    while True:
        entries, next_start = paged(compute, start, view.size, limit)
        value = _encode({**document, "entries": [fields(e) for e in entries], "next": next_start})
        if len(value) <= XATTR_SIZE_MAX or limit == 1:
            return value
        limit //= 2


def _boundary(volume, node: ImageNode, images: list, snapshot: str) -> int:
    """Index in `images` of the overlay of `snapshot`: the images from there up are what the view
    holds beyond the snapshot."""
    if not volume.has_snapshot(snapshot):
        raise VfsnapError(f"volume {volume.name} has no snapshot {snapshot}")
    overlay = volume.info().snapshots[snapshot]
    names = [image.name for image in images]
    if overlay not in names:
        this = "the live volume" if isinstance(node, VolumeFile) else f"snapshot {node.snapshot}"
        raise VfsnapError(f"snapshot {snapshot} of {volume.name} is not older than {this}")
    return names.index(overlay)


def _encode(document: dict) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
