"""Network shares: NFS exports and GlusterFS volumes, mounted the way Cinder mounts them.

A share `host:/export` is mounted with `mount -t nfs` (or `mount -t glusterfs` with
`share_type=glusterfs`) under `mount_base`, in a directory named by the md5 of the share string,
as os-brick's `RemoteFsClient.get_mount_point` names it: a vfsnap host and a Cinder volume service
given the same mount base share one mount. A share already mounted there is reused, and vfsnap
never unmounts it (Cinder does not either: another vfsnap mount, or Cinder, may be using it).

`shares_config=FILE` reads Cinder's shares file (`_load_shares_config` of cinder's remotefs.py):
one share per line, optionally followed by extra arguments for mount(8) (`-o vers=4.1`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import time

import attrs

from vfsnap.errors import VfsnapError
from vfsnap.options import MountOptions
from vfsnap.share.mounts import GLUSTER_COHERENT_OPTIONS, mounted_at

log = logging.getLogger(__name__)

# cinder/volume/drivers/remotefs.py RemoteFSDriver.SHARE_FORMAT_REGEX, used with re.match.
SHARE_FORMAT = re.compile(r".+:/.+")
# Where mount(8) helpers and the commands vfsnap runs live; mount(8) runs its helpers without PATH.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MOUNT_RETRY_DELAY = 1.0  # seconds between attempts, as Cinder's NFS driver waits
LOCK_NAME = ".vfsnap-mount.lock"

# What each network type needs: the kernel filesystem, and the mount(8) helper with its package.
_REQUIREMENTS = {
    "nfs": (("nfs", "nfs4"), "nfs", "mount.nfs", "nfs-common (Debian) or nfs-utils"),
    "glusterfs": (("fuse",), "fuse", "mount.glusterfs", "glusterfs-client (Debian) or glusterfs-fuse"),
}


class ShareMountError(VfsnapError):
    """A share could not be mounted or read; the mount of vfsnap fails with it."""


@attrs.frozen
class ShareEntry:
    """One share of a shares file, or the share given on the command line."""

    address: str  # host:/export, or (vfsnap's extension) an absolute local directory
    flags: tuple[str, ...] = ()  # extra mount(8) arguments for this share, e.g. ("-o", "vers=4.1")

    @property
    def is_local(self) -> bool:
        return self.address.startswith("/")


def parse_shares_config(text: str, *, source: str = "shares file") -> list[ShareEntry]:
    """The shares of a Cinder shares file, in file order.

    Parsed as cinder's `RemoteFSDriver._load_shares_config` does: blank lines and lines starting
    with `#` are skipped; the share is what comes before the first space (`\\040` in it stands
    for a space), the rest of the line holds mount(8) arguments split on whitespace; a share not
    of the form `address:/export` is warned about and skipped. vfsnap also splits on a tab, and
    accepts an absolute directory (without arguments) as a local share. A share listed twice keeps
    its first place and its last arguments, as in Cinder's dict.
    """
    entries: dict[str, ShareEntry] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        head, _, rest = line.replace("\t", " ").partition(" ")
        address = head.strip().replace("\\040", " ")
        flags = tuple(rest.split())
        where = f"{source} line {number}"
        if address.startswith("/"):
            if flags:
                log.warning("%s: %r ignored: a local directory takes no mount options", where, line.strip())
                continue
        elif not SHARE_FORMAT.match(address):
            log.warning("%s: %r ignored: a share must be of the form address:/export", where, line.strip())
            continue
        if address in entries:
            log.warning("%s: share %s listed again; using the options of this line", where, address)
        entries[address] = ShareEntry(address, flags)
    return list(entries.values())


def load_shares_config(path: str) -> list[ShareEntry]:
    try:
        with open(path, encoding="utf-8") as config:
            text = config.read()
    except OSError as exc:
        raise ShareMountError(f"cannot read shares file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ShareMountError(f"shares file {path} is not UTF-8 text") from None
    entries = parse_shares_config(text, source=path)
    if not entries:
        raise ShareMountError(f"shares file {path} lists no valid share")
    return entries


def mount_point_for(address: str, mount_base: str) -> str:
    """The directory a share is mounted on: os-brick's `RemoteFsClient.get_mount_point`."""
    digest = hashlib.md5(address.encode("utf-8"), usedforsecurity=False).hexdigest()
    return os.path.join(os.path.realpath(mount_base), digest)


def mount_shares(spec: str, options: MountOptions) -> list[str]:
    """Local directories of every share: directories as they are, network shares mounted.

    With `shares_config`, the shares come from that file and `spec` only names the mount (it is
    the first column of /proc/mounts). Every share must be usable, or the mount fails: serving
    without one would make its volumes silently disappear.
    """
    if options.shares_config:
        entries = load_shares_config(options.shares_config)
    else:
        entries = [ShareEntry(spec)]
    fstype = "glusterfs" if options.share_type == "glusterfs" else "nfs"
    paths = []
    for entry in entries:
        if entry.is_local or os.path.isdir(entry.address):
            if not os.path.isdir(entry.address):
                raise ShareMountError(f"share {entry.address} is not a directory")
            paths.append(os.path.realpath(entry.address))
        elif SHARE_FORMAT.match(entry.address):
            paths.append(ensure_mounted(entry, fstype, options))
        else:
            raise ShareMountError(f"share {entry.address} is neither a directory nor of the form address:/export")
    return paths


