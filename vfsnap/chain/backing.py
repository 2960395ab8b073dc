"""Backing chains: which images a view reads, bottom to top, and the rules they must obey.

DESIGN.md invariants 4 and 5: an image's format comes from the overlay's backing-format field
or from vfsnap's record of the volume's base, never from probing; backing names are plain names
of the same volume's chain in the same directory (no paths, no other volumes), loops and chains
deeper than the configured limit are refused.

The one exception is a clone whose background copy has not finished (`vfsnap.share.clone`):
its base reads from another volume's files through its backing file until the copy is done.
Its rules then name those volumes (`linked`, nearest first, recorded in the clone's journal):
the chain may go on from the clone's base into the first linked volume's files, from that
volume's base into the next one's, and nowhere else.
"""

from __future__ import annotations

from typing import Callable

import attrs

from vfsnap.errors import CorruptImage
from vfsnap.format import Image, Qcow2Image
from vfsnap.names import is_file_of

DEFAULT_MAX_DEPTH = 1024


@attrs.frozen
class ChainRules:
    """What a chain of volume `volume` may contain."""

    volume: str
    base_format: str
    max_depth: int = DEFAULT_MAX_DEPTH
    # Volumes an unfinished clone still reads from: ((volume, its base format), ...).
    linked: tuple[tuple[str, str], ...] = ()

    def next_rules(self) -> "ChainRules | None":
        """The rules past this volume's base: the first linked volume's, if any."""
        if not self.linked:
            return None
        (volume, base_format), rest = self.linked[0], self.linked[1:]
        return ChainRules(volume, base_format, self.max_depth, rest)

    def owner(self, file_name: str) -> "ChainRules | None":
        """The rules of whichever volume (this one or a linked one) `file_name` belongs to."""
        rules: ChainRules | None = self
        while rules is not None:
            if rules._own(file_name):
                return rules
            rules = rules.next_rules()
        return None

    def belongs(self, file_name: str) -> bool:
        """True for `<vol>` and `<vol>.<snap>` with a valid snapshot name (of this volume or,
        for an unfinished clone, of a linked one)."""
        return self.owner(file_name) is not None

    def _own(self, file_name: str) -> bool:
        return is_file_of(self.volume, file_name)

    def format_of(self, file_name: str, declared: str | None, *, referrer: str) -> str:
        """The format of a chain member, from the referrer's backing-format field and our record."""
        owner = self.owner(file_name) or self
        expected = owner.base_format if file_name == owner.volume else "qcow2"
        if declared is not None and declared != expected:
            raise CorruptImage(
                f"{referrer}: backing file {file_name!r} declared as {declared!r}, "
                f"but vfsnap records it as {expected!r}"
            )
        return expected


def backing_chain(
    top_name: str,
    top_format: str,
    rules: ChainRules,
    open_member: Callable[[str, str], Image],
) -> list[Image]:
    """Open the chain that ends at `top_name`, bottom first.

    `open_member(name, format)` opens (or returns an already open) member of the volume; it must
    refuse symlinks and non-regular files.
    """
    if not rules._own(top_name):
        raise CorruptImage(f"{top_name!r} is not a file of volume {rules.volume!r}")
    images = [open_member(top_name, top_format)]
    seen = {top_name}
    while True:
        image = images[-1]
        if not isinstance(image, Qcow2Image) or image.backing_file is None:
            break
        backing = image.backing_file
        if image.name == rules.volume:
            # A base has no backing file, except an unfinished clone's: it reads on in the
            # first linked volume (and only there).
            following = rules.next_rules()
            if following is None:
                raise CorruptImage(f"{image.name}: the base of a volume may not have a backing file ({backing!r})")
            rules = following
        if "/" in backing or backing in (".", "..") or not rules._own(backing):
            raise CorruptImage(
                f"{image.name}: backing file {backing!r} is not a file of volume {rules.volume!r} in its directory"
            )
        if backing in seen:
            raise CorruptImage(f"{image.name}: backing file {backing!r} creates a loop")
        if len(images) > rules.max_depth:
            raise CorruptImage(f"{top_name}: backing chain deeper than {rules.max_depth}")
        seen.add(backing)
        fmt = rules.format_of(backing, image.backing_format, referrer=image.name)
        images.append(open_member(backing, fmt))
    images.reverse()
    return images
