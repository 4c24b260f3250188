"""The job store's authenticated view: `SealedStore`, a c10d store whose keys are keyed
hashes of the job's names and whose values carry HMAC tags made with the job's token
(`runtime.secret`), checked on every read.

The store's server has no notion of who writes, so the job authenticates what it
reads instead: a value that a stranger forged, copied from another key, wrote
again or deleted raises `Tampered` where it is read, and the reading role reports
it to the coordinator (TAMPERED_KEY). `runtime.store.JobStore` reads and writes
the job's JSON documents through it; gloo's rendezvous reads through it too.
"""

from __future__ import annotations

import datetime
import json
import threading

import torch.distributed as dist

from distbelief.errors import Tampered
from distbelief.runtime.secret import Freshness, JobSecret

TAMPERED_KEY = "job/tampered"
"""Where a role that met a forged or replayed value says so ({"role", "what"}); the
coordinator then fails the job in one line."""


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
            self.report_tampered(key, exc)
            raise
        return payload

    def report_tampered(self, key: str, exc: Tampered) -> None:
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
            self.report_tampered(key, exc)
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
            value = self._open(key, current)
            if value != expected:
                return value
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
