"""What is mounted where (/proc/mounts, parsed in this one place), and whether a share's network
filesystem is mounted with the coherence several hosts need (docs/mount.md, "Mount options of
the shares")."""

from __future__ import annotations

import os
import re

import attrs

# What vfsnap adds when it mounts a GlusterFS share itself (remote.py), and what a share mounted
# by someone else should have: no kernel caching of names, attributes or pages.
GLUSTER_COHERENT_OPTIONS = {"attribute-timeout": "0", "entry-timeout": "0", "negative-timeout": "0",
                            "direct-io-mode": "enable"}
# The glusterfs client's own defaults for the options above (glusterfs(8)).
GLUSTER_CLIENT_DEFAULTS = {"attribute-timeout": "1", "entry-timeout": "1", "negative-timeout": "0",
                           "direct-io-mode": "auto"}


@attrs.frozen
class MountEntry:
    """One line of /proc/mounts, unescaped."""

    source: str
    point: str
    kind: str
    options: tuple[str, ...]


def unescape(field: str) -> str:
    """Undo the octal escapes of /proc/mounts (`\\040` for a space, ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table(path: str = "/proc/mounts") -> list[MountEntry]:
    """Every mount, in mount order; empty when the table cannot be read."""
    entries = []
    try:
        with open(path) as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 4:
                    continue
                entries.append(MountEntry(unescape(fields[0]), unescape(fields[1]), fields[2],
                                          tuple(fields[3].split(","))))
    except OSError:
        return []
    return entries


def mount_holding(path: str, table: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount holding `path` (the longest mount point above it; the last one mounted wins)."""
    best = None
    for entry in mount_table() if table is None else table:
        point = entry.point
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best.point):
                best = entry
    return best


def mounted_at(path: str) -> MountEntry | None:
    """What is mounted on `path` itself (the last mount wins), or None."""
    found = None
    for entry in mount_table():
        if entry.point == path:
            found = entry
    return found


def _gluster_client_options(mount_point: str) -> dict[str, str] | None:
    """The `--name=value` options of the glusterfs client process serving `mount_point`, or None
    when it cannot be found (another namespace, no permission)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = [os.fsdecode(arg) for arg in cmdline.read().split(b"\0") if arg]
        except OSError:
            continue
        if len(argv) < 2 or os.path.basename(argv[0]) not in ("glusterfs", "glusterfsd") or argv[-1] != mount_point:
            continue
        options = {}
        for arg in argv[1:-1]:
            if arg.startswith("--") and "=" in arg:
                name, value = arg[2:].split("=", 1)
                options[name] = value
        return options
    return None


def coherence_warnings(path: str, table: list[MountEntry] | None = None) -> list[str]:
    """What in the mount of the share directory `path` lets one host be served stale names,
    attributes or contents another host changed, with the options to use instead."""
    entry = mount_holding(path, table)
    if entry is None:
        return []
    if entry.kind in ("fuse.glusterfs", "glusterfs"):
        options = _gluster_client_options(entry.point)
        if options is None:
            return []
        wrong = [f"{name}={options.get(name, GLUSTER_CLIENT_DEFAULTS[name])}" for name, value in
                 GLUSTER_COHERENT_OPTIONS.items() if options.get(name, GLUSTER_CLIENT_DEFAULTS[name]) != value]
        if not wrong:
            return []
        wanted = ",".join(f"{name}={value}" for name, value in GLUSTER_COHERENT_OPTIONS.items())
        return [f"{path} is a GlusterFS mount ({entry.point}) with {', '.join(wrong)}: another host's snapshots "
                f"may be listed late and its changes met as stale file handles. Mount it with -o {wanted} "
                "(as vfsnap does with share_type=glusterfs), and keep the volume's client caches off "
                "(gluster volume set VOL group virt); see docs/mount.md"]
    if entry.kind in ("nfs", "nfs4") and "nocto" in entry.options:
        return [f"{path} is an NFS mount ({entry.point}) with nocto: without close-to-open consistency another "
                "host's `.info` and images may be read stale. Mount it without nocto (and with actimeo=0 for "
                "prompt listings); see docs/mount.md"]
    return []
