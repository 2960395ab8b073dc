"""A third ceiling: a passthrough of ONE flat raw file in Python without pyfuse3, libfuse or trio.

    python bench/raw_passthrough.py [--threads 16] IMAGE MOUNTPOINT    # serves MOUNTPOINT/<basename>

It speaks the kernel's FUSE protocol itself over /dev/fuse (mounted with mount(2): root only),
and each of N threads reads a request, answers it (one os.pread/os.pwrite on one fd) and writes
the reply: no event loop, no hand-off between threads, as libfuse's multi-threaded loop works.
It asks for what libfuse 3.14 asks (asynchronous reads, 1 MiB requests) and opens files as
bench/passthrough.py does (no direct_io, no keep_cache), so its figures differ from the pyfuse3
ceilings only by the request loop. Like them it copies nothing on write and knows no qcow2.

The question it answers (bench/share_bench.py, target `ceiling-raw`): how much of the gap to
qemu-storage-daemon is pyfuse3's and trio's request loop, and how much Python's own cost per
request on the same two cores. Unmount with `fusermount3 -u MOUNTPOINT`.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import stat
import struct
import sys
import threading

ROOT_ID, FILE_ID = 1, 2

# Opcodes (include/uapi/linux/fuse.h).
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
GETXATTR, FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR = 22, 25, 26, 27, 28, 29
ACCESS, INTERRUPT, DESTROY, BATCH_FORGET = 34, 36, 38, 42
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}

# INIT flags: what libfuse 3.14 asks for that matters to a passthrough of one file.
ASYNC_READ, BIG_WRITES, MAX_PAGES = 1 << 0, 1 << 5, 1 << 22
MAX_WRITE = 1 << 20
BUFFER = MAX_WRITE + 4096

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen padding
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr
READ_IN = struct.Struct("<QQIIQII")  # fh offset size read_flags lock_owner flags padding
WRITE_IN = READ_IN  # fh offset size write_flags lock_owner flags padding


class RawPassthrough:
    def __init__(self, image: str, mountpoint: str):
        self.name = os.path.basename(image).encode()
        self.fd = os.open(image, os.O_RDWR)
        self.mountpoint = mountpoint
        self.dev = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        options = f"fd={self.dev},rootmode={stat.S_IFDIR:o},user_id=0,group_id=0,allow_other,max_read={MAX_WRITE}"
        if libc.mount(image.encode(), mountpoint.encode(), b"fuse.rawpassthrough",
                      ctypes.c_ulong(os.ST_NOSUID | os.ST_NODEV), options.encode()) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {mountpoint}: {os.strerror(err)}")

    # -- replies ----------------------------------------------------------------------------

    def _reply(self, unique: int, *parts: bytes, error: int = 0) -> None:
        size = OUT_HEADER.size + sum(len(p) for p in parts)
        try:
            os.writev(self.dev, [OUT_HEADER.pack(size, -error, unique), *parts])
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the request was interrupted meanwhile
                raise

    def _attr(self, nodeid: int) -> bytes:
        st = os.fstat(self.fd)
        if nodeid == ROOT_ID:
            mode, nlink, size, blocks = stat.S_IFDIR | 0o755, 2, 0, 0
        else:
            mode, nlink, size, blocks = stat.S_IFREG | 0o644, 1, st.st_size, st.st_blocks
        return ATTR.pack(nodeid, size, blocks, int(st.st_atime), int(st.st_mtime), int(st.st_ctime),
                         0, 0, 0, mode, nlink, st.st_uid, st.st_gid, 0, 4096, 0)

    # -- the loop of one thread ---------------------------------------------------------------

    def serve(self) -> None:
        # Each thread's own buffers, kept: a fresh 1 MiB bytes object per request would be an
        # mmap and munmap each time.
        request = bytearray(BUFFER)
        data = bytearray(MAX_WRITE)
        view = memoryview(request)
        while True:
            try:
                length = os.readv(self.dev, [request])
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                if exc.errno == errno.ENODEV:  # unmounted
                    return
                raise
            _, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(request)
            if opcode in NO_REPLY:
                continue
            try:
                self._handle(opcode, unique, nodeid, view[IN_HEADER.size:length], data)
            except OSError as exc:
                self._reply(unique, error=exc.errno or errno.EIO)
            if opcode == DESTROY:
                return

    def _handle(self, opcode: int, unique: int, nodeid: int, body: memoryview, data: bytearray) -> None:
        if opcode == READ:
            _, offset, size, *_ = READ_IN.unpack_from(body)
            got = os.preadv(self.fd, [memoryview(data)[:size]], offset)
            self._reply(unique, memoryview(data)[:got])
        elif opcode == WRITE:
            _, offset, size, *_ = WRITE_IN.unpack_from(body)
            written = os.pwrite(self.fd, body[WRITE_IN.size:WRITE_IN.size + size], offset)
            self._reply(unique, struct.pack("<II", written, 0))
        elif opcode == FSYNC:
            datasync = struct.unpack_from("<QI", body)[1] & 1
            (os.fdatasync if datasync else os.fsync)(self.fd)
            self._reply(unique)
        elif opcode in (FLUSH, RELEASE, RELEASEDIR, ACCESS, DESTROY):
            self._reply(unique)
        elif opcode == GETATTR:
            self._reply(unique, struct.pack("<QII", 1, 0, 0), self._attr(nodeid))
        elif opcode == LOOKUP:
            name = bytes(body).split(b"\0", 1)[0]
            if nodeid != ROOT_ID or name != self.name:
                self._reply(unique, error=errno.ENOENT)
            else:
                self._reply(unique, struct.pack("<QQQQII", FILE_ID, 0, 1, 1, 0, 0), self._attr(FILE_ID))
        elif opcode in (OPEN, OPENDIR):
            self._reply(unique, struct.pack("<QIi", 0, 0, 0))
        elif opcode == READDIR:
            offset = READ_IN.unpack_from(body)[1]
            entries = b""
            if offset == 0:
                entries = struct.pack("<QQII", FILE_ID, 1, len(self.name), stat.S_IFREG >> 12) + self.name
                entries += b"\0" * (-len(entries) % 8)
            self._reply(unique, entries)
        elif opcode == STATFS:
            st = os.fstatvfs(self.fd)
            self._reply(unique, struct.pack("<QQQQQIIII24x", st.f_blocks, st.f_bfree, st.f_bavail, st.f_files,
                                            st.f_ffree, st.f_bsize, 255, st.f_frsize, 0))
        elif opcode == INIT:
            major, minor, max_readahead, flags = struct.unpack_from("<IIII", body)
            if major != 7:
                self._reply(unique, error=errno.EPROTO)
                return
            want = flags & (ASYNC_READ | BIG_WRITES | MAX_PAGES)
            # fuse_init_out of protocol 7.31: 64 bytes.
            self._reply(unique, struct.pack("<IIIIHHIIHHII", 7, 31, max_readahead, want, 16, 12, MAX_WRITE, 1,
                                            MAX_WRITE // 4096, 0, 0, 0) + bytes(24))
        else:  # GETXATTR and everything else: not implemented (the kernel stops asking)
            self._reply(unique, error=errno.ENOSYS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("image")
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    fs = RawPassthrough(args.image, os.path.abspath(args.mountpoint))
    threads = [threading.Thread(target=fs.serve, daemon=True) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sys.exit(0)


if __name__ == "__main__":
    main()
