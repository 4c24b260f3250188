"""The job's token, used only through keyed one-way functions.

The token never leaves the processes of the job: no key name, file name or
message carries it or anything it can be recovered from. From it come keys
(HMAC-SHA256 of the token with a purpose label), one per use:

- names: a store key ``K`` is stored under ``db/<HMAC(names, K)>``, so a process
  that lists the store's keys learns nothing about the job's names or token;
- values: every value carries an HMAC tag over its key, its writer's identity
  and sequence number and the payload (`seal` / `open`), so a value that a
  stranger forged, or copied from another key, fails `open` with `Tampered`;
- files: the job's shared-memory files and Unix sockets are named
  ``distbelief-<job id>-<name>``, the job id a one-way function of the token;
- local: a local client's connection request carries a tag and a one-use nonce
  (`request_tag`, `runtime.local`);
- channels: the members of a gloo or NCCL channel prove to each other that they
  hold the token before any tensor flows (`channel_tag`, `runtime.channel`): a
  stranger who connected to a channel's port in a peer's place is caught there.

Thread-safe: a `JobSecret` holds only immutable keys; `Freshness` has a lock.

Example::

    secret = JobSecret("4f1c0a9e7b2d8c3f6a5e0d1b9c8a7f6e")
    sealed = secret.seal("config", b'{"replicas": 2}')
    assert secret.open("config", sealed) == b'{"replicas": 2}'
    secret.key_name("config")   # 'db/9f3...' (no trace of the token)
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Sequence

from distbelief.errors import Tampered

TAG_BYTES = 32
_STAMP = struct.Struct(">8sQ")  # writer id, writer's sequence number
TRAILER_BYTES = _STAMP.size + TAG_BYTES


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


class JobSecret:
    """The keys derived from one job token; see the module doc."""

    def __init__(self, token: str):
        root = _hmac(token.encode(), b"distbelief job token v1")
        self._names = _hmac(root, b"store key names")
        self._values = _hmac(root, b"store values")
        self._local = _hmac(root, b"local connection requests")
        self._channels = _hmac(root, b"channel handshakes")
        self.job_id = _hmac(root, b"job files").hex()[:16]
        self._writer = os.urandom(8)  # this process's identity as a writer (a fork makes its own)
        self._pid = os.getpid()
        self._seq = 0
        self._lock = threading.Lock()
        self.write_lock = threading.RLock()
        """Held while a value is sealed and sent (`SealedStore`), so that this process's
        values of one key reach the store in the order of their sequence numbers."""

    def key_name(self, key: str) -> str:
        """The store key under which the job's key `key` lives (a keyed one-way hash)."""
        return "db/" + _hmac(self._names, key.encode()).hex()[:40]

    def seal(self, key: str, payload: bytes) -> bytes:
        """`payload` with this writer's stamp and a tag over (key, stamp, payload)."""
        with self._lock:
            if os.getpid() != self._pid:  # a forked child: a writer of its own
                self._writer, self._pid, self._seq = os.urandom(8), os.getpid(), 0
            self._seq += 1
            stamp = _STAMP.pack(self._writer, self._seq)
        return payload + stamp + self._tag(key, stamp, payload)

    def open(self, key: str, sealed: bytes) -> tuple[bytes, bytes, int]:
        """(payload, writer, sequence) of a value `seal` made for `key`; `Tampered` when
        the value was not made by a holder of the token for this key."""
        sealed = bytes(sealed)
        if len(sealed) >= TRAILER_BYTES:
            payload, stamp = sealed[:-TRAILER_BYTES], sealed[-TRAILER_BYTES:-TAG_BYTES]
            if hmac.compare_digest(sealed[-TAG_BYTES:], self._tag(key, stamp, payload)):
                writer, seq = _STAMP.unpack(stamp)
                return payload, writer, seq
        raise Tampered(f"the job store was tampered with: the value of {key!r} fails its "
                       "authentication (written by a process without the job's token)")

    def request_tag(self, where: str, nonce: bytes, body: bytes) -> str:
        """The tag a local client sends with its connection request (`runtime.local`)."""
        return _hmac(self._local, where.encode() + b"\0" + nonce + body).hex()

    def channel_tag(self, name: str, nonces: Sequence[bytes], rank: int) -> bytes:
        """The tag member `rank` of channel (or group) `name` sends in its handshake:
        HMAC over the name, every member's fresh nonce in rank order and `rank`.

        The nonces make a tag good for one handshake only; the rank keeps a stranger
        from answering a member with that member's own tag."""
        label = name.encode()
        data = [struct.pack(">I", len(label)), label, struct.pack(">I", len(nonces))]
        for nonce in nonces:
            data += [struct.pack(">I", len(nonce)), bytes(nonce)]
        data.append(struct.pack(">I", rank))
        return _hmac(self._channels, b"".join(data))

    def _tag(self, key: str, stamp: bytes, payload: bytes) -> bytes:
        return _hmac(self._values, struct.pack(">I", len(key)) + key.encode() + stamp + payload)


class Freshness:
    """What one store connection last read of each key, so that a replayed old value is
    caught.

    A writer's values of one key carry increasing sequence numbers, and counters
    only grow: an older sequence number from the same writer, or a counter
    below what this connection already saw, is a replay (or a deletion) by a
    stranger. Remembers the last `capacity` keys (a long job's per-step keys
    come and go). Thread-safe.
    """

    def __init__(self, capacity: int = 8192):
        self._seen: collections.OrderedDict[str, tuple[bytes, int, int]] = \
            collections.OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def check(self, key: str, writer: bytes, seq: int, count: int | None = None) -> None:
        """Record a read of `key` (a counter's value as `count`); `Tampered` when it is
        older than one this process already read."""
        with self._lock:
            last = self._seen.get(key)
            if last is not None:
                last_writer, last_seq, last_count = last
                if writer == last_writer and seq < last_seq:
                    raise Tampered(f"the job store was tampered with: the value of {key!r} is "
                                   "an old one written again (replayed)")
                if count is not None and count < last_count:
                    raise Tampered(f"the job store was tampered with: the counter {key!r} went "
                                   f"back from {last_count} to {count} (deleted or rewritten)")
            self._seen[key] = (writer, seq, -1 if count is None else count)
            self._seen.move_to_end(key)
            while len(self._seen) > self._capacity:
                self._seen.popitem(last=False)

    def forget(self, key: str) -> None:
        """The job itself deleted `key`: a later value starts afresh."""
        with self._lock:
            self._seen.pop(key, None)
