"""Placement of new volumes: Cinder's NFS eligibility, then the share with the most available space."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import mount_tmpfs
from vfsnap.errors import NoSpace
from vfsnap.share.placement import ShareUsage, choose_share, ineligibility, provisioned_bytes, share_usage
from vfsnap.share.share import Capacity

GiB = 1 << 30


def usage(name: str, total: float, available: float, provisioned: float = 0) -> ShareUsage:
    """A share of `total` GiB with `available` GiB free and `provisioned` GiB of files."""
    capacity = Capacity(total=int(total * GiB), free=int(available * GiB), available=int(available * GiB),
                        block_size=4096)
    return ShareUsage(path=name, capacity=capacity, provisioned=int(provisioned * GiB))


def test_share_with_most_available_space_wins():
    shares = [usage("a", 100, 40, 60), usage("b", 100, 70, 30), usage("c", 200, 50, 150)]
    assert choose_share(shares, 10 * GiB) == 1


def test_tie_goes_to_the_first_share_in_configuration_order():
    shares = [usage("a", 100, 50, 50), usage("b", 100, 50, 50)]
    assert choose_share(shares, GiB) == 0


def test_volume_must_fit_strictly_in_the_apparent_free_space():
    # Cinder: apparent_available <= requested -> not eligible.
    share = usage("a", 100, 100, 90)
    assert choose_share([share], 9 * GiB) == 0
    with pytest.raises(NoSpace, match="no share can hold a new volume"):
        choose_share([share], 10 * GiB)


def test_sparse_volumes_count_at_their_full_size_without_oversubscription():
    # Nothing written yet (all available), but 100 GiB already provisioned: full at ratio 1.
    share = usage("a", 100, 100, 100)
    reason = ineligibility(share, 1, max_over_subscription_ratio=1.0, reserved_percentage=0)
    assert reason is not None and "max_over_subscription_ratio" in reason
    with pytest.raises(NoSpace):
        choose_share([share], GiB)
    # With a ratio of 2 the same share may hold up to 200 GiB of provisioned volumes.
    assert choose_share([share], 99 * GiB, max_over_subscription_ratio=2.0) == 0
    with pytest.raises(NoSpace):
        choose_share([share], 100 * GiB, max_over_subscription_ratio=2.0)


def test_oversubscription_lets_a_share_with_more_real_space_win_over_a_less_provisioned_one():
    # Cinder's NFS driver would take "b" (least provisioned); vfsnap takes the most available space.
    shares = [usage("a", 100, 90, 150), usage("b", 100, 20, 80)]
    assert ineligibility(shares[0], GiB, max_over_subscription_ratio=1.0, reserved_percentage=0) is not None
    assert choose_share(shares, GiB) == 1
    assert choose_share(shares, GiB, max_over_subscription_ratio=2.0) == 0


def test_reserved_percentage_excludes_a_share_used_beyond_it():
    shares = [usage("a", 100, 15, 10), usage("b", 100, 5, 10)]
    assert choose_share(shares, GiB) == 0
    # 85 % used on "a" and 95 % on "b": with 20 % reserved neither may take more.
    with pytest.raises(NoSpace) as raised:
        choose_share(shares, GiB, reserved_percentage=20)
    message = str(raised.value)
    assert "a: 85% used" in message and "b: 95% used" in message
    assert choose_share(shares, GiB, reserved_percentage=10) == 0


def test_no_space_names_every_share_and_why():
    shares = [usage("/srv/one", 10, 1, 9.5), usage("/srv/two", 0, 0)]
    with pytest.raises(NoSpace) as raised:
        choose_share(shares, GiB)
    assert raised.value.errno == 28  # ENOSPC
    assert "/srv/one:" in str(raised.value) and "/srv/two: no capacity" in str(raised.value)
    with pytest.raises(NoSpace, match="no shares"):
        choose_share([], GiB)


def test_provisioned_bytes_are_apparent_sizes_as_du_counts_them(tmp_path):
    (tmp_path / "vol1").write_bytes(b"x" * 1000)
    with open(tmp_path / "vol2", "wb") as sparse:
        sparse.truncate(5 << 20)
    (tmp_path / ".snapshot").mkdir()  # NetApp's snapshot directory: Cinder leaves it out
    (tmp_path / ".snapshot" / "old").write_bytes(b"y" * 4096)
    du = subprocess.run(["du", "-sb", "--apparent-size", "--exclude", "*snapshot*", str(tmp_path)],
                        capture_output=True, text=True, check=True)
    assert provisioned_bytes(str(tmp_path)) == int(du.stdout.split()[0])


@pytest.fixture
def small_filesystems(tmp_path: Path):
    """Two tmpfs of 8 and 16 MiB (needs root), unmounted at teardown."""
    paths = []
    try:
        for name, size in (("small", "8m"), ("large", "16m")):
            path = tmp_path / name
            path.mkdir()
            mount_tmpfs(path, size)
            paths.append(path)
        yield paths
    finally:
        for path in paths:
            subprocess.run(["umount", str(path)], check=True)


def test_placement_on_real_filesystems_of_different_sizes(small_filesystems):
    small, large = small_filesystems
    MiB = 1 << 20
    (large / "vol-a").write_bytes(os.urandom(6 * MiB))  # large: 10 MiB left, small: 8 MiB
    usages = [share_usage(str(small)), share_usage(str(large))]
    assert choose_share(usages, 4 * MiB) == 1  # most available space
    assert choose_share(usages, 9 * MiB) == 1  # does not fit in 8 MiB
    with pytest.raises(NoSpace):
        choose_share(usages, 11 * MiB)
    # A sparse 100 MiB volume fills the large share's provisioning at ratio 1 without using space.
    with open(large / "vol-b", "wb") as sparse:
        sparse.truncate(100 * MiB)
    usages = [share_usage(str(small)), share_usage(str(large))]
    assert usages[1].capacity.available > usages[0].capacity.available
    assert choose_share(usages, 4 * MiB) == 0
    assert choose_share(usages, 4 * MiB, max_over_subscription_ratio=10.0) == 1


def test_new_volumes_go_to_the_share_with_most_space_through_the_mount(small_filesystems, tmp_path, vfsnap_mount):
    """Two shares in one tree: a new volume lands where placement says, `df` adds them up."""
    small, large = small_filesystems
    config = tmp_path / "shares.conf"
    config.write_text(f"# two local shares\n{small}\n\n{large}\n")
    mnt = vfsnap_mount(f"shares_config={config}", share_path=[small, large], spec="vfsnap-pool")
    fd = os.open(mnt.volume("first"), os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    assert (large / "first").exists() and not (small / "first").exists()
    (large / "filler").write_bytes(os.urandom(12 << 20))  # now small has more room
    fd = os.open(mnt.volume("second"), os.O_CREAT | os.O_WRONLY)
    os.close(fd)
    assert (small / "second").exists()
    assert sorted(os.listdir(mnt.path / "volumes")) == ["filler", "first", "second"]
    ours = os.statvfs(mnt.path)
    theirs = sum(os.statvfs(p).f_blocks * os.statvfs(p).f_frsize for p in (small, large))
    assert abs(ours.f_blocks * ours.f_frsize - theirs) <= 2 * ours.f_frsize
