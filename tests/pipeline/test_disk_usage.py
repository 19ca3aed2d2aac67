"""Bytes of a file or a tree: each file once, links not followed."""

import os

from tasks.disk_usage import tree_bytes


def test_tree_bytes_counts_each_file_once(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1" * 100)
    (tmp_path / "a" / "b").mkdir()
    (tmp_path / "a" / "b" / "y").write_bytes(b"2" * 30)
    os.link(tmp_path / "a" / "x", tmp_path / "a" / "b" / "x-again")  # one file, two names
    (tmp_path / "outside").write_bytes(b"3" * 1000)
    (tmp_path / "a" / "link").symlink_to(tmp_path / "outside")  # the link, not its target
    link_size = (tmp_path / "a" / "link").lstat().st_size
    assert tree_bytes(tmp_path / "a") == 100 + 30 + link_size
    assert tree_bytes(tmp_path / "a" / "x") == 100
    assert tree_bytes(tmp_path) == 100 + 30 + 1000 + link_size


def test_a_missing_path_holds_nothing(tmp_path):
    assert tree_bytes(tmp_path / "not-yet") == 0
