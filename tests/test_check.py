"""`vfsnap check SHARE [--repair]` on deliberately damaged shares (issue 5, DESIGN.md section 4).

Every case runs the real command in a subprocess, with and without `--repair`, and asserts the
exit status (0 clean, 2 problems left, 1 refused), that the report names the volume and the file
and says what is wrong, and what `--repair` did to the share: nothing at all for what cannot be
repaired, and for what can, a share that `vfsnap check` and `qemu-img check` find clean and
whose views `qemu-img convert` shows unchanged (or, for an interrupted operation, as it was
before or after the operation, never in between: invariant 3).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import resource
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.conftest import requires_fuse
from vfsnap.options import MountOptions
from tests.qemu import check as qemu_check
from tests.qemu import convert_raw, create, info, make_chain, qemu_img, qemu_io, write_info

VFSNAP = [sys.executable, "-m", "vfsnap"]
SIZE = 1 << 20
CLUSTER = 65536
TEMP_PREFIX = ".vfsnap-tmp-"


# -- helpers (also used by tests/test_faults.py) ------------------------------------------------------


def run_vfsnap(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*VFSNAP, *args], check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parent.parent)


def run_check(share: Path | str, *, repair: bool = False) -> subprocess.CompletedProcess:
    result = run_vfsnap("check", str(share), *(["--repair"] if repair else []))
    assert "Traceback" not in result.stderr, result.stderr
    return result


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def problem_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("problem:")]


def repaired_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("repaired:")]


def assert_reported(result: subprocess.CompletedProcess, *words: str) -> None:
    """Some problem line names every one of `words` (the volume, the file, the problem)."""
    lines = problem_lines(result)
    assert any(all(word in line for word in words) for line in lines), \
        f"no problem line names all of {words}:\n{output(result)}"


def file_states(share: Path) -> dict[str, tuple[int, int, str]]:
    """name -> (mtime_ns, size, sha256) of every file of the share (hidden ones too)."""
    states = {}
    for path in sorted(share.iterdir()):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
        states[path.name] = (st.st_mtime_ns, st.st_size, digest)
    return states


def read_info(share: Path, volume: str) -> dict:
    path = share / f"{volume}.info"
    return json.loads(path.read_text()) if path.exists() else {"active": volume}


def read_sidecar(share: Path, volume: str) -> dict:
    return json.loads((share / f"{volume}.vfsnap.json").read_text())


def write_sidecar(share: Path, volume: str, *, base_format: str = "raw", created: dict | None = None,
                  journal: list | None = None) -> None:
    document = {"version": 1, "format": base_format,
                "snapshots": {snap: {"created": t} for snap, t in (created or {}).items()}}
    if journal:
        document["journal"] = journal
    (share / f"{volume}.vfsnap.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def image_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def qemu_views(share: Path, volume: str, work: Path) -> dict[str, str]:
    """view -> sha256 of `qemu-img convert -O raw` of its chain, read from the share's files:
    "live" is the chain ending at the active image, snapshot `s` the chain below its overlay."""
    document = read_info(share, volume)
    active = document.pop("active")
    work.mkdir(parents=True, exist_ok=True)

    def digest(top: str, fmt: str) -> str:
        out = work / f"view-{os.getpid()}.raw"
        convert_raw(share / top, out, fmt=fmt)
        try:
            return hashlib.sha256(out.read_bytes()).hexdigest()
        finally:
            out.unlink()

    views = {"live": digest(active, image_format(share / active))}
    for snapshot, overlay in document.items():
        meta = info(share / overlay)
        backing = meta["backing-filename"]
        views[snapshot] = digest(backing, meta.get("backing-filename-format") or image_format(share / backing))
    return views


def qcow2_files(share: Path) -> list[Path]:
    return [p for p in sorted(share.iterdir()) if p.is_file() and not p.name.startswith(".")
            and not p.name.endswith((".info", ".json")) and image_format(p) == "qcow2"]


def assert_qemu_clean(share: Path) -> None:
    for path in qcow2_files(share):
        result = qemu_check(path)
        assert result["exit"] == 0, (path.name, result)


def pattern_writes(level: int, path: Path, fmt: str) -> None:
    """Distinct data in every image of a chain: each level overwrites some clusters of the one
    below and adds its own, so every view of the chain is different."""
    commands = [f"write -P {0x10 * level + i + 1} {(3 * i + level) * CLUSTER} {CLUSTER}" for i in range(4)]
    commands.append(f"write -P {0xA0 + level} {level * 4096 + 512} 3000")  # partial cluster
    qemu_io(path, *commands, fmt=fmt)


def standard_share(share: Path, *, depth: int = 2, meet: bool = True) -> list[str]:
    """vol (raw) <- vol.s1 <- vol.s2 (active), and a second volume `other` (qcow2 base, no
    snapshots). With `meet`, vfsnap's sidecars exist as a mount would have left them."""
    names = make_chain(share, "vol", size=SIZE, depth=depth, writes=pattern_writes)
    create(share / "other", SIZE, fmt="qcow2")
    qemu_io(share / "other", f"write -P 0x77 {CLUSTER} {2 * CLUSTER}")
    if meet:
        write_sidecar(share, "vol", created={f"s{i}": 1.0e9 + i for i in range(1, depth + 1)})
        write_sidecar(share, "other", base_format="qcow2")
    return names


