"""Reads answered by threads of their own, every other request relayed to pyfuse3 (issue 12).

pyfuse3 reads the kernel's requests on one thread and runs every handler as a trio task on it:
measured on GlusterFS, that loop, not Python, is what kept random reads at half of
qemu-storage-daemon's rate (bench/raw_passthrough.py: threads that read a request, pread and
reply reach 1.06-1.55x of it). So the kernel's requests are read here, by `threads` threads on a
clone of pyfuse3's /dev/fuse descriptor (FUSE_DEV_IOC_CLONE: the same connection; the kernel
hands each request to one reader):

- A READ of an open volume or snapshot file whose map is already resolved is answered by the
  thread that read it (`fast_read`: the view's resolved extents and a pread, see
  `Volume.read_now`), without the loop.
- So is a WRITE of a volume on a network share (`fast_write`: the volume's write lock, the
  qcow2 writer as on a worker thread, the new extents patched into the view; see
  `Volume.write_now`).
- Everything else (lookups, opens, flushes, reads needing a table, writes while a chain change
  or a flush waits, INIT itself) goes unchanged
  to libfuse, which reads it from a socket put where it expected its /dev/fuse descriptor
  (a SOCK_SEQPACKET pair: one message per request, as the device gives them). Its replies and
  notifications come back on the same socket and are written to the device by `reply` threads.

Nothing about the protocol is decided here but the replies to READ and WRITE: libfuse still negotiates
INIT and answers everything it did before. Without the privilege to size the socket for 1 MiB
requests (SO_SNDBUFFORCE: root), with `fuse_threads=0`, or by default on a mount of local
directories only (vfsnap/cli/mount.py says why), pyfuse3 reads the device alone.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import threading

log = logging.getLogger(__name__)

OPEN, READ, WRITE = 14, 15, 16
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
READ_IN = struct.Struct("<QQI")  # fh offset size (then read_flags lock_owner flags padding)
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding; data
WRITE_OUT = struct.Struct("<II")  # size padding
OPEN_OUT = struct.Struct("<QI")  # fh open_flags (then padding)
FOPEN_DIRECT_IO = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6  # kernel 6.2 on; libfuse 3.15 on (Debian 12 has 3.14)
FUSE_DEV_IOC_CLONE = 0x8004E500  # _IOR(229, 0, uint32_t)
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h; not in Python's socket module

# The largest request: libfuse 3.14 asks for 1 MiB writes (max_pages) plus the headers.
MAX_REQUEST = (1 << 20) + 4096
# Socket buffers for the largest request and some queued behind it (a SEQPACKET message must
# fit in the sender's buffer whole).
SOCKET_BUFFER = 4 * MAX_REQUEST
REPLY_THREADS = 2


def fuse_device_fd() -> int:
    """The descriptor of /dev/fuse pyfuse3.init opened in this process."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    if len(found) != 1:
        raise RuntimeError(f"expected one /dev/fuse descriptor, found {len(found)}")
    return found[0]


