"""fsops: the filesystem idioms, against the hostile neighbour (links, FIFOs, depth, long names)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from caired import fsops


def test_remove_tree_goes_deeper_than_the_recursion_limit_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not ours")
    top = tmp_path / "tree"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    try:
        for i in range(1100):  # shutil.rmtree raises RecursionError on Python 3.11
            if i % 100 == 0:
                os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
            if i == 500:
                os.symlink(outside, "link", dir_fd=fd)
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    with fsops.opened_dir(tmp_path) as parent:
        fsops.remove_tree(parent, "tree")
    assert not top.exists()
    assert (outside / "keep").read_text() == "not ours"


def test_read_regular_refuses_what_is_not_a_regular_file_without_waiting(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to("/dev/zero")
    (tmp_path / "big").write_bytes(b"x" * 11)
    with fsops.opened_dir(tmp_path) as d:
        with pytest.raises(fsops.NotRegular, match="FIFO"):
            fsops.read_regular(d, "fifo", 10)  # a plain open() would block here forever
        with pytest.raises(fsops.NotRegular, match="symbolic link"):
            fsops.read_regular(d, "link", 10)
        with pytest.raises(fsops.TooBig):
            fsops.read_regular(d, "big", 10)
        assert fsops.read_regular(d, "big", 11) == b"x" * 11


def test_candidate_names_fit_the_filesystem_and_stay_utf8() -> None:
    first, second, _ = (name for _, name in zip(range(3), fsops.candidate_names("é" * 127 + "x"), strict=False))
    assert first == "é" * 127 + "x"  # 255 bytes: fits as it is
    assert second == "é" * 126 + ".1"  # cut between characters, never inside one
    assert len(os.fsencode(second)) <= fsops.NAME_MAX
    raw = b"\xff" * 255  # not UTF-8: cut as bytes
    cut = next(n for i, n in enumerate(fsops.candidate_names(os.fsdecode(raw))) if i == 1)
    assert os.fsencode(cut) == raw[:253] + b".1"
