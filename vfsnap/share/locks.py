"""Locks between hosts that mount the same share (DESIGN.md invariant 7).

Open-file-description locks (F_OFD_SETLK) on two bytes of the volume's base file, far past any
data and clear of the bytes QEMU (100-203) and libvirt (0) lock. NFSv4 and GlusterFS's FUSE
client carry POSIX byte-range locks to the server, so they hold across hosts; OFD locks are tied
to vfsnap's own descriptor, so opening and closing other descriptors of the file never drops
them (classic fcntl locks would be), and two mounts on one host exclude each other too.

- CHAIN: held while a chain change runs (snapshot, merge, rename, removal): never two at once.
- WRITER: held while the volume is open for writing on this host. Another host's open for
  writing gets EBUSY; and because a chain change rewrites files the writer's host holds in
  memory, another host's chain change gets EBUSY too. The host that writes takes snapshots.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

import trio

from vfsnap.errors import Busy

log = logging.getLogger(__name__)

CHAIN = 1 << 62
WRITER = CHAIN + 1
CHAIN_WAIT_SECONDS = 5.0


def _flock(kind: int, start: int) -> bytes:
    return struct.pack("hhqqi", kind, os.SEEK_SET, start, 1, 0)


class VolumeLocks:
    def __init__(self, share_dir, volume: str):
        self.share_dir = share_dir
        self.volume = volume
        self._fd: int | None = None
        self.held: set[int] = set()

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = self.share_dir.open_regular(self.volume, os.O_RDWR)
        return self._fd

    def try_lock(self, byte: int) -> bool:
        if byte in self.held:
            return True
        try:
            try:
                fcntl.fcntl(self._descriptor(), fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, byte))
            except OSError as exc:
                if exc.errno != errno.ESTALE or self.held:
                    raise
                # The base file was replaced on the share (and nothing is held on the old one):
                # lock the file that is there now, by name.
                self.close()
                self.share_dir.reresolve()
                fcntl.fcntl(self._descriptor(), fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, byte))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                if not self.held:
                    self.close()
                return False
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                log.warning("%s: the share does not support locks (%s); hosts are not excluded",
                            self.volume, os.strerror(exc.errno))
                self.held.add(byte)
                return True
            raise
        self.held.add(byte)
        return True

    def unlock(self, byte: int) -> None:
        if byte not in self.held:
            return
        self.held.discard(byte)
        try:
            fcntl.fcntl(self._descriptor(), fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, byte))
        except OSError as exc:
            log.warning("%s: releasing a lock: %s", self.volume, exc)
        if not self.held:
            self.close()  # hold no descriptor of the volume for nothing (it may be deleted)

    def close(self) -> None:
        self.held.clear()
        if self._fd is not None:
            os.close(self._fd)  # closing the description releases its OFD locks
            self._fd = None

    # -- what the volume uses -------------------------------------------------------------

    def acquire_writer(self) -> None:
        if not self.try_lock(WRITER):
            raise Busy(f"volume {self.volume} is open for writing on another host")

    def release_writer(self) -> None:
        self.unlock(WRITER)


class ChainChange:
    """`async with ChainChange(volume):` around every change of a volume's chain.

    Takes the volume's local lock (one change at a time in this process), then CHAIN on the
    share (waiting a little for another host's change to end), then makes sure no other host
    has the volume open for writing.
    """

    def __init__(self, volume, *, wait: float = CHAIN_WAIT_SECONDS, quiesce: bool = True):
        self.volume = volume
        self.wait = wait
        # Hold the volume's requests back for the whole change (vfsnap/share/io.py rule 6);
        # a merge, which lets requests go on while it copies, quiesces only for its commit.
        self.quiesce = volume.gate.quiesced() if quiesce else None

    async def __aenter__(self):
        volume = self.volume
        what = f"change of {volume.name}"
        volume.share.check_answering(what)  # EAGAIN at once rather than wait for a hung share
        await volume.chain_lock.acquire()
        try:
            if self.quiesce is not None:
                await self.quiesce.__aenter__()
        except BaseException:
            volume.chain_lock.release()
            raise
        try:
            # Again: waiting for the lock and for the requests in flight may have taken long.
            volume.share.check_answering(what)
            if volume.share.read_only:
                return self
            locks = volume.locks
            with trio.move_on_after(self.wait):
                while not locks.try_lock(CHAIN):
                    await trio.sleep(0.05)
            if CHAIN not in locks.held:
                raise Busy(f"volume {volume.name}: another host is changing its chain")
            if WRITER not in locks.held:
                if not locks.try_lock(WRITER):
                    locks.unlock(CHAIN)
                    raise Busy(f"volume {volume.name} is open for writing on another host")
            if volume.writers:
                volume.refresh()  # we hold the writer lock: only `.info` can be news
            else:
                volume.reload_all()  # another host may have written any of it before we locked
            if volume.needs_recovery:
                volume.finish_journal()
            volume.chain_changing = True
            try:
                volume.sync_qemu_locks(strict=True)  # EBUSY while a QEMU process uses the images
            except BaseException:
                volume.chain_changing = False
                volume.sync_qemu_locks()
                if not volume.writers:
                    locks.unlock(WRITER)
                locks.unlock(CHAIN)
                raise
        except BaseException:
            if self.quiesce is not None:
                await self.quiesce.__aexit__(None, None, None)
            volume.chain_lock.release()
            raise
        return self

    async def __aexit__(self, *exc_info):
        volume = self.volume
        try:
            if volume.chain_changing:
                volume.chain_changing = False
                volume.sync_qemu_locks()
            if not volume.share.read_only:
                if not volume.writers:
                    volume.locks.unlock(WRITER)  # ours, or a writer's who left meanwhile
                volume.locks.unlock(CHAIN)
        finally:
            try:
                if self.quiesce is not None:
                    await self.quiesce.__aexit__(None, None, None)
            finally:
                volume.chain_lock.release()
