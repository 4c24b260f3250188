"""The job's control plane: a c10d TCPStore holding small JSON documents.

The coordinator hosts the store (`JobStore.host`); every other role connects
(`JobStore.connect`). The store's server has no notion of who writes, so the
job authenticates what it reads instead (`runtime.sealed`, `runtime.secret`):
every key is stored under a keyed one-way hash of its name, and every value
carries an HMAC tag made with the job's token over its key and payload. A
process without the token that reaches the port lists only opaque names and
cannot make a value the job accepts; a value it forged, replayed or deleted
raises `Tampered` where the job reads it, and is never acted on. Only JSON is
ever read back, never pickle.

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

from distbelief.errors import JobFailed, UserError
from distbelief.runtime.sealed import TAMPERED_KEY, SealedStore, TamperReport
from distbelief.runtime.secret import JobSecret

__all__ = ["TAMPERED_KEY", "JobStore", "StoreTimeout", "StreamReader", "new_token"]


def new_token() -> str:
    """A fresh random job token (hex)."""
    return secrets.token_hex(16)


class StoreTimeout(TimeoutError, JobFailed):
    """A key the job waits for did not come within its timeout (a role that never started,
    or a value someone deleted); the command line prints it as one line."""


class JobStore:
    """Typed JSON access to the job's namespace of a TCPStore."""

    POLL_SECONDS = 0.02

    def __init__(self, store: dist.Store, token: str, *, port: int, timeout: float,
                 secret: JobSecret | None = None, report: TamperReport | None = None):
        self.token = token
        self.port = port
        self.timeout = timeout
        self.secret = secret or JobSecret(token)
        self.raw = SealedStore(store, self.secret, report or TamperReport())

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
        return JobStore(self.raw.inner.clone(), self.token, port=self.port,
                        timeout=self.timeout, secret=self.secret, report=self.raw.report)

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
        raw = self.raw.try_get(key)
        return None if raw is None else json.loads(raw)

    def get_json(self, key: str, *, timeout: float | None = None, what: str | None = None) -> Any:
        """Wait up to `timeout` seconds for key, then return its JSON value.

        Polls with `check` rather than the store's own wait, which logs noise on timeout.
        Raises StoreTimeout (a TimeoutError, and a JobFailed: one line from the command)
        naming `what` (or the key).
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            value = self.try_get_json(key)
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise StoreTimeout(f"timed out waiting for {what or key!r}")
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
        return json.loads(self.raw.get_present(key))

    def add(self, key: str, amount: int) -> int:
        """Atomically add to a counter and return its new value."""
        return int(self.raw.add(key, amount))

    # ---- append-only streams of events -----------------------------------

    def append(self, stream: str, value: Any) -> int:
        """Append one JSON value to a stream; returns its index (0-based).

        The index is reserved with an `add`, then filled with a `compare_set`:
        a writer killed in between leaves a hole, which the reader gives up
        after `HOLE_SECONDS` by filling it with `HOLE` itself (`StreamReader`);
        a writer that was only slow then finds its index taken and appends again.
        """
        payload = json.dumps(value)
        while True:
            index = self.add(f"{stream}/count", 1) - 1
            if self.raw.compare_set(f"{stream}/{index}", "", payload) == payload.encode():
                return index

    def stream(self, name: str, start: int = 0) -> StreamReader:
        """The reader of stream `name` (there is one per stream), from index `start`."""
        return StreamReader(self, name, start)

    # ---- membership -----------------------------------------------------------

    def act_as(self, who: str) -> None:
        """This process runs role `who` ("replica 1"): a forged or replayed value it meets
        from now on, on any connection cloned from this one, is reported under
        TAMPERED_KEY as met by `who`."""
        self.raw.report.who = who

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


HOLE = "\x00hole"
"""What a reader writes into a stream index whose writer never filled it (no JSON text
starts with NUL)."""
HOLE_SECONDS = 1.0
"""How long an index may stay reserved but empty, while later ones are reserved too,
before the reader gives it up (its writer died between reserving and writing it)."""


class StreamReader:
    """The one reader of an append-only store stream: its values in order, each once.

    `read` takes what is complete so far (and deletes it from the store: a long
    job's store stays small; a given-up index keeps its `HOLE`, one key per
    dead writer); `wait` blocks for the next value (the store wakes
    it, no polling). An index reserved by a writer that died before writing it
    would stop the stream for good; once later indices are reserved and it has
    stayed empty for `HOLE_SECONDS`, `read` (or, beside a `wait`, another
    thread's `seal_hole`) fills it with `HOLE`, and the reader moves past it.
    `read`/`wait` belong to one thread; `seal_hole` may run in another with its
    own store connection.

    Example::

        events = store.stream("events")
        for event in events.read():     # what writers' `store.append("events", ...)` made
            ...
    """

    def __init__(self, store: JobStore, name: str, start: int = 0):
        self.store, self.name, self.next = store, name, start
        self.holes = 0  # indices given up
        self._empty_since: tuple[int, float] | None = None  # (index, first seen empty)

    def _key(self, index: int) -> str:
        return f"{self.name}/{index}"

    def read(self) -> list[Any]:
        """The values complete so far, from where the last call stopped."""
        out = []
        count = self.store.add(f"{self.name}/count", 0)
        while self.next < count:
            key = self._key(self.next)
            raw = self.store.raw.try_get(key)
            if raw is None:
                if not self.seal_hole(self.store, self.next, count):
                    break
                raw = HOLE.encode()
            self.next += 1
            if raw != HOLE.encode():  # a sealed hole stays: its slow writer must find it
                self.store.delete(key)
                out.append(json.loads(raw))
        return out

    def wait(self, timeout: float) -> Any:
        """The next value; blocks (woken by the store) up to `timeout`, then TimeoutError.
        Holds the store's connection while it waits (see `JobStore.clone`)."""
        while True:
            key = self._key(self.next)
            try:
                self.store.raw.wait([key], _td(timeout))
            except dist.DistStoreError:
                raise TimeoutError(f"timed out waiting for {key!r}") from None
            raw = self.store.raw.get_present(key)
            self.next += 1
            if raw != HOLE.encode():  # a sealed hole stays: its slow writer must find it
                self.store.delete(key)
                return json.loads(raw)

    def seal_hole(self, store: JobStore, index: int | None = None,
                  count: int | None = None) -> bool:
        """Give up index `index` (default: the next to read) when its writer is gone: it
        is still empty, later ones are reserved, and it has been so for `HOLE_SECONDS`.
        True when it now holds `HOLE`. `store`: the connection to use (a thread's own)."""
        index = self.next if index is None else index
        if count is None:
            count = store.add(f"{self.name}/count", 0)
        if count <= index + 1:  # nothing reserved after it: a writer may just be slow
            return False
        now = time.monotonic()
        if self._empty_since is None or self._empty_since[0] != index:
            self._empty_since = (index, now)
            return False
        if now - self._empty_since[1] < HOLE_SECONDS:
            return False
        if store.raw.compare_set(self._key(index), "", HOLE) != HOLE.encode():
            return False  # written after all
        self.holes += 1
        return True
