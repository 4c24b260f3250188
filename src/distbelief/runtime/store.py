"""The job's control plane: a c10d TCPStore holding small JSON documents.

The coordinator hosts the store (`JobStore.host`); every other role connects
(`JobStore.connect`). All keys live under a prefix derived from the job's
secret token, so a process that does not know the token neither sees nor
writes any of the job's keys. Only JSON is ever read back — never pickle.

Thread safety: a `JobStore` may be shared by threads (the c10d client
serialises requests). Every blocking call takes a timeout. A request holds the
connection until it is answered, so the only call that blocks on the server,
`wait_json`, belongs on a connection of its own (`clone`); `get_json` polls,
and the channels' rendezvous make their own (`runtime.channel`).

Example::

    store = JobStore.host("127.0.0.1", 0, token, timeout=30)
    store.set_json("config", {"replicas": 2})
    other = JobStore.connect("127.0.0.1", store.port, token, timeout=30)
    assert other.get_json("config", timeout=5) == {"replicas": 2}
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import secrets
import socket
import time
from typing import Any

import torch.distributed as dist

from distbelief.errors import UserError


def new_token() -> str:
    """A fresh random job token (hex)."""
    return secrets.token_hex(16)


class JobStore:
    """Typed JSON access to the job's namespace of a TCPStore."""

    POLL_SECONDS = 0.02

    def __init__(self, store: dist.Store, token: str, *, port: int, timeout: float):
        self.token = token
        self.port = port
        self.timeout = timeout
        self.raw = dist.PrefixStore(f"distbelief/{token}/", store)

    # ---- construction ------------------------------------------------------

    @classmethod
    def host(cls, host: str, port: int, token: str, *, timeout: float) -> JobStore:
        """Host the store on host:port (0 = a free port), listening on that address only.

        UserError if the address cannot be resolved or the port is taken.
        """
        listener = _listen(host, port)
        bound_port = listener.getsockname()[1]
        fd = listener.detach()  # the store owns the descriptor from here on and closes it
        try:
            store = dist.TCPStore(host, bound_port, None, True, timeout=_td(timeout),
                                  wait_for_workers=False, master_listen_fd=fd, use_libuv=True)
        except BaseException:
            os.close(fd)
            raise
        return cls(store, token, port=bound_port, timeout=timeout)

    @classmethod
    def connect(cls, host: str, port: int, token: str, *, timeout: float) -> JobStore:
        """Connect to a store hosted elsewhere; waits up to `timeout` for it to come up."""
        store = dist.TCPStore(host, port, None, False, timeout=_td(timeout))
        return cls(store, token, port=port, timeout=timeout)

    def clone(self) -> JobStore:
        """A second connection to the same store, for another thread.

        One connection serves one request at a time, and a blocking `wait_json`
        holds it: a thread that waits must not share its connection with threads
        that need the store meanwhile.
        """
        return JobStore(self.raw.underlying_store.clone(), self.token, port=self.port,
                        timeout=self.timeout)

    def close(self) -> None:
        """Drop this handle's references; a hosted store stops serving once none remain."""
        self.raw = None  # type: ignore[assignment]

    # ---- JSON values ---------------------------------------------------------

    def set_json(self, key: str, value: Any) -> None:
        self.raw.set(key, json.dumps(value))

    def delete(self, *keys: str) -> None:
        """Remove keys that no one will read again (a missing key is fine)."""
        for key in keys:
            self.raw.delete_key(key)

    def has(self, key: str) -> bool:
        return self.raw.check([key])

    def try_get_json(self, key: str) -> Any | None:
        """The value at key, or None when the key is not set (does not block)."""
        if not self.raw.check([key]):
            return None
        return json.loads(self.raw.get(key))

    def get_json(self, key: str, *, timeout: float | None = None, what: str | None = None) -> Any:
        """Wait up to `timeout` seconds for key, then return its JSON value.

        Polls with `check` rather than the store's own wait, which logs noise on timeout.
        Raises TimeoutError naming `what` (or the key).
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = self.try_get_json(key)
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what or key!r}")
            time.sleep(self.POLL_SECONDS)

    def wait_json(self, key: str, timeout: float) -> Any:
        """Block until key is set, woken by the store (no polling); return its JSON value.

        For latency-sensitive hand-offs (Sandblaster's work hand-out). Holds this
        connection while it waits (see `clone`). Raises TimeoutError after `timeout`
        seconds.
        """
        try:
            self.raw.wait([key], _td(timeout))
        except dist.DistStoreError:
            raise TimeoutError(f"timed out waiting for {key!r}") from None
        return json.loads(self.raw.get(key))

    def add(self, key: str, amount: int) -> int:
        """Atomically add to a counter and return its new value."""
        return int(self.raw.add(key, amount))

    # ---- append-only streams of events -----------------------------------

    def append(self, stream: str, value: Any) -> int:
        """Append one JSON value to a stream; returns its index (0-based)."""
        index = self.add(f"{stream}/count", 1) - 1
        self.set_json(f"{stream}/{index}", value)
        return index

    def read_stream(self, stream: str, start: int, *, consume: bool = False) -> list[Any]:
        """Values of a stream from index `start` on that are already complete.

        An index whose value is not written yet (the appender is between its
        `add` and its `set`) ends the batch; the caller reads it next time.
        `consume`: the caller is the stream's only reader, so the values read
        are deleted from the store (a long job's store stays small).
        """
        count = self.add(f"{stream}/count", 0)
        out = []
        for index in range(start, count):
            value = self.try_get_json(f"{stream}/{index}")
            if value is None:
                break
            out.append(value)
        if consume:
            self.delete(*(f"{stream}/{index}" for index in range(start, start + len(out))))
        return out

    # ---- membership -----------------------------------------------------------

    def register(self, role: str, ident: int | str, info: dict[str, Any]) -> None:
        """Announce a role process (kind, id, pid, host, ...) to the coordinator."""
        self.set_json(f"members/{role}/{ident}", info)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to exactly host:port, or a UserError saying why not."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve --host {host!r} ({exc.strerror}): give an address of "
                        "this machine, e.g. 127.0.0.1") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use: pick another with --port, "
                            "or leave --port out to use a free one") from None
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): give an address of "
                        "this machine and a port above 1024") from None
    return sock


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)
