"""`vfsnap mount`: open the shares, mount the tree, serve until unmounted or signalled."""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
from typing import NoReturn

import pyfuse3
import trio

from vfsnap.cli.main import EXIT_MOUNT_FAILED, EXIT_OK, QuietError
from vfsnap.errors import VfsnapError
from vfsnap.fs.operations import VfsnapOperations
from vfsnap.fs.relay import KernelRelay
from vfsnap.options import DEFAULT_FUSE_THREADS, MountOptions, parse_options
from vfsnap.share.mounts import mount_table
from vfsnap.share.pool import Pool

log = logging.getLogger("vfsnap")


def setup_logging(options: MountOptions) -> None:
    level = getattr(logging, options.log_level.upper(), logging.INFO)
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    if options.log_file:
        handler: logging.Handler = logging.FileHandler(options.log_file)
    elif options.foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        fmt = "vfsnap[%(process)d]: %(levelname)s %(name)s: %(message)s"
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    # pyfuse3 logs every failed reply at ERROR; keep its debug chatter out of ours.
    logging.getLogger("pyfuse3").setLevel(max(level, logging.INFO))


def resolve_shares(spec: str, options: MountOptions) -> list[str]:
    """Local directories for the share spec (network shares are mounted by `vfsnap.share.remote`)."""
    if options.shares_config or options.share_type != "local" or (":" in spec and not os.path.isdir(spec)):
        from vfsnap.share.remote import mount_shares

        try:
            return mount_shares(spec, options)
        except VfsnapError as exc:
            raise QuietError(str(exc), EXIT_MOUNT_FAILED) from None
    if not os.path.isdir(spec):
        raise QuietError(f"share {spec} is not a directory", EXIT_MOUNT_FAILED)
    return [os.path.realpath(spec)]


def check_mountpoint(mountpoint: str, shares: list[str]) -> str:
    real = os.path.realpath(mountpoint)
    if not os.path.isdir(real):
        raise QuietError(f"mountpoint {mountpoint} is not a directory", EXIT_MOUNT_FAILED)
    if os.path.ismount(real) and _is_vfsnap_mount(real):
        raise QuietError(f"{mountpoint} is already a vfsnap mount", EXIT_MOUNT_FAILED)
    for share in shares:
        if real == share or real.startswith(share + os.sep) or share.startswith(real + os.sep):
            raise QuietError(f"mountpoint {mountpoint} and share {share} contain each other", EXIT_MOUNT_FAILED)
    return real


def _is_vfsnap_mount(path: str) -> bool:
    return any(entry.point == path and entry.kind == "fuse.vfsnap" for entry in mount_table())


def fuse_options(spec: str, options: MountOptions) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.add(f"fsname={spec}")
    opts.add("subtype=vfsnap")
    opts |= options.fuse_options
    if options.read_only:
        opts.add("ro")
    return opts


def mount(spec: str, mountpoint: str, option_text: str, *, foreground: bool) -> int:
    try:
        options = parse_options(option_text, foreground=foreground)
    except VfsnapError as exc:
        raise QuietError(str(exc), EXIT_MOUNT_FAILED) from None
    setup_logging(options)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    shares = resolve_shares(spec, options)
    real_mountpoint = check_mountpoint(mountpoint, shares)
    try:
        pool = Pool.open(shares, options, recover=False)  # recovered in the background
    except VfsnapError as exc:
        raise QuietError(f"cannot open share: {exc}", EXIT_MOUNT_FAILED) from None
    operations = VfsnapOperations(pool)
    try:
        pyfuse3.init(operations, real_mountpoint, fuse_options(spec, options))
    except RuntimeError as exc:
        pool.close()
        raise QuietError(f"cannot mount {mountpoint}: {exc}", EXIT_MOUNT_FAILED) from None
    log.info("mounted %s on %s (%s)", spec, real_mountpoint, ", ".join(shares))
    ready_fd = None if foreground else _daemonize(real_mountpoint)
    stopped_by_signal = False
    try:
        stopped_by_signal = trio.run(serve, operations, options, real_mountpoint, ready_fd)
    finally:
        operations.destroy()
        # /proc/mounts, not os.path.ismount: a stat of the mount from this thread, with the loop
        # ended but the mount still there, would wait forever for this very process to answer.
        still_mounted = stopped_by_signal or _is_vfsnap_mount(real_mountpoint)
        pyfuse3.close(unmount=still_mounted)
        log.info("unmounted %s", real_mountpoint)
    return EXIT_OK


