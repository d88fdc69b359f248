"""The instance directory: where the control socket, replica sockets and the secret live.

It must be private to the user running shoal. Under a shared ``/tmp`` another user could
create ``/tmp/shoal-<uid>`` (or an instance directory in it) first, with a secret and a socket
of their own: a client that trusted it would authenticate to their server and unpickle its
replies. So the directory is created ``0700``, and one that exists is used only if it is a
real directory owned by this user (group and other permissions are removed).
"""

from __future__ import annotations

import os
import stat

__all__ = ["check_private_dir", "private_dir"]


def check_private_dir(path: str) -> None:
    """Raise ``PermissionError`` unless ``path`` is a directory (not a symbolic link) owned by
    this user; remove group and other permissions from it."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory (a symbolic link?); shoal will not use it")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user (uid {st.st_uid}); shoal will not use it. "
                              "Remove it, or choose another directory (--address, $SHOAL_RUN_DIR)")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if needed and check it with :func:`check_private_dir`."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_private_dir(path)
    return path
