"""QEMU's tools as the oracle: build chains with qemu-img/qemu-io, and read them back flat."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path


def run(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, **kwargs)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run("qemu-img", *args, check=check)


def qemu_io(image: Path | str, *commands: str, fmt: str = "qcow2", extra: tuple[str, ...] = ()) -> str:
    """Run qemu-io commands on an image; raise if any of them failed."""
    args = ["qemu-io", "-f", fmt, *extra]
    for command in commands:
        args += ["-c", command]
    args.append(str(image))
    result = run(*args)
    # qemu-io reports failed commands on stdout and still exits 0.
    for line in (result.stdout + result.stderr).splitlines():
        if "failed" in line.lower() or "error" in line.lower():
            raise AssertionError(f"qemu-io {commands}: {line}")
    return result.stdout


def create(path: Path | str, size: int | str, *, fmt: str = "qcow2", backing: str | None = None,
           backing_fmt: str | None = None, options: str | None = None) -> None:
    args = ["create", "-q", "-f", fmt]
    if backing is not None:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    if options:
        args += ["-o", options]
    args += [str(path), str(size)]
    qemu_img(*args)


def convert_raw(top: Path | str, out: Path | str, *, fmt: str = "qcow2") -> Path:
    qemu_img("convert", "-f", fmt, "-O", "raw", str(top), str(out))
    return Path(out)


def flat_bytes(top: Path | str, tmp_path: Path, *, fmt: str = "qcow2") -> bytes:
    out = tmp_path / f"oracle-{os.getpid()}-{Path(top).name}.raw"
    convert_raw(top, out, fmt=fmt)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def oracle_sha256(top: Path | str, tmp_path: Path, *, fmt: str = "qcow2") -> str:
    out = tmp_path / f"oracle-{Path(top).name}.raw"
    convert_raw(top, out, fmt=fmt)
    try:
        return sha256_file(out)
    finally:
        out.unlink()


def check(image: Path | str) -> dict:
    """`qemu-img check --output=json`; returns the document (exit status in 'exit')."""
    result = run("qemu-img", "check", "--output=json", str(image), check=False)
    document = json.loads(result.stdout) if result.stdout.strip() else {}
    document["exit"] = result.returncode
    document["stderr"] = result.stderr
    return document


def info(image: Path | str, *, chain: bool = False) -> dict | list:
    args = ["info", "--output=json", "-U"]
    if chain:
        args.append("--backing-chain")
    return json.loads(qemu_img(*args, str(image)).stdout)


def write_info(share: Path, volume: str, active: str, snapshots: dict[str, str]) -> None:
    """Write `<vol>.info` exactly as Cinder does."""
    with open(share / f"{volume}.info", "w") as f:
        json.dump({"active": active, **snapshots}, f, indent=1, sort_keys=True)


def make_chain(share: Path, volume: str, *, size: int, depth: int, base_fmt: str = "raw",
               cluster_size: int | None = None, writes=None, base_options: str | None = None,
               overlay_options: str | None = None) -> list[str]:
    """Build a Cinder chain `vol <- vol.s1 <- ... <- vol.s<depth>` with qemu tools.

    `writes(level, path, fmt)` is called for every image, bottom first, to put data in it.
    Snapshot `s<i>` maps to overlay `vol.s<i>`; the last overlay is active. Returns file names.
    """
    opts = [o for o in (f"cluster_size={cluster_size}" if cluster_size and base_fmt == "qcow2" else None,
                        base_options) if o]
    create(share / volume, size, fmt=base_fmt, options=",".join(opts) or None)
    names = [volume]
    if writes:
        writes(0, share / volume, base_fmt)
    for level in range(1, depth + 1):
        name = f"{volume}.s{level}"
        opts = [o for o in (f"cluster_size={cluster_size}" if cluster_size else None, overlay_options) if o]
        create(share / name, size, backing=names[-1], backing_fmt=base_fmt if level == 1 else "qcow2",
               options=",".join(opts) or None)
        names.append(name)
        if writes:
            writes(level, share / name, "qcow2")
    if depth:
        write_info(share, volume, names[-1], {f"s{i}": names[i] for i in range(1, depth + 1)})
    return names
