"""The instance directory is private: created 0700, and one made by another user is refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shoal.runtime.rundir import check_private_dir, private_dir


def test_created_private_and_loosened_ones_tightened(tmp_path: Path) -> None:
    created = private_dir(str(tmp_path / "a" / "inst"))
    assert stat.S_IMODE(os.stat(created).st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    private_dir(str(loose))
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700


def test_symbolic_links_and_files_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(PermissionError, match="not a directory"):
        private_dir(str(link))
    (tmp_path / "file").write_text("x")
    with pytest.raises((PermissionError, FileExistsError)):
        private_dir(str(tmp_path / "file"))


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory of another user needs root")
def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to another user"):
        check_private_dir(str(theirs))
    with pytest.raises(PermissionError):
        private_dir(str(theirs))
