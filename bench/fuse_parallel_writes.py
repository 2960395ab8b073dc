"""How many writes to one FUSE file the kernel lets through at once.

    python bench/fuse_parallel_writes.py [--clients 4] [--delay-ms 20]

Mounts a tiny pyfuse3 filesystem (in a temporary directory) whose read and write handlers each
wait `--delay-ms` (a round trip to a share) and count how many of them are in flight together.
`--clients` threads then make O_DIRECT 4 KiB writes, then reads: all on one file, then each on
its own file. Files are opened with and without FUSE's direct_io.

What it shows on this stack (Debian 12: libfuse 3.14, pyfuse3 3.5; kernel 6.18): the kernel
holds the inode's lock for the whole of a direct write unless the filesystem answered the open
with FOPEN_PARALLEL_DIRECT_WRITES (kernel 6.2+), which libfuse sets only from 3.15 on and
pyfuse3 does not expose. So writes to one file reach the filesystem one at a time, whatever
the filesystem does with them; reads, and writes to different files, overlap. That is why
vfsnap serves one write per volume at a time (docs/design-notes.md): a second writer of the
same volume could not reach it anyway. qemu-storage-daemon 7.2's FUSE export (same libfuse)
is held to the same: the last row serves a null-co disk whose requests take `--delay-ms`.
"""

from __future__ import annotations

import argparse
import errno
import mmap
import os
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pyfuse3
import trio

FILES = 8


class CountingFS(pyfuse3.Operations):
    def __init__(self, delay: float, direct_io: bool):
        super().__init__()
        self.delay = delay
        self.direct_io = direct_io
        self.in_flight = {"read": 0, "write": 0}
        self.most = {"read": 0, "write": 0}

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        root = inode == pyfuse3.ROOT_INODE
        attr.st_mode = (stat.S_IFDIR | 0o755) if root else (stat.S_IFREG | 0o644)
        attr.st_nlink = 2 if root else 1
        attr.st_size = 0 if root else 1 << 30
        attr.st_blksize = 4096
        attr.entry_timeout = attr.attr_timeout = 60.0
        return attr

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b"stats":  # the report, read once at the end
            raise pyfuse3.FUSEError(errno.ENOENT)
        if parent_inode != pyfuse3.ROOT_INODE or not name.startswith(b"f") or not name[1:].isdigit():
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(pyfuse3.ROOT_INODE + 1 + int(name[1:]))

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=self.direct_io)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def _request(self, kind: str) -> None:
        self.in_flight[kind] += 1
        self.most[kind] = max(self.most[kind], self.in_flight[kind])
        await trio.sleep(self.delay)
        self.in_flight[kind] -= 1

    async def read(self, fh, off, size):
        await self._request("read")
        return bytes(size)

    async def write(self, fh, off, buf):
        await self._request("write")
        return len(buf)


def serve(mountpoint: str, delay: float, direct_io: bool, ready: int) -> None:
    """The filesystem's process: prints the most requests seen in flight when unmounted."""
    fs = CountingFS(delay, direct_io)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    pyfuse3.init(fs, mountpoint, options)
    os.write(ready, b"x")
    try:
        trio.run(pyfuse3.main, 4, 64)
    finally:
        pyfuse3.close()
    print(f"{fs.most['write']} {fs.most['read']}", flush=True)


def drive(mountpoint: str, clients: int, kind: str, same_file: bool, name: str | None = None) -> float:
    def client(i: int) -> None:
        fd = os.open(os.path.join(mountpoint, name or f"f{0 if same_file else i}"), os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            for n in range(10):
                if kind == "write":
                    os.pwrite(fd, buf, (i * 100 + n) * 4096)
                else:
                    os.preadv(fd, [buf], (i * 100 + n) * 4096)
        finally:
            os.close(fd)

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * 10 / (time.monotonic() - started)


def measure(clients: int, delay: float, direct_io: bool, same_file: bool) -> tuple[int, int, float, float]:
    with tempfile.TemporaryDirectory() as mountpoint:
        ready_r, ready_w = os.pipe()
        server = subprocess.Popen([sys.executable, __file__, "--serve", mountpoint, str(delay), str(int(direct_io)),
                                   str(ready_w)], pass_fds=(ready_w,), stdout=subprocess.PIPE, text=True)
        os.close(ready_w)
        os.read(ready_r, 1)
        os.close(ready_r)
        try:
            writes = drive(mountpoint, clients, "write", same_file)
            reads = drive(mountpoint, clients, "read", same_file)
        finally:
            subprocess.run(["fusermount3", "-u", mountpoint], check=True)
            out, _ = server.communicate(timeout=30)
        most_writes, most_reads = (int(x) for x in out.split())
        return most_writes, most_reads, writes, reads


def measure_qsd(clients: int, delay: float) -> tuple[float, float]:
    """The same clients on qemu-storage-daemon's FUSE export of a null-co node that takes
    `delay` per request (QEMU's own count of requests in flight is not visible: the rates say it)."""
    with tempfile.TemporaryDirectory() as work:
        export = os.path.join(work, "disk")
        open(export, "w").close()
        qsd = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=null-co,node-name=disk,size={1 << 30},latency-ns={int(delay * 1e9)},read-zeroes=on",
             "--export", f"type=fuse,id=export,node-name=disk,mountpoint={export},writable=on"])
        try:
            deadline = time.monotonic() + 10
            while not os.path.ismount(export):
                if time.monotonic() > deadline or qsd.poll() is not None:
                    raise RuntimeError("qemu-storage-daemon did not export the disk")
                time.sleep(0.05)
            shown = os.path.dirname(export)
            writes = drive(shown, clients, "write", True, name="disk")
            reads = drive(shown, clients, "read", True, name="disk")
        finally:
            qsd.terminate()
            qsd.wait(30)
        return writes, reads


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    args = parser.parse_args()
    delay = args.delay_ms / 1000
    print(f"{args.clients} clients, O_DIRECT 4 KiB, each request held {args.delay_ms:g} ms by the filesystem")
    print("| open | files | writes in flight (most) | reads in flight (most) | writes/s | reads/s |")
    print("|---|---|---|---|---|---|")
    for direct_io in (True, False):
        for same_file in (True, False):
            most_w, most_r, writes, reads = measure(args.clients, delay, direct_io, same_file)
            print(f"| {'direct_io' if direct_io else 'page cache'} | {'one' if same_file else 'one each'} "
                  f"| {most_w} | {most_r} | {writes:.0f} | {reads:.0f} |")
    writes, reads = measure_qsd(args.clients, delay)
    print(f"| qemu-storage-daemon 7.2, FUSE export | one | - | - | {writes:.0f} | {reads:.0f} |")
    one_at_a_time = 1 / delay
    print(f"One request at a time would be {one_at_a_time:.0f}/s; {args.clients} at once {args.clients * one_at_a_time:.0f}/s.")


if __name__ == "__main__":
    main()
