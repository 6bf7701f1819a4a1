"""Atomic writes: the file appears whole, with the permissions open() would have given it."""

from __future__ import annotations

import os
import stat

import pytest

from surprise_monitor.monitor.files import atomic_write_bytes, current_umask


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        path = atomic_write_bytes(tmp_path / "figure.png", b"png")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
        os.chmod(path, 0o640)
        atomic_write_bytes(path, b"new")
        assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_bytes() == b"new"
    finally:
        os.umask(old)
    assert current_umask() == old