def no_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def qemu_io_abort(image: Path, *commands: str) -> None:
    """qemu-io commands, then `abort`: the process dies without flushing (QCOW2-NOTES 1.6)."""
    args = ["qemu-io", "-f", "qcow2"]
    for command in (*commands, "abort"):
        args += ["-c", command]
    args.append(str(image))
    result = subprocess.run(args, check=False, capture_output=True, text=True, preexec_fn=no_core_dumps,
                            cwd=image.parent)
    assert result.returncode != 0, "qemu-io abort did not abort"


def header_fields(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(104)
    (l1_offset,) = struct.unpack_from(">Q", head, 40)
    (reftable_offset,) = struct.unpack_from(">Q", head, 48)
    (cluster_bits,) = struct.unpack_from(">I", head, 20)
    (refcount_order,) = struct.unpack_from(">I", head, 96)
    return {"l1": l1_offset, "reftable": reftable_offset, "cluster_bits": cluster_bits,
            "refcount_order": refcount_order}


def bump_refcount(path: Path, cluster: int, delta: int) -> None:
    """Change the stored refcount of `cluster` by `delta` (16-bit refcounts, first block only)."""
    h = header_fields(path)
    assert h["refcount_order"] == 4
    with open(path, "r+b") as f:
        f.seek(h["reftable"])
        (block,) = struct.unpack(">Q", f.read(8))
        block &= 0x00FFFFFFFFFFFE00
        f.seek(block + 2 * cluster)
        (value,) = struct.unpack(">H", f.read(2))
        f.seek(block + 2 * cluster)
        f.write(struct.pack(">H", value + delta))


def first_data_cluster(path: Path) -> int:
    """Host cluster index of the first allocated data cluster of a qcow2 image (via qemu-img map)."""
    result = qemu_img("map", "--output=json", str(path))
    for extent in json.loads(result.stdout):
        if extent.get("depth") == 0 and extent.get("data") and "offset" in extent:
            return extent["offset"] >> 16
    raise AssertionError(f"{path.name} has no data cluster")


# -- a clean share ------------------------------------------------------------------------------------


@pytest.mark.parametrize("repair", [False, True], ids=["check", "repair"])
def test_clean_share_is_reported_clean_and_nothing_is_written(share: Path, repair: bool):
    standard_share(share)
    before = file_states(share)
    result = run_check(share, repair=repair)
    assert result.returncode == 0, output(result)
    assert "clean" in result.stdout
    assert not problem_lines(result) and not repaired_lines(result), output(result)
    assert file_states(share) == before


def test_check_of_a_share_vfsnap_never_met_writes_nothing(share: Path):
    """Without --repair the check is read-only, even where vfsnap has no record of a volume yet."""
    standard_share(share, meet=False)
    before = file_states(share)
    result = run_check(share)
    assert result.returncode == 0, output(result)
    assert file_states(share) == before


def test_repair_of_a_share_vfsnap_never_met_changes_no_existing_file(share: Path, tmp_path: Path):
    """--repair may record what it meets (the sidecar, DESIGN.md invariant 4), nothing else."""
    standard_share(share, meet=False)
    before = file_states(share)
    views = qemu_views(share, "vol", tmp_path / "work")
    result = run_check(share, repair=True)
    assert result.returncode == 0, output(result)
    after = file_states(share)
    assert {name: after[name] for name in before} == before
    assert set(after) - set(before) <= {"vol.vfsnap.json", "other.vfsnap.json"}
    assert qemu_views(share, "vol", tmp_path / "work") == views
    assert run_check(share).returncode == 0


# -- what cannot be repaired ----------------------------------------------------------------------------


def _truncate_in_l2_table(path: Path) -> int:
    return header_fields(path)["l1"] + CLUSTER + 1000  # the L2 table (after the L1 cluster) cut short


def _truncate_before_last_data_cluster(path: Path) -> int:
    # The last cluster of a qemu-img written overlay is data: cut it off whole. qemu-img check
    # says "ERROR: counting reference for region exceeding the end of the file" (exit 2), and the
    # guest data in it is gone.
    return os.path.getsize(path) - CLUSTER


def _truncate_to_half_a_header(path: Path) -> int:
    return 50


TRUNCATIONS = {
    "in-l2-table": _truncate_in_l2_table,
    "data-cluster-cut-off": _truncate_before_last_data_cluster,
    "header": _truncate_to_half_a_header,
}


@pytest.mark.parametrize("where", list(TRUNCATIONS))
@pytest.mark.parametrize("overlay", ["vol.s1", "vol.s2"])
def test_truncated_overlay_is_reported_and_left_alone(share: Path, where: str, overlay: str):
    standard_share(share)
    path = share / overlay
    with open(path, "r+b") as f:
        f.truncate(TRUNCATIONS[where](path))
    assert qemu_check(path)["exit"] != 0  # QEMU's oracle agrees the image is damaged
    before = file_states(share)
    result = run_check(share)
    assert result.returncode == 2, output(result)
    assert_reported(result, "vol", overlay)
    assert file_states(share) == before
    result = run_check(share, repair=True)
    assert result.returncode == 2, output(result)
    assert_reported(result, "vol", overlay)
    assert file_states(share)[overlay] == before[overlay], "--repair touched an unrepairable image"
    assert {n: s for n, s in file_states(share).items() if n.startswith("vol")} == \
        {n: s for n, s in before.items() if n.startswith("vol")}


@pytest.mark.parametrize("missing", ["snapshot-overlay", "active", "deleted-overlay"])
@pytest.mark.parametrize("repair", [False, True], ids=["check", "repair"])
def test_info_naming_a_missing_file_is_reported_and_not_repaired(share: Path, missing: str, repair: bool):
    standard_share(share)
    document = read_info(share, "vol")
    if missing == "snapshot-overlay":
        document["s9"] = "vol.s9"
        gone = "vol.s9"
    elif missing == "active":
        document["active"] = gone = "vol.s9"
    else:
        gone = "vol.s1"
        (share / gone).unlink()
    (share / "vol.info").write_text(json.dumps(document, indent=1, sort_keys=True))
    before = file_states(share)
    result = run_check(share, repair=repair)
    assert result.returncode == 2, output(result)
    assert_reported(result, "vol", gone, "does not exist")
    assert file_states(share) == before
    assert not repaired_lines(result)


def test_unparsable_info_is_reported_and_left_alone(share: Path):
    standard_share(share)
    (share / "vol.info").write_text('{"active": "vol.s2", "s1": ')
    before = file_states(share)
    for repair in (False, True):
        result = run_check(share, repair=repair)
        assert result.returncode == 2, output(result)
        assert_reported(result, "vol.info")
        assert file_states(share) == before


def test_info_and_sidecar_of_a_missing_volume_are_reported(share: Path):
    standard_share(share)
    write_info(share, "gone", "gone.s1", {"s1": "gone.s1"})
    write_sidecar(share, "gone")
    before = file_states(share)
    result = run_check(share)
    assert result.returncode == 2, output(result)
    assert_reported(result, "gone.info", "no volume")
    assert_reported(result, "gone.vfsnap.json", "no volume")
    assert file_states(share) == before
    result = run_check(share, repair=True)
    assert result.returncode == 2, output(result)  # Cinder's gone.info is not vfsnap's to remove
    assert_reported(result, "gone.info", "no volume")
    after = file_states(share)
    assert after["gone.info"] == before["gone.info"]
    assert {n: s for n, s in after.items() if not n.startswith("gone")} == \
        {n: s for n, s in before.items() if not n.startswith("gone")}


def test_sidecar_of_an_overlay_is_reported(share: Path):
    """Left, e.g., by a rename that failed in a running mount (tests/test_faults.py)."""
    standard_share(share)
    write_sidecar(share, "vol.s1", base_format="qcow2")  # vfsnap took vol.s1 for a volume once
    before = file_states(share)
    result = run_check(share)
    assert result.returncode == 2, output(result)
    assert_reported(result, "vol.s1.vfsnap.json")
    assert file_states(share) == before


def test_over_deep_chain_is_reported_without_crashing(share: Path):
    depth = MountOptions().max_chain_depth + 2  # just past the default limit
    create(share / "vol", SIZE, fmt="raw")
    names = ["vol"] + [f"vol.d{level:04d}" for level in range(1, depth + 1)]
    create(share / names[1], SIZE, backing="vol", backing_fmt="raw")
    # One qemu-img overlay, copied with the (same length) backing name patched: fast.
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "vol.d0000", "-F", "qcow2", str(share / "template"), str(SIZE))
    image = (share / "template").read_bytes()
    (share / "template").unlink()
    for level in range(2, depth + 1):
        (share / names[level]).write_bytes(image.replace(b"vol.d0000", names[level - 1].encode(), 1))
    assert info(share / names[-1])["backing-filename"] == names[-2]
    write_info(share, "vol", names[-1], {f"d{i}": names[i] for i in range(1, depth + 1)})
    write_sidecar(share, "vol")
    before = file_states(share)
    for repair in (False, True):
        result = run_check(share, repair=repair)
        assert result.returncode == 2, output(result)
        assert_reported(result, "vol", "deeper")
        assert file_states(share) == before