async def serve(operations: VfsnapOperations, options: MountOptions, mountpoint: str | None = None,
                ready_fd: int | None = None) -> bool:
    """Run the FUSE loop and vfsnap's background tasks; True when vfsnap itself ended the loop
    (a signal, or a mount that never answered), so that the mount is still there.

    With `ready_fd`, the daemonized process reports on it once the mount answers (see `_daemonize`).
    """
    stopped = False

    async def report_ready() -> None:
        nonlocal stopped
        assert mountpoint is not None and ready_fd is not None
        # From a worker thread: a stat from the loop's own thread would wait for itself.
        try:
            await trio.to_thread.run_sync(os.stat, mountpoint)
        except OSError as exc:
            _report(ready_fd, f"{mountpoint} does not answer: {exc.strerror}")
            stopped = True
            pyfuse3.terminate()
            return
        _report(ready_fd, _READY)
        _detach_stdio()

    async def watch_signals(cancel_scope: trio.CancelScope) -> None:
        nonlocal stopped
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("received %s; unmounting", signal.Signals(signum).name)
                stopped = True
                pyfuse3.terminate()
                return

    relay = _start_relay(operations, options)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals, nursery.cancel_scope)
            if ready_fd is not None:
                nursery.start_soon(report_ready)
            background = getattr(operations, "background_tasks", None)
            if background is not None:
                nursery.start_soon(background)
            # Handlers that wait for a share let others run: up to MAX_TASKS requests in flight.
            await pyfuse3.main(min_tasks=MIN_TASKS, max_tasks=MAX_TASKS)
            nursery.cancel_scope.cancel()
    finally:
        if relay is not None:
            relay.stop()  # before the volumes close: no read of them left on a reader thread
    return stopped


def _start_relay(operations: VfsnapOperations, options: MountOptions) -> KernelRelay | None:
    """Reader threads in front of pyfuse3 (vfsnap/fs/relay.py), in the daemon (threads do not
    survive its fork) and before pyfuse3.main reads its first request."""
    threads = options.fuse_threads
    if threads is None:
        # Measured (bench/write_bench.py, local disk): the relay's extra hop for every request
        # it passes on costs writes into the page cache up to half their rate (4 KiB
        # allocating writes 13.1k -> 6.9k IOPS), and reads there gain (4 KiB random reads 14.9k
        # -> 39.9k); on GlusterFS reads gain 1.6-1.8x and writes stay within the share's noise (and
        # gain with several writers: parallel direct writes). So by default only mounts with a
        # share whose I/O goes to threads (a network share) get it.
        threads = DEFAULT_FUSE_THREADS if any(share.io.threaded for share in operations.pool.shares) else 0
    if not threads:
        return None
    token = trio.lowlevel.current_trio_token()
    operations.trio_token = token

    def unmounted() -> None:  # libfuse, reading the relay's socket, cannot see it itself
        try:
            trio.from_thread.run_sync(pyfuse3.terminate, trio_token=token)
        except trio.RunFinishedError:
            pass

    relay = KernelRelay(operations.read_now, operations.write_now, threads=threads, on_unmounted=unmounted)
    return relay if relay.start() else None


_READY = "ready"
# FUSE requests served at once (pyfuse3 tasks on the one thread): enough for every share's
# worker threads to be busy (share_threads, 16 by default) with some shares in one mount.
MAX_TASKS = 128
# Idle request tasks pyfuse3 keeps: with fewer, a task that finished a request exits while the
# next request starts a new one (with 16 requests in flight and 1 kept, about one task was
# started for every two requests: measured on GlusterFS, randread 4 KiB).
MIN_TASKS = 32


def _daemonize(mountpoint: str) -> int:
    """Detach after the mount exists, so mount errors still reached the terminal.

    The calling process exits only when the daemon reports, as borg's `daemonizing()` does: 0 once
    the mount answers (mount(8) and systemd rely on a helper returning only then), the exit code
    of a failed mount otherwise. Returns, in the daemon, the descriptor to report on; the daemon
    keeps stdin/stdout/stderr until it has reported, so a traceback still reaches the terminal.
    """
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child:
        os.close(write_fd)
        os.waitpid(child, 0)
        _wait_for_daemon(read_fd, mountpoint)
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    return write_fd


def _wait_for_daemon(read_fd: int, mountpoint: str) -> NoReturn:
    chunks = []
    while chunk := os.read(read_fd, 4096):
        chunks.append(chunk)
    message = b"".join(chunks).decode(errors="replace")
    if message == _READY:
        os._exit(EXIT_OK)
    if _is_vfsnap_mount(mountpoint):
        # The daemon died without unmounting: leave no dead mount (ENOTCONN) behind.
        subprocess.run(["fusermount3", "-u", "-z", "-q", mountpoint], capture_output=True, check=False)
    print(f"vfsnap: cannot mount {mountpoint}: {message or 'the daemon exited before the mount answered'}",
          file=sys.stderr, flush=True)
    os._exit(EXIT_MOUNT_FAILED)


def _report(ready_fd: int, message: str) -> None:
    try:
        os.write(ready_fd, message.encode())
        os.close(ready_fd)
    except OSError:
        pass  # the waiting parent is gone (killed): nobody to tell


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
