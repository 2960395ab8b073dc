"""Domain errors: each carries the errno the FUSE layer answers with.

Every layer raises these; `vfsnap.fs` turns them into `pyfuse3.FUSEError` in exactly one
place, and turns anything else into EIO after logging it (an unexpected exception escaping a
pyfuse3 handler would abort the whole mount).
"""

import errno as errno_codes
import os


class VfsnapError(Exception):
    """A failure the user should see, with the errno the kernel returns for it."""

    errno = errno_codes.EIO

    def __init__(self, message: str, *, errno: int | None = None):
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class CorruptImage(VfsnapError):
    """An image's metadata breaks the qcow2 specification or vfsnap's chain rules."""

    errno = errno_codes.EIO


class CorruptRecord(VfsnapError):
    """A record vfsnap keeps on the share (a sidecar, a journal entry, a rename plan) that does
    not parse: written by someone else, or damaged. EIO for the volume it belongs to, as a
    malformed image (DESIGN.md invariant 6); the message names the file and the field."""

    errno = errno_codes.EIO


class UnsupportedImage(VfsnapError):
    """A valid image using a feature vfsnap cannot serve (encryption, external data file)."""

    errno = errno_codes.EIO


class InvalidName(VfsnapError):
    errno = errno_codes.EINVAL


class NameTooLong(VfsnapError):
    errno = errno_codes.ENAMETOOLONG


class NotFound(VfsnapError):
    errno = errno_codes.ENOENT


class AlreadyExists(VfsnapError):
    errno = errno_codes.EEXIST


class Busy(VfsnapError):
    errno = errno_codes.EBUSY


class ReadOnly(VfsnapError):
    errno = errno_codes.EROFS


class NotPermitted(VfsnapError):
    errno = errno_codes.EPERM


class NoSpace(VfsnapError):
    errno = errno_codes.ENOSPC


class NewerSnapshots(VfsnapError):
    """A revert to a snapshot that is not the newest, without `--destroy-newer`."""

    errno = errno_codes.ENOTEMPTY


def share_error(exc: OSError, message: str) -> VfsnapError:
    """The domain error for a failed operation on the share: NoSpace for a full share or an
    exhausted quota (ENOSPC, EDQUOT), else the call's own errno."""
    if exc.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT):
        return NoSpace(f"{message}: no space left on the share ({exc.strerror})")
    return VfsnapError(f"{message}: {exc.strerror or os.strerror(exc.errno or errno_codes.EIO)}",
                       errno=exc.errno or errno_codes.EIO)


class ShareNotAnswering(VfsnapError):
    """The share has a call outstanding for too long (a hung NAS, a stopped brick): what can be
    answered from the last known state is; what cannot gets EAGAIN instead of stalling the mount."""

    errno = errno_codes.EAGAIN