# -- refcount problems: repairable -----------------------------------------------------------------------


def _leak_by_abort(share: Path) -> str:
    """QEMU's own crash: lazy refcounts, writes, abort -> dirty bit and refcount errors."""
    create(share / "vol", SIZE, fmt="raw")
    qemu_io(share / "vol", f"write -P 0x11 0 {SIZE}", fmt="raw")
    create(share / "vol.s1", SIZE, backing="vol", backing_fmt="raw", options="lazy_refcounts=on")
    write_info(share, "vol", "vol.s1", {"s1": "vol.s1"})
    write_sidecar(share, "vol", created={"s1": 1.0e9})
    qemu_io_abort(share / "vol.s1", f"write -P 0x22 {CLUSTER} {2 * CLUSTER}", "write -P 0x33 300000 5000")
    return "vol.s1"


def _leak_by_refcount_increment(share: Path) -> str:
    """A refcount one too high: a leaked cluster (qemu-img check exit 3)."""
    standard_share(share)
    path = share / "vol.s2"
    bump_refcount(path, header_fields(path)["l1"] >> 16, +1)
    return "vol.s2"


def _refcount_too_low(share: Path) -> str:
    """A data cluster counted 0 while referenced: a corruption (exit 2) a rebuild fixes."""
    standard_share(share)
    path = share / "vol.s1"
    bump_refcount(path, first_data_cluster(path), -1)
    return "vol.s1"


