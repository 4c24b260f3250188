"""The job's control plane: a c10d TCPStore holding small JSON documents.

The coordinator hosts the store (`JobStore.host`); every other role connects
(`JobStore.connect`). The store's server has no notion of who writes, so the
job authenticates what it reads instead (`SealedStore`, `runtime.secret`):
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
import threading
import time
from typing import Any

import torch.distributed as dist

from distbelief.errors import Tampered, UserError
from distbelief.runtime.secret import Freshness, JobSecret


TAMPERED_KEY = "job/tampered"
"""Where a role that met a forged or replayed value says so ({"role", "what"}); the
coordinator then fails the job in one line."""


def new_token() -> str:
    """A fresh random job token (hex)."""
    return secrets.token_hex(16)


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


_ABSENT = b"\x00absent"
"""What `SealedStore.try_get` expects (no sealed value is this short), so it never writes."""


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class TamperReport:
    """Who this process is, for reporting a tampering (shared by a store's clones)."""

    def __init__(self):
        self.who: str | None = None  # the role this process runs ("replica 1"), once known
        self.sent = False  # whether the coordinator has been told


class SealedStore(dist.Store):
    """A c10d store that keeps each key under a keyed hash of its name and each value
    sealed with the job's token (`JobSecret.seal`); reads check the seal.

    It is a `torch.distributed.Store`, so gloo's rendezvous (`runtime.channel`) goes
    through it too: a stranger cannot rewrite the addresses that peers connect to.
    Reads raise `Tampered` on a value that fails its tag, or that is older than one
    this connection read before (`Freshness`: a replay, or a counter deleted and
    begun again); `add` keeps counters as sealed decimal text, updated with
    `compare_set` (two round trips instead of one); `try_get` reads without blocking.

    Thread safety: each request and the check of what it read happen under this
    connection's lock, so a connection's record sees its reads in the server's
    order; a process's writes are sealed and sent under one lock of its `JobSecret`,
    so one writer's values of a key reach the server in the order of their sequence
    numbers. Clones share the secret and the report, not the connection or record.

    Lifetime: c10d holds a store handed to it (a PrefixStore, a process group) by its
    C++ part only. Keep a reference to the Python object for as long as c10d uses
    it: once it is freed, c10d's calls find no methods ("Not implemented").
    """

    def __init__(self, inner: dist.Store, secret: JobSecret, report: TamperReport):
        super().__init__()
        self.inner, self.secret, self.report = inner, secret, report
        self.freshness = Freshness()
        self._lock = threading.RLock()

    def _open(self, key: str, sealed: bytes, *, counter: bool = False) -> bytes:
        try:
            payload, writer, seq = self.secret.open(key, sealed)
            count = None
            if counter:
                try:
                    count = int(payload)
                except ValueError:
                    raise Tampered(f"the job store was tampered with: the counter {key!r} "
                                   f"holds {payload[:20]!r}, not a number") from None
            self.freshness.check(key, writer, seq, count)
        except Tampered as exc:
            self._report(key, exc)
            raise
        return payload

    def _report(self, key: str, exc: Tampered) -> None:
        """Tell the coordinator (TAMPERED_KEY) what this role met, whichever thread met it,
        so that the job fails in one line naming it; once per process, best effort (the
        store may be what was broken)."""
        report = self.report
        if report.who is None or key == TAMPERED_KEY or report.sent:
            return
        report.sent = True
        value = json.dumps({"role": report.who, "what": str(exc)}).encode()
        try:  # not under the write lock: a reader may hold its connection's lock here
            self.inner.set(self.secret.key_name(TAMPERED_KEY),
                           self.secret.seal(TAMPERED_KEY, value))
        except (RuntimeError, dist.DistStoreError):
            pass

    def set(self, key: str, value: str | bytes) -> None:
        with self.secret.write_lock:
            self.inner.set(self.secret.key_name(key), self.secret.seal(key, _bytes(value)))

    def get(self, key: str) -> bytes:
        """The value at `key`; blocks until it is set (up to the store's timeout)."""
        with self._lock:
            return self._open(key, self.inner.get(self.secret.key_name(key)))

    def try_get(self, key: str) -> bytes | None:
        """The value at `key`, or None when it is unset; one round trip, never blocks (a
        `compare_set` that cannot match: unlike check-then-get, a key deleted in between
        does not leave `get` waiting for the store's timeout)."""
        with self._lock:
            now = self.inner.compare_set(self.secret.key_name(key), _ABSENT, _ABSENT)
            return None if now == _ABSENT else self._open(key, now)

    def get_present(self, key: str) -> bytes:
        """The value of a key that was just seen set (after `wait`); `Tampered` when it is
        gone: only the job's reader of it deletes it, so someone else did."""
        value = self.try_get(key)
        if value is None:
            exc = Tampered(f"the job store was tampered with: {key!r} was deleted")
            self._report(key, exc)
            raise exc
        return value

    def check(self, keys: list[str]) -> bool:
        return self.inner.check([self.secret.key_name(k) for k in keys])

    def wait(self, keys: list[str], timeout: datetime.timedelta | None = None) -> None:
        names = [self.secret.key_name(k) for k in keys]
        if timeout is None:
            self.inner.wait(names)
        else:
            self.inner.wait(names, timeout)

    def delete_key(self, key: str) -> bool:
        with self._lock:
            self.freshness.forget(key)
            return self.inner.delete_key(self.secret.key_name(key))

    def num_keys(self) -> int:
        return self.inner.num_keys()

    def clone(self) -> SealedStore:
        return SealedStore(self.inner.clone(), self.secret, self.report)

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        """As TCPStore's: set `desired` when the value is `expected` ("": when the key is
        unset); returns the value the key then holds (`expected` when it is unset)."""
        name, expected, desired = self.secret.key_name(key), _bytes(expected), _bytes(desired)
        with self.secret.write_lock, self._lock:
            sealed = self.secret.seal(key, desired)
            if not expected:
                now = self.inner.compare_set(name, "", sealed)
                return desired if now == sealed else self._open(key, now)
            current = self.inner.compare_set(name, _ABSENT, _ABSENT)
            if current == _ABSENT:
                return expected
            if self._open(key, current) != expected:
                return self._open(key, current)
            now = self.inner.compare_set(name, current, sealed)
            return desired if now == sealed else self._open(key, now)

    def add(self, key: str, amount: int) -> int:
        """Atomically add `amount` to the counter at `key` (0 when unset); the new value.
        A counter only grows: `amount` >= 0."""
        if amount < 0:
            raise ValueError(f"counter {key!r}: a counter only grows, got add({amount})")
        name = self.secret.key_name(key)
        with self.secret.write_lock, self._lock:
            sealed = self.secret.seal(key, str(amount).encode())
            now = self.inner.compare_set(name, "", sealed)
            while now != sealed:
                count = int(self._open(key, now, counter=True))
                if amount == 0:
                    return count
                sealed = self.secret.seal(key, str(count + amount).encode())
                previous, now = now, self.inner.compare_set(name, now, sealed)
                if now == previous:  # unset meanwhile (compare_set answers `expected`): anew
                    sealed = self.secret.seal(key, str(amount).encode())
                    now = self.inner.compare_set(name, "", sealed)
            return int(self._open(key, sealed, counter=True))


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