class KernelRelay:
    """Threads between the kernel and libfuse; `fast_read(fh, offset, size)` answers a READ
    (bytes-like) or declines it (None: it goes to libfuse like any other request);
    `fast_write(fh, offset, data)` answers a WRITE (the bytes written), declines it (None), or
    fails it (an exception: its `errno`, else EIO)."""

    def __init__(self, fast_read, fast_write=None, *, threads: int = 16, on_unmounted=None):
        self.fast_read = fast_read
        self.fast_write = fast_write
        self.threads = threads
        self.on_unmounted = on_unmounted  # called once, from a thread, when the device says ENODEV
        self.device = -1
        self._libfuse: socket.socket | None = None
        self._serving = True
        self._fast_in_flight = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # `stop` waits on it for the reads under way
        self._ended = False
        self._opens: set[int] = set()  # OPEN requests passed to libfuse, not answered yet
        self.fast_reads = 0  # answered here (logged at the end, for tests and operators)
        self.fast_writes = 0

    def start(self) -> bool:
        """Put the relay between the kernel and libfuse (before pyfuse3.main reads anything).
        False when it cannot (no privilege for the socket buffers): pyfuse3 then reads alone."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for sock in (ours, theirs):
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, SOCKET_BUFFER)
        except OSError as exc:
            ours.close()
            theirs.close()
            log.info("FUSE requests all on pyfuse3's thread: %s", exc)
            return False
        fuse_fd = fuse_device_fd()
        # A clone is a new open file of the same connection, with its own (blocking) mode: the
        # original's may be non-blocking for pyfuse3's loop. It keeps the connection alive when
        # the original is replaced below.
        device = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(device, FUSE_DEV_IOC_CLONE, struct.pack("I", fuse_fd))
        except OSError as exc:
            os.close(device)
            ours.close()
            theirs.close()
            log.info("FUSE requests all on pyfuse3's thread: cannot clone /dev/fuse: %s", exc)
            return False
        theirs.setblocking(not (fcntl.fcntl(fuse_fd, fcntl.F_GETFL) & os.O_NONBLOCK))
        os.dup2(theirs.fileno(), fuse_fd)  # libfuse now reads and writes the socket
        theirs.close()
        self.device = device
        self._libfuse = ours
        for i in range(self.threads):
            threading.Thread(target=self._read_requests, name=f"fuse-{i}", daemon=True).start()
        for i in range(REPLY_THREADS):
            threading.Thread(target=self._relay_replies, name=f"fuse-reply-{i}", daemon=True).start()
        return True

    def stop(self) -> None:
        """No more reads answered here; returns when those in progress are done (before the
        volumes close). Later requests all go to libfuse."""
        with self._lock:
            self._serving = False
            while self._fast_in_flight:
                self._idle.wait()
        log.info("%d reads and %d writes were answered on FUSE reader threads", self.fast_reads, self.fast_writes)

    # -- the threads ------------------------------------------------------------------------

    def _read_requests(self) -> None:
        request = bytearray(MAX_REQUEST)
        view = memoryview(request)
        device, libfuse = self.device, self._libfuse
        while True:
            try:
                length = os.readv(device, [request])
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                if exc.errno == errno.ENODEV:  # unmounted, or the connection aborted
                    self._unmounted()
                    return
                raise
            _, opcode, unique, *_ = IN_HEADER.unpack_from(request)
            if opcode == READ or opcode == WRITE and self.fast_write is not None:
                try:
                    if self._answer(opcode, view, unique):
                        continue
                except Exception:  # noqa: BLE001 - a bug here must not lose the request
                    log.exception("answering request %d on a reader thread; libfuse answers it", unique)
            if opcode == OPEN:
                with self._lock:
                    self._opens.add(unique)  # its reply gets parallel direct writes
            try:
                libfuse.sendall(view[:length])
            except OSError:  # libfuse is gone (the loop ended): nobody will answer
                return

    def _answer(self, opcode: int, request: memoryview, unique: int) -> bool:
        """Answer a READ or WRITE here; False to pass it on to libfuse."""
        with self._lock:
            # Two readers always stay free to pass requests on: requests for hung shares could
            # otherwise hold every reader, and nothing else would be read (each share's own
            # bound is ShareIO.run_here's).
            if not self._serving or self._fast_in_flight >= self.threads - 2:
                return False
            self._fast_in_flight += 1
        answered = False
        try:
            reply = self._read(request) if opcode == READ else self._write(request)
            if reply is None:
                return False
            error, body = reply
            length = OUT_HEADER.size + len(body)
            try:
                os.writev(self.device, [OUT_HEADER.pack(length, error, unique), body])
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENODEV):  # interrupted, or unmounted
                    # (A write done twice writes the same bytes to the same place.)
                    log.error("reply to a request: %s; libfuse answers it", exc)
                    return False
            answered = True
            return True
        finally:
            with self._lock:
                self._fast_in_flight -= 1
                self.fast_reads += answered and opcode == READ
                self.fast_writes += answered and opcode == WRITE
                if not self._serving and not self._fast_in_flight:
                    self._idle.notify_all()

    def _read(self, request: memoryview) -> tuple[int, bytes] | None:
        fh, offset, size = READ_IN.unpack_from(request, IN_HEADER.size)
        try:
            data = self.fast_read(fh, offset, size)
        except Exception as exc:  # noqa: BLE001 - libfuse's handler answers it, errors included
            log.debug("read of fh %d at %d left to the loop: %r", fh, offset, exc)
            return None
        return None if data is None else (0, data)

    def _write(self, request: memoryview) -> tuple[int, bytes] | None:
        fh, offset, size, *_ = WRITE_IN.unpack_from(request, IN_HEADER.size)
        start = IN_HEADER.size + WRITE_IN.size
        try:
            written = self.fast_write(fh, offset, request[start : start + size])
        except Exception as exc:  # noqa: BLE001 - the error boundary's errno (FUSEError), or EIO
            # Not passed on: the write may be partly done.
            code = getattr(exc, "errno", None)
            if not isinstance(code, int) or code <= 0:
                log.exception("write of fh %d at %d", fh, offset)
                code = errno.EIO
            return -code, b""
        return None if written is None else (0, WRITE_OUT.pack(written, 0))

    def _relay_replies(self) -> None:
        reply = bytearray(MAX_REQUEST)
        view = memoryview(reply)
        while True:
            try:
                length = self._libfuse.recv_into(reply)
            except OSError:
                return
            if not length:  # libfuse closed its end (pyfuse3.close)
                return
            if self._opens:
                self._allow_parallel_writes(reply, length)
            try:
                # writev, not write: os.write is how vfsnap writes share files, and only those
                # count for tests/faults.py's injected failures and crashes.
                os.writev(self.device, [view[:length]])
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    return
                if exc.errno != errno.ENOENT:  # ENOENT: the request was interrupted meanwhile
                    log.error("reply to the kernel: %s", exc)

    def _allow_parallel_writes(self, reply: bytearray, length: int) -> None:
        """An open answered with direct_io (vfsnap gives it to O_DIRECT opens of volumes) also
        gets FOPEN_PARALLEL_DIRECT_WRITES, which pyfuse3 cannot set: without it the kernel
        holds the file's inode lock over each direct write and sends the writes of one file
        one at a time (bench/fuse_parallel_writes.py). vfsnap orders them itself (the volume's
        write lock, vfsnap/share/io.py rule 4); what several writes in flight give is the
        request's way in and out overlapping the previous write's wait for the share."""
        _, error, unique = OUT_HEADER.unpack_from(reply)
        with self._lock:
            if unique not in self._opens:
                return
            self._opens.discard(unique)
        if error or length < OUT_HEADER.size + OPEN_OUT.size:
            return
        fh, flags = OPEN_OUT.unpack_from(reply, OUT_HEADER.size)
        if flags & FOPEN_DIRECT_IO:
            OPEN_OUT.pack_into(reply, OUT_HEADER.size, fh, flags | FOPEN_PARALLEL_DIRECT_WRITES)

    def _unmounted(self) -> None:
        # Every reader sees ENODEV; libfuse, reading the socket, never does: told once.
        with self._lock:
            first, self._ended = not self._ended, True
        if first and self.on_unmounted is not None:
            self.on_unmounted()