def _leak_in_qcow2_base(share: Path) -> str:
    standard_share(share)
    path = share / "other"
    bump_refcount(path, 0, +2)  # the header cluster
    return "other"


REFCOUNT_DAMAGE = {  # how to damage, and a word the report must use
    "lazy-refcounts-abort": (_leak_by_abort, "refcount"),
    "refcount-incremented": (_leak_by_refcount_increment, "leak"),
    "refcount-decremented": (_refcount_too_low, "refcount"),
    "qcow2-base-leak": (_leak_in_qcow2_base, "leak"),
}


@pytest.mark.parametrize("damage", list(REFCOUNT_DAMAGE))
def test_refcount_errors_are_reported_then_repaired_without_changing_data(share: Path, tmp_path: Path,
                                                                          damage: str):
    damage_share, word = REFCOUNT_DAMAGE[damage]
    image = damage_share(share)
    volume = image.split(".")[0]
    assert qemu_check(share / image)["exit"] in (2, 3)
    original = tmp_path / "original"
    shutil.copytree(share, original)  # with the backing files, for qemu-img compare
    before = file_states(share)

    result = run_check(share)
    assert result.returncode == 2, output(result)
    assert_reported(result, volume, image, word)
    assert file_states(share) == before

    result = run_check(share, repair=True)
    assert result.returncode == 0, output(result)
    assert any(image in line and "refcount" in line for line in repaired_lines(result)), output(result)
    again = run_check(share)
    assert again.returncode == 0, output(again)
    assert_qemu_clean(share)
    compared = qemu_img("compare", str(original / image), str(share / image), check=False)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    for name, state in before.items():
        if name != image:
            assert file_states(share)[name] == state, f"--repair changed {name}"