def ensure_mounted(entry: ShareEntry, fstype: str, options: MountOptions) -> str:
    """Mount one network share under the mount base unless it is mounted there already."""
    path = mount_point_for(entry.address, options.mount_base)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        raise ShareMountError(f"cannot create mount base {options.mount_base}: {exc.strerror}") from None
    # Two vfsnap mounts starting together must not both mount the share (Linux would stack them).
    with _locked(os.path.join(os.path.dirname(path), LOCK_NAME)):
        source = mounted_source(path)
        if source is not None:
            if source != entry.address:
                log.warning("%s is mounted on %s, where %s belongs; using it", source, path, entry.address)
            log.info("share %s already mounted on %s", entry.address, path)
            return path
        check_client(fstype)
        os.makedirs(path, exist_ok=True)
        _mount_with_retries(entry, fstype, path, options)
    return path


# Several hosts read what one wrote (`.info` renamed into place, images written elsewhere): the
# glusterfs FUSE client must not answer from the kernel's caches of names, attributes or pages
# (a page of a base image read here before another host wrote it would stay stale).
GLUSTERFS_COHERENCE_OPTIONS = tuple(f"{name}={value}" for name, value in GLUSTER_COHERENT_OPTIONS.items())


def _mount_options(fstype: str, configured: str | None) -> str | None:
    parts = [p for p in (configured or "").split(",") if p]
    if fstype == "glusterfs":
        given = {p.split("=", 1)[0] for p in parts}
        parts += [o for o in GLUSTERFS_COHERENCE_OPTIONS if o.split("=", 1)[0] not in given]
    return ",".join(parts) or None


def _mount_with_retries(entry: ShareEntry, fstype: str, path: str, options: MountOptions) -> None:
    command = [_command("mount"), "-t", fstype]
    mount_options = _mount_options(fstype, options.share_mount_options)
    if mount_options:
        command += ["-o", mount_options]
    command += [*entry.flags, entry.address, path]
    attempts = max(1, options.share_mount_attempts)
    for attempt in range(1, attempts + 1):
        log.debug("mounting %s: %s", entry.address, " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
        error = (result.stderr or result.stdout).strip()
        if result.returncode == 0 and mounted_source(path) is not None:
            log.info("mounted %s share %s on %s", fstype, entry.address, path)
            return
        if "already mounted" in error and mounted_source(path) is not None:
            log.info("share %s already mounted on %s", entry.address, path)
            return
        if result.returncode == 0:
            error = f"mount reported success but {path} is not a mount point"
        if attempt < attempts:
            log.warning("mounting %s failed (attempt %d of %d): %s", entry.address, attempt, attempts, error)
            time.sleep(MOUNT_RETRY_DELAY)
    hint = ""
    if fstype == "glusterfs":  # mount.glusterfs says only "Mounting glusterfs on ... failed."
        hint = f" (the glusterfs client's log: /var/log/glusterfs/{path.strip('/').replace('/', '-')}.log)"
    raise ShareMountError(f"cannot mount {fstype} share {entry.address} on {path} after {attempts} attempt(s): "
                          f"{error or 'mount exited with ' + str(result.returncode)}{hint}")


def check_client(fstype: str) -> None:
    """Fail clearly when this host cannot mount `fstype` at all (no kernel client, no helper)."""
    filesystems, module, helper, package = _REQUIREMENTS[fstype]
    if not _kernel_has(filesystems):
        modprobe = shutil.which("modprobe", path=_search_path())
        if modprobe is not None:
            subprocess.run([modprobe, "-q", module], capture_output=True, stdin=subprocess.DEVNULL, check=False)
        if not _kernel_has(filesystems):
            raise ShareMountError(
                f"this kernel cannot mount {fstype} shares: no {' or '.join(filesystems)} in /proc/filesystems "
                f"and `modprobe {module}` " + ("failed" if modprobe else "is not available"))
    if shutil.which(helper, path=_search_path()) is None:
        raise ShareMountError(f"{helper} not found: install {package} to mount {fstype} shares")


def _kernel_has(filesystems: tuple[str, ...]) -> bool:
    try:
        with open("/proc/filesystems") as known:
            names = {line.split()[-1] for line in known if line.strip()}
    except OSError:
        return True  # cannot tell: let mount(8) give its own error
    return any(name in names for name in filesystems)


def mounted_source(path: str) -> str | None:
    """What is mounted on `path` according to /proc/mounts (the last mount wins), or None."""
    entry = mounted_at(path)
    return None if entry is None else entry.source


def _search_path() -> str:
    return os.pathsep.join(p for p in (os.environ.get("PATH", ""), SYSTEM_PATH) if p)


def _command(name: str) -> str:
    return shutil.which(name, path=_search_path()) or name


@contextlib.contextmanager
def _locked(path: str):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
