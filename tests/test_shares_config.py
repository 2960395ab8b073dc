"""Cinder's shares file (`shares_config=FILE`), parsed as cinder's remotefs `_load_shares_config` does."""

from __future__ import annotations

import logging

import pytest

from vfsnap.options import parse_options
from vfsnap.share.remote import (
    ShareEntry,
    ShareMountError,
    load_shares_config,
    mount_point_for,
    mount_shares,
    parse_shares_config,
)


def test_one_share_per_line_with_optional_mount_arguments():
    text = "10.0.0.5:/srv/cinder\nnas.example:/vol_b -o vers=4.1,hard --other\n"
    assert parse_shares_config(text) == [
        ShareEntry("10.0.0.5:/srv/cinder"),
        ShareEntry("nas.example:/vol_b", ("-o", "vers=4.1,hard", "--other")),
    ]


def test_comments_and_blank_lines_are_skipped(caplog):
    text = "# shares for vfsnap\n\n   \n\t\nhost:/a\n#host:/disabled\n"
    with caplog.at_level(logging.WARNING):
        assert parse_shares_config(text) == [ShareEntry("host:/a")]
    assert not caplog.records


def test_invalid_lines_are_warned_about_and_skipped(caplog):
    text = "host:/good\nno-colon-slash\nhost:relative\n:/\n  # indented comment\nhost:/also-good\n"
    with caplog.at_level(logging.WARNING):
        entries = parse_shares_config(text, source="/etc/vfsnap/shares")
    assert entries == [ShareEntry("host:/good"), ShareEntry("host:/also-good")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert all("address:/export" in w and "/etc/vfsnap/shares line" in w for w in warnings)
    assert "line 2" in warnings[0] and "line 5" in warnings[3]


def test_escaped_space_in_share_and_tab_before_options():
    text = "host:/my\\040share\thost:/x -o ro\n"
    # Cinder splits on the first space only; vfsnap also on a tab, so this line is the share
    # "host:/my share" with the arguments "host:/x -o ro" (passed on to mount(8) as they are).
    assert parse_shares_config(text) == [ShareEntry("host:/my share", ("host:/x", "-o", "ro"))]


def test_share_listed_twice_keeps_its_place_and_its_last_options(caplog):
    text = "host:/a -o vers=3\nhost:/b\nhost:/a -o vers=4.2\n"
    with caplog.at_level(logging.WARNING):
        entries = parse_shares_config(text)
    assert entries == [ShareEntry("host:/a", ("-o", "vers=4.2")), ShareEntry("host:/b")]
    assert any("listed again" in r.getMessage() for r in caplog.records)


def test_local_directories_are_a_vfsnap_extension_without_options(caplog):
    text = "/srv/share1\n/srv/share2 -o vers=3\n"
    with caplog.at_level(logging.WARNING):
        assert parse_shares_config(text) == [ShareEntry("/srv/share1")]
    assert "takes no mount options" in caplog.records[0].getMessage()


def test_mount_point_is_md5_of_the_share_under_the_base_as_cinder_names_it(tmp_path):
    # os-brick RemoteFsClient.get_mount_point: os.path.join(base, md5(share).hexdigest());
    # the digest is `printf %s 192.168.1.10:/cinder | md5sum`.
    assert mount_point_for("192.168.1.10:/cinder", str(tmp_path)) == str(tmp_path / "bc7006a135f69ee3fc3b8a71cf913589")


def test_shares_file_of_local_directories_gives_their_paths(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    config = tmp_path / "shares"
    config.write_text(f"# two local shares\n{one}\n{two}\n")
    options = parse_options(f"shares_config={config}")
    assert mount_shares("vfsnap", options) == [str(one), str(two)]


def test_unreadable_or_empty_shares_file_is_a_clear_error(tmp_path):
    with pytest.raises(ShareMountError, match="cannot read shares file"):
        load_shares_config(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ShareMountError, match="lists no valid share"):
        load_shares_config(str(empty))


def test_share_mount_options_given_twice_are_joined_with_commas():
    options = parse_options("share_type=nfs,share_mount_options=vers=4.1,share_mount_options=hard,"
                            "share_mount_options=sec=krb5:krb5i")
    assert options.share_mount_options == "vers=4.1,hard,sec=krb5:krb5i"


def test_nfs_without_kernel_client_is_a_clear_error(tmp_path, monkeypatch):
    from vfsnap.share import remote

    monkeypatch.setattr(remote, "_kernel_has", lambda filesystems: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no modprobe
    monkeypatch.setattr(remote, "SYSTEM_PATH", str(tmp_path))
    options = parse_options(f"mount_base={tmp_path / 'base'}")
    with pytest.raises(ShareMountError, match="cannot mount nfs shares: no nfs or nfs4 in /proc/filesystems"):
        mount_shares("nfs.example:/export", options)
