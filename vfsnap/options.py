"""Mount options (`-o` of `vfsnap mount` and `mount.vfsnap`), parsed once into a frozen record."""

from __future__ import annotations

import attrs

from vfsnap.errors import InvalidName

# Options libfuse handles; passed through to pyfuse3.init.
FUSE_OPTIONS = frozenset({"allow_other", "allow_root", "debug", "nosuid", "nodev", "noexec", "suid", "dev", "exec"})
# Options mount(8), fstab and systemd hand to a helper that mean nothing to vfsnap itself.
IGNORED_OPTIONS = frozenset({
    "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
    "relatime", "noatime", "atime", "nodiratime", "strictatime", "lazytime", "sync", "async",
})
IGNORED_PREFIXES = ("x-", "X-", "comment=")
# Options that may be given more than once: the values are joined with commas, so that a value
# which itself holds commas can be passed through `-o` (`share_mount_options=vers=4.1,share_mount_options=hard`).
REPEATABLE_OPTIONS = frozenset({"share_mount_options"})


class UnknownOption(InvalidName):
    """An option vfsnap does not know (mount.vfsnap -s drops these with a warning)."""


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _threads(text: str) -> int | None:
    return None if text == "auto" else int(text)


# Reader threads with `fuse_threads=auto` on a mount with a network share (vfsnap/fs/relay.py).
DEFAULT_FUSE_THREADS = 24


@attrs.frozen
class MountOptions:
    read_only: bool = False
    fuse_options: frozenset[str] = frozenset()
    max_chain_depth: int = 1024  # QEMU has no limit; production chains reach 1000 overlays
    # Bytes of metadata tables and resolved maps held for all open volumes together (see
    # vfsnap.format.cache); option `memory_budget`, or its old name `table_cache_size`.
    memory_budget: int = 32 << 20
    map_cache_chunks: int = 1 << 16  # resolved chunks kept per view (memory: see memory_budget)
    volume_format: str = "raw"  # format of volumes created through the mount
    thick: bool = False  # fully allocate new raw volumes (Cinder's nfs_sparsed_volumes=False)
    share_type: str = "local"  # local, nfs, glusterfs
    shares_config: str | None = None
    mount_base: str = "/var/lib/vfsnap/mnt"
    share_mount_options: str | None = None
    share_mount_attempts: int = 3
    max_over_subscription_ratio: float = 20.0  # Cinder's default
    reserved_percentage: float = 0.0
    metadata_flush_interval: float = 5.0  # seconds between background write-backs of metadata
    clone_copy_rate: int = 0  # bytes/s a clone's background copy goes through (0: no limit)
    share_io: str = "auto"  # auto, threads, inline: where share I/O runs (vfsnap/share/io.py)
    share_threads: int = 16  # worker threads per share for requests in flight
    # Threads reading FUSE requests, answering reads (vfsnap/fs/relay.py); 0: pyfuse3 alone;
    # None (`auto`): DEFAULT_FUSE_THREADS when a share's I/O goes to threads (network shares), else 0.
    fuse_threads: int | None = None
    log_file: str | None = None
    log_level: str = "info"
    foreground: bool = False


def parse_options(text: str | None, **overrides) -> MountOptions:
    """Parse `-o a,b=c` text. Unknown options raise InvalidName with a clear message."""
    values: dict = {}
    fuse = set()
    repeated: dict[str, list[str]] = {}
    for raw in (text or "").split(","):
        item = raw.strip()
        if not item:
            continue
        key, has_value, value = item.partition("=")
        if key in IGNORED_OPTIONS or item.startswith(IGNORED_PREFIXES):
            continue
        if key in FUSE_OPTIONS and not has_value:
            fuse.add(key)
        elif key == "ro" and not has_value:
            values["read_only"] = True
        elif key == "thick" and not has_value:
            values["thick"] = True
        elif key == "sparse" and not has_value:
            values["thick"] = False
        elif has_value and key in REPEATABLE_OPTIONS:
            repeated.setdefault(key, []).append(value)
        elif has_value and key in _VALUED:
            try:
                values[_VALUED[key][0]] = _VALUED[key][1](value)
            except ValueError:
                raise InvalidName(f"bad value for mount option {key}: {value!r}") from None
        else:
            raise UnknownOption(f"unknown mount option {item!r}")
    for key, parts in repeated.items():
        values[_VALUED[key][0]] = ",".join(parts)
    values.update(overrides)
    if values.get("volume_format", "raw") not in ("raw", "qcow2"):
        raise InvalidName("volume_format must be raw or qcow2")
    if values.get("share_type", "local") not in ("local", "nfs", "glusterfs"):
        raise InvalidName("share_type must be local, nfs or glusterfs")
    if values.get("share_io", "auto") not in ("auto", "threads", "inline"):
        raise InvalidName("share_io must be auto, threads or inline")
    if values.get("share_threads", 1) < 1:
        raise InvalidName("share_threads must be at least 1")
    if values.get("fuse_threads") not in (None, 0) and values["fuse_threads"] < 3:
        raise InvalidName("fuse_threads must be auto, 0 or at least 3")
    if values.get("max_chain_depth", 1) < 1:
        raise InvalidName("max_chain_depth must be at least 1")
    if values.get("max_over_subscription_ratio", 1.0) <= 0:
        raise InvalidName("max_over_subscription_ratio must be greater than 0")
    if not 0 <= values.get("reserved_percentage", 0.0) < 100:
        raise InvalidName("reserved_percentage must be at least 0 and less than 100")
    return MountOptions(fuse_options=frozenset(fuse), **values)


_VALUED = {
    "max_chain_depth": ("max_chain_depth", int),
    "memory_budget": ("memory_budget", _size),
    "table_cache_size": ("memory_budget", _size),  # its name before maps shared the budget
    "map_cache_chunks": ("map_cache_chunks", int),
    "volume_format": ("volume_format", str),
    "share_type": ("share_type", str),
    "shares_config": ("shares_config", str),
    "mount_base": ("mount_base", str),
    "share_mount_options": ("share_mount_options", str),
    "share_mount_attempts": ("share_mount_attempts", int),
    "max_over_subscription_ratio": ("max_over_subscription_ratio", float),
    "reserved_percentage": ("reserved_percentage", float),
    "metadata_flush_interval": ("metadata_flush_interval", float),
    "clone_copy_rate": ("clone_copy_rate", _size),
    "share_io": ("share_io", str),
    "share_threads": ("share_threads", int),
    "fuse_threads": ("fuse_threads", _threads),
    "log": ("log_file", str),
    "log_file": ("log_file", str),
    "log_level": ("log_level", str),
}
