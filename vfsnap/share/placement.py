"""Placement: which share receives a new volume.

Eligibility is Cinder's NFS driver's (`NfsDriver._is_share_eligible`, cinder/volume/drivers/nfs.py):
a share can take a volume of `size` bytes when

1. its actual used ratio, (total - available) / total, is at most (100 - reserved_percentage) / 100;
2. its apparent free space, total * max_over_subscription_ratio - provisioned, is larger than `size`;
3. provisioned / total is below max_over_subscription_ratio;

where `available` is the space free for unprivileged users (`stat -f` %a, f_bavail) and
`provisioned` the apparent size of the files on the share (`du -sb --apparent-size --exclude
'*snapshot*'`): a sparse volume counts at its full size. Among eligible shares vfsnap takes the
one with the most available space (DESIGN.md section 4, and Cinder's GlusterFS driver), the first
in configuration order on a tie. Cinder's NFS driver takes the one with the least provisioned
space instead; with shares of equal size and no data written the two agree.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Sequence

import attrs

from vfsnap.errors import NoSpace
from vfsnap.share.share import Capacity

# Cinder leaves these out of a share's provisioned space (NetApp's `.snapshot` directories).
PROVISIONED_EXCLUDE = "*snapshot*"


@attrs.frozen
class ShareUsage:
    """What placement needs to know of one share."""

    path: str
    capacity: Capacity
    provisioned: int  # bytes: apparent sizes of the files on the share


def ineligibility(usage: ShareUsage, size: int, *, max_over_subscription_ratio: float,
                  reserved_percentage: float) -> str | None:
    """Why the share cannot take a new volume of `size` bytes, or None when it can."""
    total, available = usage.capacity.total, usage.capacity.available
    if total <= 0:
        return "no capacity"
    used_ratio = (100 - reserved_percentage) / 100
    actual_used_ratio = (total - available) / total
    if actual_used_ratio > used_ratio:
        return f"{actual_used_ratio:.0%} used, more than the {used_ratio:.0%} allowed by reserved_percentage"
    apparent_available = max(0.0, total * max_over_subscription_ratio - usage.provisioned)
    if apparent_available <= size:
        return (f"{apparent_available:.0f} bytes left under max_over_subscription_ratio "
                f"{max_over_subscription_ratio:g} ({usage.provisioned} of {total} bytes provisioned)")
    if usage.provisioned / total >= max_over_subscription_ratio:
        return f"provisioned {usage.provisioned / total:.2f} times its size, at the oversubscription limit"
    return None


def choose_share(usages: Sequence[ShareUsage], size: int, *, max_over_subscription_ratio: float = 1.0,
                 reserved_percentage: float = 0.0) -> int:
    """Index of the share that receives a new volume of `size` bytes; NoSpace when none can."""
    best: int | None = None
    reasons = []
    for index, usage in enumerate(usages):
        reason = ineligibility(usage, size, max_over_subscription_ratio=max_over_subscription_ratio,
                               reserved_percentage=reserved_percentage)
        if reason is not None:
            reasons.append(f"{usage.path}: {reason}")
        elif best is None or usage.capacity.available > usages[best].capacity.available:
            best = index
    if best is None:
        raise NoSpace(f"no share can hold a new volume of {size} bytes: " + ("; ".join(reasons) or "no shares"))
    return best


def provisioned_bytes(path: str) -> int:
    """Apparent size of `path` and everything under it, directories included, as Cinder's `du` counts it
    (names matching PROVISIONED_EXCLUDE, and what is under them, left out)."""
    total = os.stat(path).st_size
    pending = [path]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            if fnmatch.fnmatch(entry.name, PROVISIONED_EXCLUDE):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we looked
            total += st.st_size
            if stat.S_ISDIR(st.st_mode):
                pending.append(entry.path)
    return total


def share_usage(path: str) -> ShareUsage:
    """Measure one share directory (statvfs and a walk of its files)."""
    capacity = Capacity.of(os.statvfs(path))
    return ShareUsage(path=path, capacity=capacity, provisioned=provisioned_bytes(path))
