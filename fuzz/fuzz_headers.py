#!/usr/bin/env python3
"""atheris (libFuzzer) target for vfsnap's qcow2 reader: the same harness as tests/test_fuzz.py.

Each input is the bytes of one qcow2 file. Targets (VFSNAP_FUZZ_TARGET):

- `header` (default): `parse_header` on the input, and the header-rewrite round trip;
- `read`: the input as overlay `vol.s1` over a 1 MiB raw base `vol`, opened as the daemon opens a
  volume's chain and read whole through `View.read` (also covers header parsing);
- `all`: `read` plus the offline check (`vfsnap check`) and, when the input has the dirty bit, the
  refcount rebuild the mount runs (known bugs there: see docs/security.md).

Only vfsnap's own errors (CorruptImage/UnsupportedImage) may come out; anything else, a property
violation (fuzz.harness.Finding) or an input running longer than -timeout is a crash that libFuzzer
saves as crash-*/timeout-* in the working directory.

Setup and run (from the repository root; the corpus is made with qemu-img on first use):

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_headers.py --make-corpus fuzz/corpus
    VFSNAP_FUZZ_TARGET=read .venv/bin/python fuzz/fuzz_headers.py fuzz/corpus \\
        -max_len=262144 -timeout=10 -rss_limit_mb=2048 -max_total_time=600

Replay one saved input: `.venv/bin/python fuzz/fuzz_headers.py crash-<sha1>`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET = os.environ.get("VFSNAP_FUZZ_TARGET", "header")
BASE = bytes(range(256)) * 4096  # the raw base `vol`: 1 MiB


def make_corpus(directory: Path) -> int:
    """Write the top qcow2 file of every seed (and of single-file variants) into `directory`."""
    from fuzz.harness import build_seeds

    directory.mkdir(parents=True, exist_ok=True)
    count = 0
    for seed in build_seeds():
        for name in seed.targets:
            (directory / f"{seed.name}-{name}").write_bytes(seed.files[name])
            count += 1
    return count


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        print(f"wrote {make_corpus(Path(sys.argv[2]))} seed images to {sys.argv[2]}")
        return

    import atheris

    with atheris.instrument_imports(include=["vfsnap"]):
        import vfsnap.chain.backing
        import vfsnap.chain.view
        import vfsnap.format
        import vfsnap.format.check
        import vfsnap.format.compression
        import vfsnap.format.header
        import vfsnap.format.qcow2  # noqa: F401
    from fuzz import harness

    def test_one_input(data: bytes) -> None:
        if TARGET == "header":
            harness.check_header(data)
            return
        full = TARGET == "all"
        harness.exercise({"vol": BASE, "vol.s1": data}, "vol.s1", "qcow2", "raw", check=full, repair=full)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
