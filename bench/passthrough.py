"""The Python ceiling: a bare pyfuse3 passthrough of ONE flat raw file.

    python bench/passthrough.py [--xattr] [--threads N] IMAGE MOUNTPOINT    # serves MOUNTPOINT/<basename of IMAGE>

Reads and writes are one os.pread/os.pwrite on one fd, fsync is os.fsync: no map, no cache, no
error boundary. No Python FUSE filesystem can do less work per request, so this is the upper bound
vfsnap is measured against. Unmount with `fusermount3 -u MOUNTPOINT`.

By default the calls run on trio's loop, one request at a time: the ceiling of a local disk,
whose reads the page cache answers. On a network share each call is a round trip, and a filesystem
that wants requests in flight must hand the calls to threads: --threads N runs each one on one
of N threads, handed over as vfsnap does it, with pyfuse3's tasks set as vfsnap sets them
(`min_tasks=32, max_tasks=128`). That is the ceiling of a network share (bench/share_bench.py).

--xattr also answers getxattr (ENODATA), as any filesystem with extended attributes must: the
kernel then asks for security.capability before every write, one more request per write.
"""

import argparse
import errno
import functools
import os
import stat

import pyfuse3
import trio

FILE_INODE = pyfuse3.ROOT_INODE + 1


class Passthrough(pyfuse3.Operations):
    def __init__(self, image: str):
        super().__init__()
        self.name = os.path.basename(image).encode()
        self.fd = os.open(image, os.O_RDWR)

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        st = os.fstat(self.fd)
        is_root = inode == pyfuse3.ROOT_INODE
        attr.st_ino = inode
        attr.st_mode = (stat.S_IFDIR | 0o755) if is_root else (stat.S_IFREG | 0o644)
        attr.st_nlink = 2 if is_root else 1
        attr.st_size = 0 if is_root else st.st_size
        attr.st_uid, attr.st_gid = st.st_uid, st.st_gid
        attr.st_atime_ns, attr.st_mtime_ns, attr.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        attr.st_blksize, attr.st_blocks = 4096, 0 if is_root else st.st_blocks
        attr.entry_timeout = attr.attr_timeout = 1.0  # as vfsnap
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INODE)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attr(FILE_INODE), 1)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, keep_cache=False)  # as vfsnap's live volume

    async def read(self, fh, off, size):
        return os.pread(self.fd, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(self.fd, buf, off)

    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(self.fd)


class PassthroughThreads(Passthrough):
    """Every read, write and fsync on one of `threads` worker threads, handed over the way vfsnap
    hands them (`vfsnap.share.io.ShareIO.run`, the cheapest hand-off measured here: about 45 us
    against 150 us through `trio.to_thread.run_sync`). Only the hand-off is vfsnap's."""

    def __init__(self, image: str, threads: int):
        super().__init__(image)
        from vfsnap.share.io import ShareIO

        self.io = ShareIO(image, threads=threads, threaded=True)

    async def read(self, fh, off, size):
        return await self.io.run("read", os.pread, self.fd, size, off)

    async def write(self, fh, off, buf):
        return await self.io.run("write", os.pwrite, self.fd, buf, off)

    async def fsync(self, fh, datasync):
        await self.io.run("fsync", os.fdatasync if datasync else os.fsync, self.fd)


class PassthroughXattr(Passthrough):
    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--xattr", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="hand reads, writes and fsyncs to N threads")
    parser.add_argument("image")
    parser.add_argument("mountpoint")
    args = parser.parse_args()
    if args.threads:
        fs = PassthroughThreads(args.image, args.threads)
        run = functools.partial(pyfuse3.main, min_tasks=32, max_tasks=128)  # as vfsnap
    else:
        fs = (PassthroughXattr if args.xattr else Passthrough)(args.image)
        run = pyfuse3.main
    mountpoint = args.mountpoint
    options = set(pyfuse3.default_options) | {f"fsname={args.image}", "subtype=passthrough"}
    pyfuse3.init(fs, mountpoint, options)
    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=os.path.ismount(mountpoint))


if __name__ == "__main__":
    main()
