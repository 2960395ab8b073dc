"""/proc/mounts, parsed in one place (vfsnap/share/mounts.py), and the coherence warnings for
network shares (issue 16; the GlusterFS warning is shown on a real client mount in
tests/test_gluster_coherence.py)."""

from __future__ import annotations

from pathlib import Path

from vfsnap.share.mounts import coherence_warnings, mount_holding, mount_table, mounted_at

TABLE = """\
/dev/sda1 / ext4 rw,relatime 0 0
nas:/cinder /var/lib/nova/mnt/abc nfs4 rw,vers=4.1,hard,nocto 0 0
nas:/other /srv/with\\040space nfs rw,vers=3 0 0
tmpfs /srv/with\\040space/inner tmpfs rw 0 0
"""


def table(tmp_path: Path):
    path = tmp_path / "mounts"
    path.write_text(TABLE)
    return mount_table(str(path))


def test_mount_table_unescapes_and_finds_the_longest_mount_point(tmp_path):
    entries = table(tmp_path)
    assert [e.point for e in entries] == ["/", "/var/lib/nova/mnt/abc", "/srv/with space", "/srv/with space/inner"]
    assert mount_holding("/srv/with space/inner/vol", entries).kind == "tmpfs"
    assert mount_holding("/srv/with space/x", entries).source == "nas:/other"
    assert mount_holding("/srv/with spacex", entries).point == "/"
    assert mounted_at("/nonexistent/mount/point") is None


def test_nfs_without_close_to_open_consistency_is_warned_about(tmp_path):
    entries = table(tmp_path)
    (warning,) = coherence_warnings("/var/lib/nova/mnt/abc/share", entries)
    assert "nocto" in warning and "without nocto" in warning
    assert coherence_warnings("/srv/with space/x", entries) == []
    assert coherence_warnings("/home", entries) == []
