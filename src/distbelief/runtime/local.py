"""Header channels between two processes on one host, over a Unix socket.

The shared-memory transport moves no tensor through a channel: parameters and
gradients are read and written in /dev/shm, and only small int64 headers
(commands, versions) travel. A gloo pair carries each such header through its
own device thread and a condition variable on both sides, so a request costs
several context switches, which on a busy machine means several scheduler
slices. A Unix stream socket hands the bytes straight to the thread blocked in
`recv`, which is all a header needs; a peer that dies closes it, so the other
side's pending call fails at once instead of at its timeout.

A `LocalListener` is bound to a path under /dev/shm named by the job's id
(`job_file`: a one-way function of the token), readable by its owner only. A
client connects with `LocalChannel.connect`, sending a small JSON request in
the same breath, with a fresh nonce and an HMAC tag made with the job's token
over the socket's name, the nonce and the request (the token itself never
travels); the listener's `accept` gives back the channel, and the connection
thread checks the request with `read_request` (a wrong tag, a nonce seen
before or a malformed request ends that connection only).

`LocalChannel` has the header half of `channel.Channel`'s interface
(`send_header`, `recv_header`, `close`, `name`), so a protocol written against
headers runs over either. Blocking: every call blocks for at most the
channel's timeout and raises `ChannelClosed` when the peer went away or stayed
silent that long. One channel must be used by one thread at a time.

Example::

    listener = LocalListener(job_file(token, "shard0.sock"))
    # client:                                   # server, in its accept loop:
    ch = LocalChannel.connect(path, token,       conn = listener.accept(poll=0.02)
                              {"client": "r0"},  request = conn.read_request(token)
                              timeout=30)        op, a, *_ = conn.recv_header()
    ch.send_header(1, 42)
"""

from __future__ import annotations

import collections
import hmac
import json
import os
import select
import socket
import struct
import threading
from pathlib import Path

from distbelief.runtime.channel import HEADER_LEN, ChannelClosed, ChannelTimeout
from distbelief.runtime.secret import JobSecret

_HEADER = struct.Struct(f"<{HEADER_LEN}q")
_LENGTH = struct.Struct("<I")
MAX_REQUEST = 1 << 16
"""A connection request is a small JSON object; anything longer is refused."""
REQUEST_SECONDS = 5.0
"""How long a connection thread waits for the request that a client sends with its connect."""


class LocalChannel:
    """A two-party header channel over a connected Unix stream socket. See module doc."""

    def __init__(self, sock: socket.socket, name: str, timeout: float):
        self.name = name
        self._sock = sock
        self._sock.settimeout(timeout)
        self._in = bytearray(_HEADER.size)
        self._view = memoryview(self._in)

    @classmethod
    def connect(cls, path: Path, token: str, request: dict, timeout: float) -> LocalChannel:
        """Connect to the listener at `path` and send `request`, tagged with the job's token."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        text, nonce = json.dumps(request), os.urandom(16)
        tag = JobSecret(token).request_tag(path.name, nonce, text.encode())
        try:
            sock.connect(str(path))
            body = json.dumps({"request": text, "nonce": nonce.hex(), "tag": tag}).encode()
            sock.sendall(_LENGTH.pack(len(body)) + body)
        except OSError as exc:
            sock.close()
            raise ChannelClosed(f"channel {path.name}: cannot connect ({exc})") from None
        return cls(sock, path.name, timeout)

    def read_request(self, token: str) -> dict:
        """The request the client sent with its connect, after checking its tag.

        Raises ChannelClosed (a tag not made with the job's token, a nonce this
        process saw before, a malformed or silent client); the connection is then
        closed."""
        old = self._sock.gettimeout()
        self._sock.settimeout(REQUEST_SECONDS)
        try:
            (length,) = _LENGTH.unpack(self._read(_LENGTH.size))
            if length > MAX_REQUEST:
                raise ChannelClosed(f"channel {self.name}: a request of {length} bytes")
            message = json.loads(self._read(length))
            if not (isinstance(message, dict)
                    and all(isinstance(message.get(k), str) for k in ("request", "nonce", "tag"))):
                raise ValueError("not a request")
            nonce, text = bytes.fromhex(message["nonce"]), message["request"]
            expected = JobSecret(token).request_tag(self.name, nonce, text.encode())
            if not hmac.compare_digest(message["tag"].encode(), expected.encode()):
                raise ChannelClosed(f"channel {self.name}: a client without the job's token")
            if not _first_use(nonce):
                raise ChannelClosed(f"channel {self.name}: a connection request sent again "
                                    "(replayed)")
            request = json.loads(text)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            self.close()
            raise ChannelClosed(f"channel {self.name}: a malformed connection request") from None
        except ChannelClosed:
            self.close()
            raise
        self._sock.settimeout(old)
        return request

    def send_header(self, *values: int) -> None:
        if len(values) > HEADER_LEN:
            raise ValueError(f"a header holds {HEADER_LEN} integers, got {len(values)}")
        try:
            self._sock.sendall(_HEADER.pack(*values, *(0,) * (HEADER_LEN - len(values))))
        except OSError as exc:
            raise ChannelClosed(f"channel {self.name}: {_describe(exc)}") from None

    def recv_header(self) -> list[int]:
        self._read_into(self._view)
        return list(_HEADER.unpack(self._in))

    def close(self) -> None:
        """End the connection: the peer's pending and later calls raise ChannelClosed."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _read(self, size: int) -> bytes:
        buffer = bytearray(size)
        self._read_into(memoryview(buffer))
        return bytes(buffer)

    def _read_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = self._sock.recv_into(view[got:])
            except OSError as exc:
                kind = ChannelTimeout if isinstance(exc, TimeoutError) else ChannelClosed
                raise kind(f"channel {self.name}: {_describe(exc)}") from None
            if n == 0:
                raise ChannelClosed(f"channel {self.name}: the peer closed the connection")
            got += n


class LocalListener:
    """A listening Unix socket at `path` (mode 0600); removed by `close`. Not thread-safe."""

    def __init__(self, path: Path, timeout: float):
        self.path = Path(path)
        self.timeout = timeout
        self.path.unlink(missing_ok=True)  # a predecessor's (a restarted shard binds anew)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old)
        self._sock.listen(256)

    def accept(self, poll: float) -> LocalChannel | None:
        """A new connection, or None when none came within `poll` seconds."""
        ready, _, _ = select.select([self._sock], [], [], poll)
        if not ready:
            return None
        try:
            sock, _ = self._sock.accept()
        except BlockingIOError:  # the client gave up between select and accept
            return None
        return LocalChannel(sock, self.path.name, self.timeout)

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)


def _describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the timeout"
    return exc.strerror or type(exc).__name__


_nonces: collections.OrderedDict[bytes, None] = collections.OrderedDict()
_nonces_lock = threading.Lock()
NONCES_KEPT = 1 << 16
"""How many recent request nonces a process remembers, to refuse a replayed request."""


def _first_use(nonce: bytes) -> bool:
    """True the first time this process sees `nonce` (among the last NONCES_KEPT)."""
    with _nonces_lock:
        if nonce in _nonces:
            return False
        _nonces[nonce] = None
        if len(_nonces) > NONCES_KEPT:
            _nonces.popitem(last=False)
        return True
