"""The Python ceiling: a bare pyfuse3 passthrough of ONE flat raw file.

    python bench/passthrough.py [--xattr] IMAGE MOUNTPOINT    # serves MOUNTPOINT/<basename of IMAGE>

Reads and writes are one os.pread/os.pwrite on one fd, fsync is os.fsync: no map, no cache, no
error boundary. No Python FUSE filesystem can do less work per request, so this is the upper bound
vfsnap is measured against. Unmount with `fusermount3 -u MOUNTPOINT`.

--xattr also answers getxattr (ENODATA), as any filesystem with extended attributes must: the
kernel then asks for security.capability before every write, one more request per write.
"""

import errno
import os
import stat
import sys

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

    async def flush(self, fh):
        pass

    async def release(self, fh):
        pass


class PassthroughXattr(Passthrough):
    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def main() -> None:
    args = sys.argv[1:]
    fs_class = PassthroughXattr if "--xattr" in args else Passthrough
    image, mountpoint = [a for a in args if a != "--xattr"]
    options = set(pyfuse3.default_options) | {f"fsname={image}", "subtype=passthrough"}
    pyfuse3.init(fs_class(image), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=os.path.ismount(mountpoint))


if __name__ == "__main__":
    main()
