"""Tensor channels between two processes, and groups of any size.

`Channel` is one gloo process group of size two, made on demand over the job's
store with a `PrefixStore`; no global collective is needed, so peers may join
late and a dead peer breaks only its own channels (its pending `recv` raises
`ChannelClosed`). Small fixed-size int64 *headers* carry commands and version
numbers; tensors follow when the transport is TCP.

`Group` is a gloo process group of any size over the same store, for the
collectives of synchronous training (all-reduce), or an NCCL one when every
member computes on a GPU of its own; a dead member makes the others' pending
collective raise `ChannelClosed`.

On one host the tensors themselves go through shared memory (`runtime.shm`) and
only the headers travel over a channel.

Rendezvous: a c10d TCPStore client serves one request at a time, and gloo's
rendezvous blocks in a `get` on its store until every member has joined, which
may take the whole timeout. `Channel` and `Group` therefore join over a store
connection of their own (``store.clone()``): a caller may pass the connection
its other threads use (heartbeat, reports, another channel's join) and none of
them waits behind the rendezvous.

Authentication: gloo's TCP pairs carry no credentials, and a stranger who
reaches a member's listening port could connect in a peer's place. So right
after its process group is made, every `Channel` and `Group` over the job's
`SealedStore` (`JobStore.raw`) runs a handshake before any caller's message:
each member draws a fresh 16-byte nonce, the members exchange nonces (a channel
on `HANDSHAKE_TAG`, a group with an all-gather), then each sends
``JobSecret.channel_tag(name, nonces in rank order, own rank)`` and checks every
peer's with `hmac.compare_digest`. A wrong tag shuts the channel down and raises
`Tampered` (reported to the coordinator like a forged store value); a peer that
dies meanwhile gives `ChannelClosed`. Two small messages each way, once per
channel; `send`/`recv` are untouched. Over a plain c10d store (unit tests pass a
`HashStore` or a bare TCPStore) there is no token and no handshake, unless the
caller gives ``secret=``. The handshake proves who answered when the channel was
made; it does not tag each later message (an attacker on the path between two
hosts is out of its reach, as with the store).

Blocking: `send`/`recv` block until the peer matches them or the channel's
timeout passes. One channel must be used by one thread at a time.
"""

from __future__ import annotations

import contextlib
import datetime
import hmac
import os

import torch
import torch.distributed as dist

from distbelief.errors import Tampered
from distbelief.runtime.faults import fault
from distbelief.runtime.secret import JobSecret
from distbelief.runtime.sealed import SealedStore

HEADER_LEN = 6
TENSOR_TAG = 1
"""The gloo tag of tensors that follow a header (headers travel on tag 0)."""
HANDSHAKE_TAG = 0x68616E64
"""The gloo tag of a channel's handshake; callers never use it."""
NONCE_BYTES = 16


class ChannelClosed(ConnectionError):
    """The peer went away (crashed, was killed, or closed the channel)."""


class ChannelTimeout(ChannelClosed):
    """Nothing came within the timeout: the peer may be dead, hung, or only quiet."""