# -- interrupted operations (the journal) ----------------------------------------------------------------


def test_uncommitted_snapshot_is_reported_then_rolled_back(share: Path, tmp_path: Path):
    standard_share(share)
    views = qemu_views(share, "vol", tmp_path / "work")
    # mkdir snapshots/vol/new crashed after creating the overlay, before `.info` named it.
    create(share / "vol.new", SIZE, backing="vol.s2", backing_fmt="qcow2")
    entry = {"op": "snapshot", "snapshot": "new", "overlay": "vol.new", "backing": "vol.s2"}
    write_sidecar(share, "vol", created={"s1": 1.0e9, "s2": 1.0e9 + 1}, journal=[entry])
    before = file_states(share)

    result = run_check(share)
    assert result.returncode == 2, output(result)
    assert_reported(result, "vol", "snapshot", "new")
    assert not any("vol.new" in line and "no volume" in line for line in problem_lines(result))
    assert file_states(share) == before

    result = run_check(share, repair=True)
    assert result.returncode == 0, output(result)
    assert any("new" in line and "rolled back" in line for line in repaired_lines(result)), output(result)
    assert not (share / "vol.new").exists()
    assert "journal" not in read_sidecar(share, "vol")
    assert "new" not in read_info(share, "vol")
    assert qemu_views(share, "vol", tmp_path / "work") == views
    assert run_check(share).returncode == 0
    assert_qemu_clean(share)


