"""Who is on the other end of the socket: the peer's uid from the kernel (``SO_PEERCRED``)."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct


def peer_uid(sock: socket.socket | None) -> int | None:
    """The uid of the process connected to a Unix socket (None for anything else)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def default_allowed_uids(socket_gid: int) -> set[int]:
    """The sidecar's own uid and every user whose primary or secondary group is the socket's."""
    allowed = {os.getuid()}
    try:
        members = set(grp.getgrgid(socket_gid).gr_mem)
    except KeyError:
        members = set()
    for entry in pwd.getpwall():
        if entry.pw_gid == socket_gid or entry.pw_name in members:
            allowed.add(entry.pw_uid)
    return allowed