class Channel:
    """A two-party tensor channel over its own gloo process group.

    Both sides call ``Channel(store, name, rank, timeout)`` with the same name and
    ranks 0 and 1; the constructor blocks until both have joined and proved that
    they hold the job's token (or timeout), over a store connection of its own:
    other threads may use `store` meanwhile. `secret` defaults to the store's when
    it is a `SealedStore`; with none there is no handshake (see the module doc).
    Raises `ChannelClosed` when the peer did not join or went away, `Tampered` when
    it failed the handshake.

    Example::

        ch = Channel(store.raw, "pg/shard0/3", rank=0, timeout=30)
        op, a, b = ch.recv_header()[:3]
        ch.send_header(1, 42)
    """

    def __init__(self, store: dist.Store, name: str, rank: int, timeout: float, *,
                 secret: JobSecret | None = None):
        if rank not in (0, 1):
            raise ValueError(f"a channel has ranks 0 and 1, got {rank}")
        self.name = name
        self.rank = rank
        self.peer = 1 - rank
        self._store = own_connection(store)  # kept: c10d holds only its C++ part
        try:
            self._pg = dist.ProcessGroupGloo(dist.PrefixStore(name, self._store),
                                             rank, 2, datetime.timedelta(seconds=timeout))
        except Tampered:
            raise
        except RuntimeError as exc:
            raise ChannelClosed(f"channel {name}: peer did not connect ({_short(exc)})") from None
        self._header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        secret = secret or _secret_of(store)
        if secret is not None:
            _shut_on_failure(self._drop, self._store, lambda: self._handshake(secret))

    def _handshake(self, secret: JobSecret) -> None:
        mine = os.urandom(NONCE_BYTES)
        theirs = self._swap(mine)
        nonces = [mine, theirs] if self.rank == 0 else [theirs, mine]
        fault("channel.handshake", who=self.name)
        answer = self._swap(secret.channel_tag(self.name, nonces, self.rank))
        if not hmac.compare_digest(answer, secret.channel_tag(self.name, nonces, self.peer)):
            raise Tampered(f"channel {self.name}: a peer without the job's token answered "
                           "its handshake; the channel is shut down")

    def _drop(self) -> None:
        """Shut the process group down and let it go: only then are its connections closed
        (a stranger who answered the handshake is cut off)."""
        pg, self._pg = self._pg, None
        pg.shutdown()

    def _swap(self, data: bytes) -> bytes:
        """Send `data` to the peer on HANDSHAKE_TAG and receive as many bytes from it."""
        out = torch.empty(len(data) // 8, dtype=torch.int64)
        try:
            posted = self._pg.recv([out], self.peer, HANDSHAKE_TAG)
            self._pg.send([_words(data)], self.peer, HANDSHAKE_TAG).wait()
            posted.wait()
        except RuntimeError as exc:
            raise ChannelClosed(f"channel {self.name}: the peer went away during the "
                                f"handshake ({_short(exc)})") from None
        return _bytes(out)

    def send(self, tensor: torch.Tensor, tag: int = 0) -> None:
        self._wait(lambda: self._pg.send([tensor], self.peer, tag))

    def recv(self, tensor: torch.Tensor, tag: int = 0) -> None:
        self._wait(lambda: self._pg.recv([tensor], self.peer, tag))

    def post_recv(self, tensor: torch.Tensor, tag: int = TENSOR_TAG) -> Posted:
        """Start receiving into `tensor` (contiguous) and return at once; `wait()` on the
        result blocks until it arrived.

        Post before the peer sends: gloo copies a message that arrives before its
        receive was posted through a buffer of its own, which for a model-sized
        tensor costs about a quarter of the transfer. Headers keep tag 0, so a
        receive posted for a tensor (tag 1) never takes a header."""
        try:
            return Posted(self, self._pg.recv([tensor], self.peer, tag))
        except RuntimeError as exc:
            raise ChannelClosed(f"channel {self.name}: {_short(exc)}") from None

    def send_header(self, *values: int) -> None:
        if len(values) > HEADER_LEN:
            raise ValueError(f"a header holds {HEADER_LEN} integers, got {len(values)}")
        header = torch.zeros(HEADER_LEN, dtype=torch.int64)
        header[: len(values)] = torch.tensor(values, dtype=torch.int64)
        self.send(header)

    def recv_header(self) -> list[int]:
        self.recv(self._header)
        return self._header.tolist()

    def close(self) -> None:
        """End this side's use of the channel.

        Shutting the process group down does not wake a `recv` already pending on
        either side: a peer blocked in one waits until this process exits (its
        connections close) or its own timeout. A protocol that needs a blocked peer
        to stop must send it a message saying so (the data server sends END).
        """
        self._pg.shutdown()

    def _wait(self, start) -> None:
        # a peer that already hung up fails the call itself, not only the wait
        try:
            start().wait()
        except RuntimeError as exc:
            kind = ChannelTimeout if "timed out" in str(exc).lower() else ChannelClosed
            raise kind(f"channel {self.name}: {_short(exc)}") from None


class Posted:
    """A receive posted on a `Channel`; `wait()` blocks until the tensor arrived."""

    def __init__(self, channel: Channel, work):
        self._channel, self._work = channel, work

    def wait(self) -> None:
        self._channel._wait(lambda: self._work)


class Group:
    """A gloo (or NCCL) process group of `size` members, for collectives (synchronous
    training).

    Every member calls ``Group(store, name, rank, size, timeout)`` with the same
    name and size and its own rank in 0..size-1; the constructor blocks until
    all have joined and proved that they hold the job's token (or timeout; the
    handshake and `secret` as `Channel`'s). A collective blocks until every member
    has entered it; when a member dies or stays away longer than the timeout, the
    others get `ChannelClosed` instead of hanging. One group must be used by
    one thread at a time. The join goes over a store connection of its own (see
    the module doc), so members in one process may pass the same store.

    With ``device=`` a CUDA device (every member giving one, each its own GPU) the
    group is NCCL's on that device and its tensors must live there; a collective
    that does not finish within the timeout raises `ChannelClosed` too, and the
    communicator is aborted.

    Example::

        group = Group(store.raw, "pg/sync", rank=r, size=R, timeout=30)
        try:
            group.all_reduce_sum(buf)     # buf now holds the sum over the R members
        finally:
            group.close()
    """

    def __init__(self, store: dist.Store, name: str, rank: int, size: int, timeout: float, *,
                 device: torch.device | None = None, secret: JobSecret | None = None):
        if not 0 <= rank < size:
            raise ValueError(f"group {name}: rank {rank} is not in 0..{size - 1}")
        self.name, self.rank, self.size = name, rank, size
        self.backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        self._device = device if self.backend == "nccl" else torch.device("cpu")
        self._timeout = datetime.timedelta(seconds=timeout)
        self._store = own_connection(store)  # kept: c10d holds only its C++ part
        prefixed = dist.PrefixStore(name, self._store)
        try:
            if self.backend == "nccl":
                self._pg = _nccl_group(prefixed, rank, size, self._timeout, device)
            else:
                self._pg = dist.ProcessGroupGloo(prefixed, rank, size, self._timeout)
        except Tampered:
            raise
        except RuntimeError as exc:
            raise ChannelClosed(f"group {name}: not every member joined ({_short(exc)})") from None
        secret = secret or _secret_of(store)
        if secret is not None and size > 1:
            _shut_on_failure(self._abort if self.backend == "nccl" else self.close, self._store,
                             lambda: self._handshake(secret))

    def _handshake(self, secret: JobSecret) -> None:
        mine = _words(os.urandom(NONCE_BYTES)).to(self._device)
        nonces = [_bytes(t) for t in self.all_gather(mine)]
        fault("channel.handshake", who=self.name)
        proof = _words(secret.channel_tag(self.name, nonces, self.rank)).to(self._device)
        answers = [_bytes(t) for t in self.all_gather(proof)]
        strangers = [r for r, answer in enumerate(answers) if r != self.rank and
                     not hmac.compare_digest(answer, secret.channel_tag(self.name, nonces, r))]
        if strangers:
            raise Tampered(f"group {self.name}: a peer without the job's token answered its "
                           f"handshake as member {strangers[0]}; the group is shut down")

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Replace `tensor` (contiguous) with the element-wise sum over all members. Blocks."""
        if self._pg is None:
            raise ChannelClosed(f"group {self.name} is closed")
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.SUM
        try:
            work = self._pg.allreduce([tensor], options)
            if self.backend == "nccl":  # with a timeout NCCL's wait blocks this thread too
                work.wait(self._timeout)
            else:
                work.wait()
        except RuntimeError as exc:
            detail = _short(exc).split(". This is typically")[0]  # drop gloo's boilerplate
            self._abort()
            raise ChannelClosed(f"group {self.name}: a member went away or stopped answering "
                                f"({detail})") from None

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every member's `tensor` (all the same shape), in rank order. Blocks."""
        pg = self._live()
        out = [torch.empty_like(tensor) for _ in range(self.size)]
        self._finish(pg.allgather([out], [tensor.contiguous()]))
        return out

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> Pending:
        """Start sending `tensor` (contiguous) to member `dst`; returns at once.

        Do not change `tensor` until the returned handle's `wait()` returned."""
        return Pending(self, self._live().send([tensor], dst, tag))

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> Pending:
        """Start receiving into `tensor` (contiguous) from member `src`; returns at once."""
        return Pending(self, self._live().recv([tensor], src, tag))

    def _live(self):
        if self._pg is None:
            raise ChannelClosed(f"group {self.name} is closed")
        return self._pg

    def _finish(self, work) -> None:
        try:
            if self.backend == "nccl":  # with a timeout NCCL's wait blocks this thread too
                work.wait(self._timeout)
            else:
                work.wait()
        except RuntimeError as exc:
            detail = _short(exc).split(". This is typically")[0]
            raise ChannelClosed(f"group {self.name}: a member went away or stopped answering "
                                f"({detail})") from None

    def close(self) -> None:
        """Release the group's connections; the group cannot be used afterwards."""
        pg, self._pg = self._pg, None
        if pg is not None:
            pg.shutdown()

    def _abort(self) -> None:
        """An NCCL collective failed: abort the communicator (a shutdown would wait for it)."""
        if self.backend == "nccl" and self._pg is not None:
            pg, self._pg = self._pg, None
            pg.abort()


class Pending:
    """A point-to-point transfer of a `Group` in flight; `wait()` blocks until it is done."""

    def __init__(self, group: Group, work):
        self._group, self._work = group, work

    def wait(self) -> None:
        self._group._finish(self._work)


def _nccl_group(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta,
                device: torch.device):
    """An NCCL process group on `device`, its communicator made now (as gloo's is)."""
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    pg = dist.ProcessGroupNCCL(store, rank, size, options)
    pg.eager_connect_single_device(device)
    return pg


def own_connection(store: dist.Store) -> dist.Store:
    """A connection of its own to `store`'s server, with the same key prefixes.

    For a TCPStore (under any PrefixStores) this opens a new client socket (about
    a millisecond on loopback); stores that live in this process (HashStore) give
    themselves. The process group that joins through it keeps it open while it
    lives."""
    return store.clone()


def _secret_of(store: dist.Store) -> JobSecret | None:
    """The job's keys when `store` is the job's sealed store, else None (no token)."""
    return store.secret if isinstance(store, SealedStore) else None


def _shut_on_failure(shut, store: dist.Store, handshake) -> None:
    """Run `handshake`; when it fails, shut the channel down (`shut`) and re-raise. A
    `Tampered` is also reported to the coordinator through `store`, as a forged store
    value is, so that the job fails in one line naming it."""
    try:
        handshake()
    except BaseException as exc:
        with contextlib.suppress(RuntimeError):
            shut()
        if isinstance(exc, Tampered) and isinstance(store, SealedStore):
            store.report_tampered("channel handshake", exc)  # the store's own report
        raise


def _words(data: bytes) -> torch.Tensor:
    """`data` (a multiple of 8 bytes) as an int64 tensor of its own."""
    return torch.frombuffer(bytearray(data), dtype=torch.int64)


def _bytes(tensor: torch.Tensor) -> bytes:
    return tensor.cpu().numpy().tobytes()


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    # gloo prefixes its messages with the source location in brackets
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text[:200]