def test_committed_snapshot_with_journal_left_is_reported_then_finished(share: Path, tmp_path: Path):
    standard_share(share)
    views = qemu_views(share, "vol", tmp_path / "work")
    # mkdir crashed after the commit (`.info` names the overlay), before the journal was cleared.
    create(share / "vol.new", SIZE, backing="vol.s2", backing_fmt="qcow2")
    document = read_info(share, "vol")
    document.update(active="vol.new", new="vol.new")
    (share / "vol.info").write_text(json.dumps(document, indent=1, sort_keys=True))
    entry = {"op": "snapshot", "snapshot": "new", "overlay": "vol.new", "backing": "vol.s2"}
    write_sidecar(share, "vol", created={"s1": 1.0e9, "s2": 1.0e9 + 1}, journal=[entry])
    before = file_states(share)

    result = run_check(share)
    assert result.returncode == 2, output(result)
    assert_reported(result, "vol", "snapshot", "new")
    assert file_states(share) == before

    result = run_check(share, repair=True)
    assert result.returncode == 0, output(result)
    assert any("new" in line and "finished" in line for line in repaired_lines(result)), output(result)
    sidecar = read_sidecar(share, "vol")
    assert "journal" not in sidecar
    assert "new" in sidecar["snapshots"]
    assert read_info(share, "vol")["new"] == "vol.new"
    after = qemu_views(share, "vol", tmp_path / "work")
    # The snapshot holds the volume as it was; the live volume is unchanged by taking it.
    assert after == {**views, "new": views["live"]}
    assert run_check(share).returncode == 0
    assert_qemu_clean(share)


@pytest.mark.parametrize("victim", ["s1", "s2"], ids=["oldest", "newest"])
def test_pending_deletion_is_reported_then_merged_keeping_other_views(share: Path, tmp_path: Path, victim: str):
    standard_share(share)
    views = qemu_views(share, "vol", tmp_path / "work")
    other_views = qemu_views(share, "other", tmp_path / "work")
    # rmdir returned (the journal entry hides the snapshot); the merge never ran.
    entry = {"op": "delete", "snapshot": victim, "overlay": f"vol.{victim}"}
    write_sidecar(share, "vol", created={"s1": 1.0e9, "s2": 1.0e9 + 1}, journal=[entry])
    before = file_states(share)

    result = run_check(share)
    assert result.returncode == 2, output(result)
    assert_reported(result, "vol", "delete", victim)
    assert file_states(share) == before

    result = run_check(share, repair=True)
    assert result.returncode == 0, output(result)
    assert not (share / f"vol.{victim}").exists()
    assert victim not in read_info(share, "vol")
    sidecar = read_sidecar(share, "vol")
    assert "journal" not in sidecar and victim not in sidecar["snapshots"]
    expected = {view: digest for view, digest in views.items() if view != victim}
    assert qemu_views(share, "vol", tmp_path / "work") == expected
    assert qemu_views(share, "other", tmp_path / "work") == other_views
    assert run_check(share).returncode == 0
    assert_qemu_clean(share)
    qemu_img("info", "--backing-chain", str(share / read_info(share, "vol")["active"]))


# -- an interrupted rename --------------------------------------------------------------------------------


def _rename_in_child(share: Path, at: int, counter) -> int:
    """Rename volume vol to renamed in a forked child (the daemon's code path) that is
    SIGKILLed right after its `at`-th operation on the share; `at`=0 only counts."""
    from tests.faults import FaultPlan
    from vfsnap.options import MountOptions
    from vfsnap.share.rename import rename_volume
    from vfsnap.share.share import Share

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            plan = FaultPlan("crash", at, counter=counter) if at else FaultPlan("count", counter=counter)
            plan.install()
            opened = Share(str(share), MountOptions(metadata_flush_interval=0))
            trio.run(rename_volume, opened, "vol", "renamed")
            opened.close()
        except BaseException:  # noqa: BLE001 - reported through the exit status
            import traceback

            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def _rename_points() -> list[str]:
    return ["early", "quarter", "middle", "three-quarters", "late"]


