"""`vfsnap`: mount a share, and the tools that talk to a running mount.

    vfsnap mount [-f] [-o OPTS] SHARE MOUNTPOINT
    vfsnap status MOUNTPOINT
    vfsnap sync MOUNTPOINT
    vfsnap check SHARE [--repair]
    vfsnap map [--output=human|json] FILE
    vfsnap diff [--from-snap SNAP] [--output=human|json] FILE
    vfsnap clone SOURCE NEWVOL
    vfsnap revert [--destroy-newer] MOUNTPOINT/snapshots/VOL/SNAP

Exit codes: 0 success, 1 usage or runtime error, 2 `check` found problems, 3 mount failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from vfsnap import __version__
from vfsnap.errors import VfsnapError

log = logging.getLogger("vfsnap")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CHECK_FAILED = 2
EXIT_MOUNT_FAILED = 3

CONTROL_FILE = ".vfsnap"
STATUS_XATTR = "user.vfsnap.status"


class QuietError(Exception):
    """A failure to report in one line, without a traceback."""

    def __init__(self, message: str, exitcode: int = EXIT_ERROR):
        super().__init__(message)
        self.exitcode = exitcode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vfsnap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"vfsnap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    mount = sub.add_parser("mount", help="mount a share")
    mount.add_argument("-f", "--foreground", action="store_true", help="do not daemonize; log to stderr")
    mount.add_argument("-o", dest="options", action="append", default=[], help="comma-separated mount options")
    mount.add_argument("share", help="a directory, host:/export (NFS), or host:/volume with -o share_type=glusterfs")
    mount.add_argument("mountpoint")

    status = sub.add_parser("status", help="show volumes, snapshots and running operations")
    status.add_argument("mountpoint")
    status.add_argument("--json", action="store_true", help="print the raw status document")

    sync = sub.add_parser("sync", help="wait until every background merge has finished")
    sync.add_argument("mountpoint")
    sync.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")

    check = sub.add_parser("check", help="verify every volume of a share offline")
    check.add_argument("share")
    check.add_argument("--repair", action="store_true", help="finish interrupted operations and fix leaks")

    from vfsnap.cli import extents

    extents.add_parsers(sub)
    clone = sub.add_parser("clone", help="make a new volume from a snapshot or a volume, at once")
    clone.add_argument("source", help="MOUNTPOINT/snapshots/VOL/SNAP (or its file) or MOUNTPOINT/volumes/VOL")
    clone.add_argument("new", help="the new volume's name (or MOUNTPOINT/volumes/NAME)")

    revert = sub.add_parser("revert", help="make a volume its snapshot's content again, at once")
    revert.add_argument("snapshot", help="MOUNTPOINT/snapshots/VOL/SNAP")
    revert.add_argument("--destroy-newer", action="store_true", help="also delete the snapshots newer than SNAP")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "mount":
            from vfsnap.cli.mount import mount

            return mount(args.share, args.mountpoint, ",".join(args.options), foreground=args.foreground)
        if args.command == "status":
            return _status(args.mountpoint, as_json=args.json)
        if args.command == "sync":
            return _sync(args.mountpoint, args.timeout)
        if args.command == "check":
            from vfsnap.cli.check import check

            return check(args.share, repair=args.repair)
        if args.command in ("map", "diff"):
            from vfsnap.cli import extents

            return extents.run(args)
        if args.command in ("clone", "revert"):
            from vfsnap.cli import clone

            if args.command == "clone":
                return clone.clone(args.source, args.new)
            return clone.revert(args.snapshot, destroy_newer=args.destroy_newer)
    except QuietError as exc:
        print(f"vfsnap: {exc}", file=sys.stderr)
        return exc.exitcode
    except VfsnapError as exc:
        print(f"vfsnap: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_ERROR


def read_status(mountpoint: str) -> dict:
    path = os.path.join(mountpoint, CONTROL_FILE)
    try:
        raw = os.getxattr(path, STATUS_XATTR)
    except FileNotFoundError:
        raise QuietError(f"{mountpoint} is not a vfsnap mount") from None
    except OSError as exc:
        raise QuietError(f"cannot read status of {mountpoint}: {exc.strerror}") from None
    return json.loads(raw)


def _status(mountpoint: str, *, as_json: bool) -> int:
    document = read_status(mountpoint)
    if as_json:
        print(json.dumps(document, indent=1, sort_keys=True))
        return EXIT_OK
    print(f"{'VOLUME':<24} {'SIZE':>12} {'ALLOCATED':>12} {'DEPTH':>5}  SNAPSHOTS")
    for volume in document["volumes"]:
        if "error" in volume:
            print(f"{volume['name']:<24} error: {volume['error']}")
            continue
        print(
            f"{volume['name']:<24} {_human(volume['size']):>12} {_human(volume['allocated']):>12} "
            f"{volume['depth']:>5}  {' '.join(volume['snapshots']) or '-'}"
        )
    hung = [share for share in document.get("shares", []) if not share.get("answering", True)]
    if hung:
        print()
        for share in hung:
            waiting = f" for {share['waiting_seconds']} s ({share.get('waiting_for', '')})" if "waiting_seconds" in share else ""
            print(f"share {share['path']} is not answering{waiting}: its volumes are shown as last seen")
    operations = document.get("operations", [])
    if operations:
        print()
        print("RUNNING OPERATIONS")
        for op in operations:
            done, total = op.get("done", 0), op.get("total", 0)
            percent = f"{100 * done / total:5.1f}%" if total else "  -  "
            print(f"  {op['volume']}: {op['kind']} {op.get('snapshot', '')} {percent} ({op.get('state', '')})")
    return EXIT_OK


def _sync(mountpoint: str, timeout: float | None) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    interval = 0.01  # short merges end soon after they start: look often at first
    while True:
        document = read_status(mountpoint)
        operations = document.get("operations", [])
        failed = [op for op in operations if op.get("state") == "failed"]
        pending = [op for op in operations if op.get("state") != "failed"]
        if document.get("recovering"):  # what a crash left is still being seen to
            pending.append({"volume": "*", "kind": "recovery"})
        if not pending:
            if failed:
                for op in failed:
                    print(f"vfsnap: {op['volume']}: {op['kind']} failed: {op.get('error')}", file=sys.stderr)
                return EXIT_ERROR
            return EXIT_OK
        if deadline is not None and time.monotonic() > deadline:
            raise QuietError(f"{len(pending)} operation(s) still running after {timeout} s")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
