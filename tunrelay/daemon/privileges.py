"""Dropping root once the relay is set up.

The loops only read and write descriptors that are already open, so after
the device, the sockets and the control socket exist the relay needs no
privilege at all: it switches to the configured user and group, and with
them loses every capability (setuid from root clears the permitted set).
"""

from __future__ import annotations

import logging
import os

from ..errors import TunrelayError

log = logging.getLogger("tunrelay.daemon.privileges")


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become uid/gid for good (supplementary groups cleared).  No-op when
    neither is set or the process already runs as them."""
    if uid is None and gid is None:
        return
    euid = os.geteuid()
    if (uid is None or uid == euid) and (gid is None or gid == os.getegid()):
        return
    if euid != 0:
        raise TunrelayError(f"cannot switch to uid {uid} gid {gid}: not running as root "
                            "(start as root, or leave [security] user/group out)")
    try:
        os.setgroups([])
        if gid is not None:
            os.setresgid(gid, gid, gid)
        if uid is not None:
            os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise TunrelayError(f"cannot switch to uid {uid} gid {gid}: {exc.strerror}") from exc
    if uid not in (None, 0):
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - would mean the kernel ignored setresuid
            raise TunrelayError("dropped privileges could be regained; refusing to run")
    log.info("running as uid %d gid %d from now on", os.getuid(), os.getgid())
