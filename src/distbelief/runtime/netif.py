"""Which network interface reaches the coordinator: gloo's socket interface on many hosts.

gloo binds each pair to the address its host's name resolves to, and falls back
to the loopback interface when the name does not resolve, in which case a peer
on another host can never connect. A multi-host role therefore sets
``GLOO_SOCKET_IFNAME`` (unless the user did) to the interface that holds the
local address this host uses to reach ``MASTER_ADDR``.

Example::

    interface_towards("10.0.0.1")   # -> "eth0"
"""

from __future__ import annotations

import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915  # linux/sockios.h


def local_address_towards(address: str, port: int = 9) -> str | None:
    """This host's address on the route to `address` (no packet is sent); None if none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(address), port))
            return probe.getsockname()[0]
    except OSError:
        return None


def interface_of(local: str) -> str | None:
    """The name of the interface holding IPv4 address `local`; None if none does."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on it
                continue
            if socket.inet_ntoa(answer[20:24]) == local:
                return name
    return None


def interface_towards(address: str) -> str | None:
    """The interface this host reaches `address` through; None when it cannot tell."""
    local = local_address_towards(address)
    return None if local is None else interface_of(local)
