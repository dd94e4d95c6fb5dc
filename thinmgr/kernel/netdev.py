"""Network interface flags through the socket ioctls (no netlink, no `ip`).

A new network namespace has only ``lo``, and it is down; the launcher brings it up so that
127.0.0.1 works in a container with ``--net none`` (as runc and docker do).
"""

from __future__ import annotations

import fcntl
import socket
import struct

from thinmgr.kernel.errno_map import kernel_error

# linux/sockios.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
# linux/if.h: enum net_device_flags
IFF_UP = 0x1
IFNAMSIZ = 16

# struct ifreq: char ifr_name[IFNAMSIZ]; union { short ifr_flags; ... } (the union is 24 bytes
# on 64-bit, the size of struct ifmap), 40 bytes in all.
_IFREQ_FLAGS = struct.Struct(f"{IFNAMSIZ}sh22x")


def set_link_up(name: str = "lo") -> None:
    """Sets IFF_UP on the interface ``name`` of the caller's network namespace."""
    raw_name = name.encode()[: IFNAMSIZ - 1]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            request = _IFREQ_FLAGS.pack(raw_name, 0)
            _, flags = _IFREQ_FLAGS.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, request))
            if flags & IFF_UP:
                return
            fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(raw_name, flags | IFF_UP))
    except OSError as exc:
        raise kernel_error(f"bring up network interface {name}", exc) from None