@pytest.fixture(scope="module")
def rename_template(tmp_path_factory) -> tuple[Path, int, dict]:
    template = tmp_path_factory.mktemp("rename") / "template"
    template.mkdir()
    standard_share(template)
    views = qemu_views(template, "vol", template.parent / "work")
    counting = template.parent / "count"
    shutil.copytree(template, counting)
    counter = mmap.mmap(-1, 64)
    status = _rename_in_child(counting, 0, counter)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    total = int.from_bytes(counter[:8], "little")
    assert sorted(os.listdir(counting)) == ["other", "other.vfsnap.json", "renamed", "renamed.info",
                                            "renamed.s1", "renamed.s2", "renamed.vfsnap.json"]
    return template, total, views


def _journalled_rename(share: Path) -> bool:
    """A rename plan is journalled in a hidden file of its own (vfsnap/share/rename.py)."""
    return any(share.glob(".vfsnap-rename-*"))


@pytest.mark.parametrize("point", _rename_points())
def test_interrupted_rename_is_reported_then_finished(rename_template, tmp_path: Path, point: str):
    template, total, views = rename_template
    # The journal entry is durable after the first atomic write (4 operations); the last one
    # (4 more) removes it. Spread the crash points over what lies in between.
    first, last = 5, total - 4
    at = {"early": first, "quarter": first + (last - first) // 4, "middle": (first + last) // 2,
          "three-quarters": first + 3 * (last - first) // 4, "late": last}[point]
    share = tmp_path / "share"
    shutil.copytree(template, share)
    status = _rename_in_child(share, at, mmap.mmap(-1, 64))
    assert os.WIFSIGNALED(status), f"the rename finished before operation {at} of {total}"
    assert _journalled_rename(share), f"no rename journal after operation {at}"
    before = file_states(share)

    result = run_check(share)
    assert result.returncode == 2, output(result)
    assert_reported(result, "rename", "vol", "renamed")
    assert file_states(share) == before

    result = run_check(share, repair=True)
    assert result.returncode == 0, output(result)
    assert any("renam" in line for line in repaired_lines(result)), output(result)
    assert not _journalled_rename(share)
    names = sorted(os.listdir(share))
    assert names == ["other", "other.vfsnap.json", "renamed", "renamed.info", "renamed.s1", "renamed.s2",
                     "renamed.vfsnap.json"], names
    assert qemu_views(share, "renamed", tmp_path / "work") == views
    assert run_check(share).returncode == 0
    assert_qemu_clean(share)


@pytest.mark.parametrize("at", [1, 2])
def test_rename_crashed_before_its_journal_leaves_a_temp_file_that_repair_removes(rename_template, tmp_path: Path,
                                                                                   at: int):
    template, _total, views = rename_template
    share = tmp_path / "share"
    shutil.copytree(template, share)
    status = _rename_in_child(share, at, mmap.mmap(-1, 64))
    assert os.WIFSIGNALED(status)
    temps = [n for n in os.listdir(share) if n.startswith(TEMP_PREFIX)]
    assert temps and not _journalled_rename(share)
    result = run_check(share)
    assert result.returncode == 2, output(result)
    assert_reported(result, temps[0])
    result = run_check(share, repair=True)
    assert result.returncode == 0, output(result)
    assert not [n for n in os.listdir(share) if n.startswith(TEMP_PREFIX)]
    assert qemu_views(share, "vol", tmp_path / "work") == views  # the rename never happened


# -- temporary files ---------------------------------------------------------------------------------------


def test_stale_temp_files_are_reported_then_removed(share: Path, tmp_path: Path):
    standard_share(share)
    views = qemu_views(share, "vol", tmp_path / "work")
    stale = [TEMP_PREFIX + "0123456789abcdef", TEMP_PREFIX + "fedcba9876543210"]
    (share / stale[0]).write_text('{"active": "vol.s2"}')
    (share / stale[1]).write_bytes(b"")
    before = file_states(share)
    result = run_check(share)
    assert result.returncode == 2, output(result)
    for name in stale:
        assert_reported(result, name, "temporary")
    assert file_states(share) == before
    result = run_check(share, repair=True)
    assert result.returncode == 0, output(result)
    assert not any((share / name).exists() for name in stale)
    after = file_states(share)
    assert after == {n: s for n, s in before.items() if n not in stale}
    assert qemu_views(share, "vol", tmp_path / "work") == views
    assert run_check(share).returncode == 0


# -- a mounted share ------------------------------------------------------------------------------------------


@requires_fuse
def test_repair_of_a_mounted_share_is_refused(share: Path, vfsnap_mount, tmp_path: Path):
    standard_share(share)
    (share / (TEMP_PREFIX + "0123456789abcdef")).write_bytes(b"x")  # mount removes it; recreate below
    mnt = vfsnap_mount()
    os.listdir(mnt.snapshot_dir("vol"))
    (share / (TEMP_PREFIX + "0123456789abcdef")).write_bytes(b"x")  # something --repair would remove
    before = file_states(share)
    for spelling in (str(share), str(share) + "/", str(share / ".." / share.name)):
        result = run_check(spelling, repair=True)
        assert result.returncode == 1, output(result)
        assert "mounted" in result.stderr, output(result)
        assert file_states(share) == before
    link = tmp_path / "link-to-share"
    link.symlink_to(share)
    result = run_check(link, repair=True)
    assert result.returncode == 1, output(result)
    assert file_states(share) == before
    assert mnt.volume("vol").stat().st_size == SIZE  # the mount still works


# -- chains vfsnap must refuse (invariant 5) ---------------------------------------------------------------------


def _rebase_unsafe(path: Path, backing: str, fmt: str = "qcow2") -> None:
    qemu_img("rebase", "-u", "-b", backing, "-F", fmt, str(path))


def _loop_of_two(share: Path) -> str:
    _rebase_unsafe(share / "vol.s1", "vol.s2")
    return "loop"


def _loop_to_itself(share: Path) -> str:
    # qemu-img refuses to create this, but a header can say it.
    with open(share / "vol.s2", "r+b") as f:
        head = f.read(4096)
        (offset,) = struct.unpack_from(">Q", head, 8)
        (length,) = struct.unpack_from(">I", head, 16)
        assert head[offset:offset + length] == b"vol.s1"
        f.seek(offset)
        f.write(b"vol.s2")
    return "loop"


def _absolute_backing(share: Path) -> str:
    _rebase_unsafe(share / "vol.s1", str(share / "vol"), "raw")
    return "vol.s1"


def _dotdot_backing(share: Path) -> str:
    shutil.copy(share / "vol", share.parent / "outside")
    _rebase_unsafe(share / "vol.s1", "../outside", "raw")
    return "vol.s1"


def _other_volumes_file(share: Path) -> str:
    _rebase_unsafe(share / "vol.s1", "other", "qcow2")
    return "vol.s1"


def _symlink_out_of_the_share(share: Path) -> str:
    shutil.copy(share / "vol.s1", share.parent / "outside.qcow2")
    _rebase_unsafe(share.parent / "outside.qcow2", str(share / "vol"), "raw")
    (share / "vol.s1").unlink()
    (share / "vol.s1").symlink_to(share.parent / "outside.qcow2")
    return "vol.s1"


BAD_CHAINS = {
    "loop-of-two": _loop_of_two,
    "loop-to-itself": _loop_to_itself,
    "absolute-backing-path": _absolute_backing,
    "dotdot-backing": _dotdot_backing,
    "another-volumes-file": _other_volumes_file,
    "symlink-out-of-the-share": _symlink_out_of_the_share,
}


@pytest.mark.parametrize("bad", list(BAD_CHAINS))
@pytest.mark.parametrize("repair", [False, True], ids=["check", "repair"])
def test_refused_chains_are_reported_without_crashing(share: Path, bad: str, repair: bool):
    standard_share(share)
    word = BAD_CHAINS[bad](share)
    before = file_states(share)
    result = run_check(share, repair=repair)
    assert result.returncode == 2, output(result)
    assert_reported(result, "vol", word)
    assert file_states(share) == before
    assert not repaired_lines(result)
