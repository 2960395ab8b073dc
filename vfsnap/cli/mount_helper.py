"""`mount.vfsnap`: the mount(8) helper, so that `mount -t vfsnap` and /etc/fstab lines work.

    mount.vfsnap SPEC DIR [-sfnv] [-o OPTIONS] [-t vfsnap|fuse.vfsnap] [-N NAMESPACE]

mount(8) runs `/sbin/mount.vfsnap` for type `vfsnap` and `/sbin/mount.fuse.vfsnap` for type
`fuse.vfsnap`, with the arguments above (util-linux `exec_helper`). The helper turns them into
`vfsnap mount -o OPTIONS SPEC DIR` and returns only once the mount answers (or has failed):

    -o OPTIONS  vfsnap's mount options; what only means something to mount(8), fstab or systemd
                (`rw`, `defaults`, `auto`, `_netdev`, `nofail`, `user`, `x-*`, ...) is ignored,
                and an unknown option is refused (exit 1)
    -s          sloppy: drop unknown options with a warning instead of refusing them
    -f          fake: check the arguments and options, then exit 0 without mounting
    -n          no mtab: accepted (there is no mtab to write)
    -v          verbose: say what is mounted how
    -t TYPE     vfsnap or fuse.vfsnap
    -N NS       mount in the mount namespace NS (a PID or a namespace file)

Exit codes: 0 mounted (or -f), 1 bad arguments or options, 3 the mount failed.
"""

from __future__ import annotations

import ctypes
import os
import sys

import attrs

from vfsnap import __version__
from vfsnap.cli.main import EXIT_ERROR, EXIT_MOUNT_FAILED, EXIT_OK, QuietError
from vfsnap.errors import VfsnapError
from vfsnap.options import UnknownOption, parse_options

PROG = "mount.vfsnap"
TYPES = ("vfsnap", "fuse.vfsnap")
# mount(8) runs helpers without PATH (util-linux sanitizes the environment); vfsnap runs
# mount(8), fusermount3 and qemu-img itself.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USAGE = f"usage: {PROG} SPEC DIR [-sfnv] [-o OPTIONS] [-t vfsnap|fuse.vfsnap] [-N NAMESPACE]"
CLONE_NEWNS = 0x00020000


class UsageError(Exception):
    pass


@attrs.frozen
class HelperCall:
    """The arguments mount(8) handed over."""

    spec: str
    mountpoint: str
    options: str = ""
    sloppy: bool = False
    fake: bool = False
    no_mtab: bool = False
    verbose: bool = False
    fstype: str | None = None
    namespace: str | None = None


def parse_args(argv: list[str]) -> HelperCall:
    """mount(8)'s helper argv: two positionals, short flags anywhere, `-o` given any number of times."""
    positionals: list[str] = []
    options: list[str] = []
    flags = {"s": False, "f": False, "n": False, "v": False}
    values: dict[str, str] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            positionals += args
            break
        if not arg.startswith("-") or arg == "-":
            positionals.append(arg)
            continue
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            if letter in flags:
                flags[letter] = True
            elif letter in "otN":
                value = letters or (args.pop(0) if args else None)
                if value is None:
                    raise UsageError(f"option -{letter} needs a value")
                if letter == "o":
                    options.append(value)
                else:
                    values[letter] = value
                letters = ""
            else:
                raise UsageError(f"unknown flag -{letter}")
    if len(positionals) != 2:
        raise UsageError("expected SPEC and DIR")
    fstype = values.get("t")
    if fstype is not None and fstype not in TYPES:
        raise UsageError(f"type {fstype!r} is not vfsnap (expected {' or '.join(TYPES)})")
    return HelperCall(
        spec=positionals[0], mountpoint=positionals[1], options=",".join(o for o in options if o),
        sloppy=flags["s"], fake=flags["f"], no_mtab=flags["n"], verbose=flags["v"],
        fstype=fstype, namespace=values.get("N"),
    )


def normalise_options(text: str, *, sloppy: bool) -> str:
    """The option text for `vfsnap mount`: checked here, so a bad option is a usage error (exit 1).

    Sloppy (`-s`) drops unknown options with a warning; a known option with a bad value still fails.
    """
    if sloppy:
        kept = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                parse_options(item)
            except UnknownOption:
                _say(f"ignoring unknown option {item!r} (sloppy mount)")
                continue
            except VfsnapError:
                pass  # reported below with the whole text
            kept.append(item)
        text = ",".join(kept)
    parse_options(text)
    return text


def enter_namespace(namespace: str) -> None:
    """setns(2) into another mount namespace, as mount(8) -N asks (a PID or a namespace file)."""
    path = f"/proc/{namespace}/ns/mnt" if namespace.isdigit() else namespace
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if hasattr(os, "setns"):  # Python 3.12
            os.setns(fd, CLONE_NEWNS)
            return
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return EXIT_OK
    if argv in (["-V"], ["--version"]):
        print(f"{PROG} (vfsnap {__version__})")
        return EXIT_OK
    if not os.environ.get("PATH"):
        os.environ["PATH"] = DEFAULT_PATH
    try:
        call = parse_args(argv)
        options = normalise_options(call.options, sloppy=call.sloppy)
    except UsageError as exc:
        _say(f"{exc}\n{USAGE}")
        return EXIT_ERROR
    except VfsnapError as exc:
        _say(str(exc))
        return EXIT_ERROR
    if call.verbose:
        shown = f" -o {options}" if options else ""
        _say(f"{'would mount' if call.fake else 'mounting'} {call.spec} on {call.mountpoint}: "
             f"vfsnap mount{shown} {call.spec} {call.mountpoint}")
    if call.namespace is not None:
        try:
            enter_namespace(call.namespace)
        except OSError as exc:
            _say(f"cannot enter mount namespace {call.namespace}: {exc.strerror}")
            return EXIT_MOUNT_FAILED
    if call.fake:
        return EXIT_OK
    from vfsnap.cli.mount import mount

    try:
        return mount(call.spec, call.mountpoint, options, foreground=False)
    except QuietError as exc:
        _say(str(exc))
        return exc.exitcode
    except VfsnapError as exc:
        _say(str(exc))
        return EXIT_MOUNT_FAILED


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
