"""The tree's node types and the inode table over them (DESIGN.md section 2), below the mount.

The mounted tests (test_mount_basics, test_errno, test_snapshots_*) show the tree as a user sees
it; these pin what the handlers rely on: a node names one object, by kind and name, and keeps
its number until retired.
"""

from __future__ import annotations

import errno

import pyfuse3
import pytest

from vfsnap.fs.inodes import CONTROL, FIRST_DYNAMIC, ROOT, SNAPSHOTS, VOLUMES, InodeTable
from vfsnap.fs.tree import (ControlFile, Directory, LatestLink, RootDir, SnapshotDir, SnapshotFile, SnapshotsDir,
                            VolumeFile, VolumesDir, VolumeSnapshotsDir, belongs_to, parent)

EVERY_KIND = [RootDir(), VolumesDir(), SnapshotsDir(), ControlFile(), VolumeFile("vol"), VolumeSnapshotsDir("vol"),
              SnapshotDir("vol", "snap"), SnapshotFile("vol", "snap"), LatestLink("vol")]


def test_fixed_nodes_have_the_fixed_inode_numbers():
    table = InodeTable()
    assert [table.ino(node) for node in (RootDir(), VolumesDir(), SnapshotsDir(), ControlFile())] == [
        ROOT, VOLUMES, SNAPSHOTS, CONTROL]
    assert table.node(ROOT) == RootDir()


@pytest.mark.parametrize("node", EVERY_KIND, ids=lambda node: type(node).__name__)
def test_every_parent_is_a_directory_on_the_way_to_the_root(node):
    seen = [node]
    while seen[-1] != RootDir():
        seen.append(parent(seen[-1]))
        assert isinstance(seen[-1], Directory)
        assert len(seen) <= 5  # MNT/snapshots/<vol>/<snap>/<vol>, the deepest name, and MNT
    assert parent(RootDir()) == RootDir()


def test_parents_follow_the_tree_of_the_design():
    assert parent(VolumeFile("vol")) == VolumesDir()
    assert parent(VolumeSnapshotsDir("vol")) == SnapshotsDir()
    assert parent(SnapshotDir("vol", "snap")) == VolumeSnapshotsDir("vol")
    assert parent(LatestLink("vol")) == VolumeSnapshotsDir("vol")
    assert parent(SnapshotFile("vol", "snap")) == SnapshotDir("vol", "snap")
    assert parent(ControlFile()) == RootDir()


def test_one_number_per_object_and_different_numbers_for_different_kinds_of_one_name():
    table = InodeTable()
    numbers = [table.ino(node) for node in EVERY_KIND]
    assert len(set(numbers)) == len(EVERY_KIND)
    # Made afresh, an equal node is the same object: same number.
    assert table.ino(SnapshotFile("vol", "snap")) == numbers[EVERY_KIND.index(SnapshotFile("vol", "snap"))]
    assert table.ino(SnapshotDir("vol", "other")) not in numbers


def test_a_retired_node_gets_a_fresh_number_and_the_old_one_lives_while_the_kernel_holds_it():
    table = InodeTable()
    old = table.ino(VolumeFile("vol"))
    table.looked_up(old)
    table.retire(VolumeFile("vol"))
    assert not table.is_current(old)
    assert table.node(old) == VolumeFile("vol")  # the kernel may still ask about it
    new = table.ino(VolumeFile("vol"))
    assert new != old and new >= FIRST_DYNAMIC
    table.forget(old, 1)
    with pytest.raises(pyfuse3.FUSEError) as raised:
        table.node(old)
    assert raised.value.errno == errno.ENOENT


def test_a_renamed_volume_keeps_its_number():
    table = InodeTable()
    ino = table.ino(VolumeFile("a"))
    table.rename(VolumeFile("a"), VolumeFile("b"))
    assert table.known(VolumeFile("a")) is None
    assert table.ino(VolumeFile("b")) == ino and table.node(ino) == VolumeFile("b")


def test_retiring_a_volume_retires_all_its_names_and_no_other_volumes():
    table = InodeTable()
    mine = [VolumeFile("a"), VolumeSnapshotsDir("a"), SnapshotDir("a", "s"), SnapshotFile("a", "s"), LatestLink("a")]
    others = [VolumeFile("a.s"), VolumeSnapshotsDir("b"), SnapshotDir("b", "a"), SnapshotFile("b", "a")]
    for node in mine + others:
        table.ino(node)
    table.retire_where(lambda node: belongs_to(node, "a"))
    assert [table.known(node) for node in mine] == [None] * len(mine)
    assert None not in [table.known(node) for node in others]
    assert table.known(RootDir()) == ROOT
