"""The replica side of the parameter server: concurrent pull/push to all shards.

`PSClient` keeps one connection per shard, each driven by its own worker
thread, so the requests to different shards run concurrently and in the
background, while requests to one shard run in the order they were made (a
push issued before a pull is applied before that pull is served). Every call
returns a `Handle` at once; `Handle.wait()` blocks for the result and re-raises
the first worker exception with its traceback.

Buffers: `pull(flat)` writes into `flat` in the background and `push(k)` reads
the client's gradient buffer k in the background (on shm, the shards read it in
place), so the caller must not touch those tensors until the handle is done
(Downpour alternates two gradient buffers for this).

Chunk layouts (`Layout.chunked`): a shard's slice is the concatenation of its
segments of the flat vector. A pull copies each segment out of the slice into
``flat[a:b]`` (on gloo through a staging buffer per connection); a push sends
the segments concatenated (gloo) or names them so that the shard gathers them
from the client's gradient buffer (shm). A shard holding one contiguous range
takes the same path as before: no extra copy.

Connecting: each connection is made within the client's timeout or fails with
`ShardUnreachable`, one line naming the client, the shard, its host and the
transport; a request that gets no answer within the timeout raises
`ShardTimeout` (a TimeoutError) naming both ends too. Both are `JobFailed`: in the
coordinator they end the job with that line.

Idle connections: a shard stops waiting for a client's next request after the
timeout (it cannot tell a quiet client from a dead one), so a connection left
idle for `IDLE_FRACTION` of the timeout (a coordinator between evaluations, a
replica held at a barrier) is closed and made anew before its next request.

Bytes: `transport_bytes()` counts the tensor bytes exchanged with the shards
(parameters pulled or set, gradients pushed or accumulated) by the transport
that carried them, "shm" or "gloo"; on shm a shard reads a pushed gradient in
place in the client's buffer, which counts as moved.

Example::

    with PSClient(store, layout, "replica0", transport="shm", timeout=30) as ps:
        versions = ps.pull(flat_params).wait()
        ps.grad_buffers[0].copy_(grad)                        # or let backward() write there
        acks = ps.push(0, versions=versions).wait()           # [(version, staleness), ...]
"""

from __future__ import annotations

import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Protocol, Sequence, Union

import torch

from distbelief.errors import JobFailed
from distbelief.ps import protocol as P
from distbelief.ps import vectors as V
from distbelief.ps.layout import Layout
from distbelief.runtime.channel import TENSOR_TAG, Channel, ChannelClosed
from distbelief.runtime.shm import SharedTensor, job_file
from distbelief.runtime.local import LocalChannel
from distbelief.runtime.store import JobStore

Slice = Union[torch.Tensor, list]
"""A shard's part of a flat vector: one view, or (chunk layout) the views of its segments."""


IDLE_FRACTION = 0.5
"""A connection idle for this fraction of the timeout is made anew before it is used."""


class Waitable(Protocol):
    """Work in flight that a request must wait for (`PSClient.push`'s `after`)."""

    def wait(self, timeout: float | None = None) -> object: ...


class ShardUnreachable(ChannelClosed, JobFailed):
    """A client could not connect to a shard within the timeout; the message, one line,
    names both ends. A `JobFailed` too: when the client is the coordinator, the job
    cannot start, and the command line prints this line alone."""


class ShardTimeout(TimeoutError, JobFailed):
    """A request to a shard got no answer within the timeout; the message names both ends."""


class Handle:
    """The pending result of one request to every shard.

    `labels` name each request's two ends ("replica1's pull from shard 0"), for the
    error when one gets no answer in time."""

    def __init__(self, futures: Sequence[Future], labels: Sequence[str] | None = None):
        self._futures = list(futures)
        self._labels = labels

    def wait(self, timeout: float | None = None) -> list:
        """Block until every shard answered; return their results in shard order.

        Raises `ShardTimeout` (a TimeoutError) naming the request and the shard when one
        did not answer within `timeout` seconds (the request goes on in the background)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        results = []
        for i, future in enumerate(self._futures):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                results.append(future.result(left))
            except FutureTimeout:
                what = self._labels[i] if self._labels else f"request {i}"
                raise ShardTimeout(f"{what} got no answer within {timeout:g} s "
                                   "(--timeout)") from None
        return results

    def done(self) -> bool:
        return all(f.done() for f in self._futures)


class ShardConnection:
    """One client's connection to one shard. Used by one thread at a time.

    The constructor blocks until the shard took the connection, at most about
    `timeout` seconds per step (join, handshake), then raises `ShardUnreachable`.
    `moved` counts the tensor bytes this connection exchanged (see the module doc).
    """

    def __init__(self, store: JobStore, shard: int, numel: int, client: str, transport: str,
                 timeout: float, grad_files: dict):
        self.shard = shard
        self.numel = numel
        self.shm = transport == "shm"
        self.moved = 0
        self.channel: Channel | LocalChannel | None = None
        try:
            self._open(store, client, transport, timeout, grad_files)
        except BaseException as exc:
            if self.channel is not None:
                self.channel.close()
            if isinstance(exc, ChannelClosed):
                raise ShardUnreachable(f"{client} could not connect to shard {shard} "
                                       f"({_where(store, shard, transport)}) over {transport} "
                                       f"within {timeout:g} s (--timeout): {exc}") from None
            raise
        if self.shm:
            self.params = SharedTensor(job_file(store.token, P.params_file(shard)), numel,
                                       torch.float32, create=False).tensor
        self._staging: torch.Tensor | None = None  # gloo, chunk layouts: the slice in one piece

    def _open(self, store: JobStore, client: str, transport: str, timeout: float,
              grad_files: dict) -> None:
        """Join the shard's channel and agree on size and transport (HELLO, OK, READY)."""
        shard, numel = self.shard, self.numel
        request = {"client": client, "transport": transport, **(grad_files if self.shm else {})}
        if self.shm:  # headers over the shard's Unix socket (see runtime/local.py)
            self.channel = LocalChannel.connect(job_file(store.token, P.socket_file(shard)),
                                                store.token, request, timeout)
        else:  # the channel joins over a store connection of its own (runtime/channel.py)
            ticket = store.add(P.conn_counter(shard), 1)
            store.set_json(P.conn_key(shard, ticket), request)
            self.channel = Channel(store.raw, P.channel_name(shard, ticket), 1, timeout)
        self.channel.send_header(P.HELLO, P.TRANSPORT_IDS[transport], numel)
        op, a, b, *_ = self.channel.recv_header()
        if op != P.OK:
            raise RuntimeError(f"shard {shard} refused the connection (code {a}, it holds {b} "
                               f"parameters, the client expected {numel})")
        self.channel.send_header(P.READY)

    def _stage(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(self.numel, dtype=torch.float32)
        return self._staging

    def _gather(self, pieces: Slice) -> torch.Tensor:
        """`pieces` as one contiguous tensor (a tensor as it is; segments into staging)."""
        if isinstance(pieces, torch.Tensor):
            return pieces.contiguous()
        return torch.cat(pieces, out=self._stage())

    def pull_into(self, out: Slice) -> int:
        """Copy the shard's slice into `out` (or its segments' views); returns its version."""
        if self.shm:
            self.channel.send_header(P.PULL)
            op, version, *_ = self.channel.recv_header()
            _expect_ok(op, self.shard, "pull")
            _scatter(self.params, out)
            self.channel.send_header(P.DONE)
            self.moved += self.numel * 4
            return version
        # the receive is posted before asking, so the parameters land straight in place
        whole = isinstance(out, torch.Tensor) and out.is_contiguous()
        posted = self.channel.post_recv(out if whole else self._stage())
        self.channel.send_header(P.PULL)
        op, version, *_ = self.channel.recv_header()
        _expect_ok(op, self.shard, "pull")
        posted.wait()
        if not whole:
            _scatter(self._staging, out)
        self.moved += self.numel * 4
        return version

    def push_from(self, grad: Slice, buffer: int,
                  fetched_version: int) -> tuple[int, int | None]:
        """Push a gradient slice; returns (new version, staleness), staleness None when the
        shard refused the gradient as non-finite (it counts it; training goes on).

        On shm the slice must already be in the client's gradient buffer `buffer`
        (the shard reads it there); on gloo `grad` is sent.
        """
        numel, dtype = _numel(grad), _dtype(grad)
        self.channel.send_header(P.PUSH, fetched_version, buffer, numel, P.dtype_code(dtype))
        op, version, staleness, *_ = self._send_after_go(grad)
        if op == P.OK or (op == P.ERR and version == P.ERR_NONFINITE):  # the shard read it
            self.moved += numel * dtype.itemsize
        if op == P.ERR and version == P.ERR_NONFINITE:
            return staleness, None
        if op == P.ERR and version == P.ERR_SHAPE:
            raise RuntimeError(f"shard {self.shard} refused the push: it takes {staleness} "
                               f"float32 values, the push had {numel} {dtype}")
        _expect_ok(op, self.shard, "push")
        return version, staleness

    def _send_after_go(self, grad: Slice) -> list[int]:
        """Over TCP, send `grad` once the shard says GO (its receive is posted; any other
        answer refuses it); the shard's answer to the request."""
        reply = self.channel.recv_header()
        if self.shm or reply[0] != P.GO:
            return reply
        self.channel.send(self._gather(grad), TENSOR_TAG)
        return self.channel.recv_header()

    def accumulate_from(self, grad: Slice, buffer: int, vector: int,
                        replace: bool = False) -> None:
        """Add a gradient slice into the shard's vector `vector` (no update rule), or with
        `replace` make the vector that slice."""
        self.channel.send_header(P.ACCUM, buffer, vector, int(replace))
        op, *_ = self._send_after_go(grad)
        if op != P.OK:
            raise RuntimeError(f"shard {self.shard} refused to accumulate into vector {vector}; "
                               "see the shard's log")
        self.moved += _numel(grad) * _dtype(grad).itemsize

    def vector(self, op: int, v: int, src: int, alpha: float) -> float:
        """Run one vector operation on the shard (see ps/vectors.py); its scalar result."""
        self.channel.send_header(P.VEC, op, v, src, V.float_bits(alpha))
        reply, result, *_ = self.channel.recv_header()
        if reply != P.OK:
            raise RuntimeError(f"shard {self.shard} refused vector operation "
                               f"{V.NAMES.get(op, op)} on vector {v} (source {src}); "
                               "see the shard's log")
        return V.bits_float(result)

    def set_from(self, values: Slice) -> int:
        """Overwrite the shard's slice (initial values, warm start from a checkpoint)."""
        self.channel.send_header(P.SET)
        op, version, *_ = self.channel.recv_header()
        _expect_ok(op, self.shard, "set")
        if self.shm and isinstance(values, torch.Tensor):
            self.params.copy_(values)
            self.channel.send_header(P.DONE)
        elif self.shm:
            torch.cat(values, out=self.params)
            self.channel.send_header(P.DONE)
        else:  # the shard posted its receive before it answered
            self.channel.send(self._gather(values), TENSOR_TAG)
        self.moved += self.numel * 4
        return version

    def close(self) -> None:
        self.channel.send_header(P.BYE)
        self.channel.recv_header()


class PSClient:
    """Connections to every shard of a layout, each with its own worker thread.

    A subset layout (`Layout.subset`, a model partition's own shards) connects to
    those shards only; indices (versions, results) follow the layout's order.

    `grad_buffers` are flat gradient vectors owned by the client. When a shard
    is reached over shm they live in /dev/shm and the shard reads its range of
    them directly, so pushing one of them copies nothing: write (or let
    backward() accumulate) into ``ps.grad_buffers[k]`` and call ``push(k)``.
    With `pinned` (a replica on a GPU) the buffers not in /dev/shm are allocated in
    pinned memory, so that a copy from the device into them is asynchronous (the
    replica pins the shared ones in place, see `runtime.device`).
    """

    def __init__(self, store: JobStore, layout: Layout, client: str, *, transport: str,
                 timeout: float, grad_buffers: int = 2, pinned: bool = False):
        self.layout = layout
        self.timeout = timeout
        self.client = client
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"{client}-shard{s}")
                       for s in range(layout.shards)]
        self._conns: list[ShardConnection | None] = [None] * layout.shards
        self._used = [0.0] * layout.shards  # when each connection last answered (monotonic)
        self._closed = False
        self.fetched_versions = [0] * layout.shards
        self.reconnects = 0  # connections made again to a restarted shard
        self._store = store
        self._grad_shm: list[SharedTensor] = []
        self._grad_names: list[str] = []
        self._generations = [0] * layout.shards
        self._moved_before = [0] * layout.shards  # by connections replaced since (reconnects)
        self._label_cache: dict[str, list[str]] = {}
        try:
            self._kinds = [resolve_transport(transport, store, s) for s in layout.shard_ids]
            self.grad_buffers = self._make_grad_buffers(store, grad_buffers, "shm" in self._kinds,
                                                        pinned)
            # no deadline here: each connection gives up by itself, with ShardUnreachable
            Handle([pool.submit(self._connect, i) for i, pool in enumerate(self._pools)]).wait()
        except BaseException:
            self._shutdown()
            raise

    def _make_grad_buffers(self, store: JobStore, count: int, shared: bool,
                           pinned: bool) -> list[torch.Tensor]:
        if not shared:
            return [torch.zeros(self.layout.numel, pin_memory=pinned) for _ in range(count)]
        instance = f"{os.getpid()}x{id(self):x}"
        self._grad_names = [P.grad_file(self.client, instance, k) for k in range(count)]
        self._grad_shm = [SharedTensor(job_file(store.token, name), self.layout.numel,
                                       torch.float32, create=True)
                          for name in self._grad_names]
        return [g.tensor for g in self._grad_shm]

    def _connect(self, index: int) -> None:
        shard = self.layout.shard_ids[index]
        self._generations[index] = self._store.try_get_json(f"shard{shard}/generation") or 0
        segments = self.layout.segments(index)
        where = ({"offset": segments[0][0]} if len(segments) == 1  # the shard maps one range
                 else {"segments": [list(seg) for seg in segments]})
        files = {"grad_files": self._grad_names, "grad_numel": self.layout.numel, **where}
        if self._conns[index] is not None:  # a restarted shard: keep the old one's count
            self._moved_before[index] += self._conns[index].moved
        self._conns[index] = ShardConnection(self._store, shard, self.layout.size(index),
                                             self.client, self._kinds[index], self.timeout,
                                             files)
        self._used[index] = time.monotonic()

    def _run(self, index: int, op):
        """`op(connection)` on shard `index` (on its worker thread); when the shard went away
        and a restarted one comes up (it restores its last checkpoint), connect to that and
        run `op` again. A connection idle too long is made anew first (`IDLE_FRACTION`)."""
        if time.monotonic() - self._used[index] > IDLE_FRACTION * self.timeout:
            self._renew(index)
        try:
            try:
                return op(self._conns[index])
            except ChannelClosed:
                if not self._await_restart(index):
                    raise
            self._connect(index)
            self.reconnects += 1
            return op(self._conns[index])
        finally:  # used, answered or not: a connection that just failed is not renewed
            self._used[index] = time.monotonic()

    def _renew(self, index: int) -> None:
        """Say goodbye on an idle connection (the shard may have dropped it already) and
        connect to the same shard again; nothing was in flight on it."""
        old = self._conns[index]
        try:
            old.close()
        except ChannelClosed:
            pass  # the shard stopped waiting for this client's requests
        if old.shm:
            old.channel.close()
        self._connect(index)

    def _await_restart(self, index: int) -> bool:
        """Wait (up to the timeout) for a newer generation of the shard; False if none came."""
        shard = self.layout.shard_ids[index]
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            generation = self._store.try_get_json(f"shard{shard}/generation") or 0
            if generation > self._generations[index]:
                return True
            if self._store.has("job/stop"):
                return False
            time.sleep(0.05)
        return False

    def transport_bytes(self) -> dict[str, int]:
        """Tensor bytes exchanged with the shards so far, by transport: {"shm": n, "gloo": m}.

        Exact once the client is closed; while requests run, a snapshot."""
        moved = {"shm": 0, "gloo": 0}
        for index, conn in enumerate(self._conns):
            moved[self._kinds[index]] += self._moved_before[index] + (conn.moved if conn else 0)
        return moved

    def _labels(self, what: str) -> list[str]:
        """Each shard's request named with both ends (for `Handle`'s timeout error)."""
        labels = self._label_cache.get(what)
        if labels is None:  # made once per kind of request: pulls and pushes are the hot path
            labels = [f"{self.client}'s {what} shard {s}" for s in self.layout.shard_ids]
            self._label_cache[what] = labels
        return labels

    def _slice(self, flat: torch.Tensor, shard: int) -> Slice:
        """Shard `shard`'s part of `flat`: one view, or its segments' views (chunk layout)."""
        segments = self.layout.segments(shard)
        if len(segments) == 1:
            a, b = segments[0]
            return flat[a:b]
        return [flat[a:b] for a, b in segments]

    def pull(self, flat: torch.Tensor) -> Handle:
        """Fetch every slice into `flat`; the handle gives each shard's version."""
        return Handle([self._pools[s].submit(self._pull_one, s, self._slice(flat, s))
                       for s in range(self.layout.shards)], self._labels("pull from"))

    def _pull_one(self, shard: int, out: Slice) -> int:
        version = self._run(shard, lambda conn: conn.pull_into(out))
        self.fetched_versions[shard] = version
        return version

    def push(self, buffer: int, versions: Sequence[int] | None = None, *,
             after: Waitable | None = None) -> Handle:
        """Push gradient buffer `buffer` to every shard; the handle gives (version, staleness).

        `versions` are the shard versions the gradient was computed against
        (default: those of the last completed pull). `after`: what must finish before
        the buffer is read (a copy from a GPU into it, `runtime.device.Copy`); each
        shard's thread waits for it (up to the timeout), the caller does not. Do not
        write to the buffer until the handle is done.
        """
        if not 0 <= buffer < len(self.grad_buffers):
            raise IndexError(f"gradient buffer {buffer} does not exist "
                             f"(the client has {len(self.grad_buffers)})")
        versions = list(self.fetched_versions if versions is None else versions)
        grad = self.grad_buffers[buffer]
        return Handle([self._pools[s].submit(self._run, s, _after(after, self.timeout,
                                                                  _call("push_from",
                                                                        self._slice(grad, s),
                                                                        buffer, versions[s])))
                       for s in range(self.layout.shards)], self._labels("push to"))

    def accumulate(self, buffer: int, vector: int, replace: bool = False) -> Handle:
        """Add gradient buffer `buffer` into every shard's vector `vector` (Sandblaster), or
        with `replace` overwrite the vector with it (ADMM's contributions).

        The shards apply no rule; do not write to the buffer until the handle is done.
        """
        if not 0 <= buffer < len(self.grad_buffers):
            raise IndexError(f"gradient buffer {buffer} does not exist "
                             f"(the client has {len(self.grad_buffers)})")
        grad = self.grad_buffers[buffer]
        return Handle([self._pools[s].submit(self._run, s, _call("accumulate_from",
                                                                 self._slice(grad, s), buffer,
                                                                 vector, replace))
                       for s in range(self.layout.shards)], self._labels("accumulate on"))

    def vector(self, op: int, v: int, src: int = 0, alpha: float = 0.0) -> Handle:
        """Run one vector operation on every shard; the handle gives each shard's scalar."""
        return Handle([self._pools[s].submit(self._run, s, _call("vector", op, v, src, alpha))
                       for s in range(self.layout.shards)], self._labels("vector operation on"))

    def set(self, flat: torch.Tensor) -> Handle:
        """Overwrite every shard's slice with `flat`'s."""
        return Handle([self._pools[s].submit(self._run, s, _call("set_from", self._slice(flat, s)))
                       for s in range(self.layout.shards)], self._labels("set of"))

    def close(self) -> None:
        """Say goodbye to every shard still reachable, then stop the worker threads.

        Idempotent: a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            futures = [pool.submit(conn.close) for pool, conn in zip(self._pools, self._conns)
                       if conn is not None]
            for f in futures:
                try:
                    f.result(self.timeout)
                except ChannelClosed:
                    pass
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for conn in self._conns:  # a shard's thread for a local connection ends at once
            if conn is not None and conn.shm:
                conn.channel.close()
        # kept until now so that a restarted shard could map them again
        for shm in self._grad_shm:
            shm.unlink()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scatter(src: torch.Tensor, out: Slice) -> None:
    """Copy `src` into `out`: one tensor, or pieces that take its consecutive parts."""
    if isinstance(out, torch.Tensor):
        out.copy_(src)
        return
    start = 0
    for piece in out:
        piece.copy_(src[start: start + piece.numel()])
        start += piece.numel()


def _numel(part: Slice) -> int:
    return part.numel() if isinstance(part, torch.Tensor) else sum(p.numel() for p in part)


def _dtype(part: Slice) -> torch.dtype:
    return part.dtype if isinstance(part, torch.Tensor) else part[0].dtype


def _call(method: str, *args):
    """A function calling `method` of a connection with `args`."""
    return lambda conn: getattr(conn, method)(*args)


def _after(ready: Waitable | None, timeout: float, op):
    """`op`, once `ready` (None: at once) is done."""
    if ready is None:
        return op

    def run(conn):
        ready.wait(timeout)
        return op(conn)
    return run


def resolve_transport(transport: str, store: JobStore, shard: int) -> str:
    """auto -> shm when the shard runs on this host, else gloo."""
    if transport != "auto":
        return transport
    info = store.get_json(f"members/shard/{shard}", what=f"shard {shard} to register")
    return "shm" if info.get("host") == socket.gethostname() else "gloo"


def _where(store: JobStore, shard: int, transport: str) -> str:
    """Where shard `shard` runs, as registered: "host h, pid p" (for an error message)."""
    try:
        info = store.try_get_json(f"members/shard/{shard}") or {}
    except Exception:  # noqa: BLE001 - the store itself may be what failed
        info = {}
    if not info:
        return "not registered in the job store"
    where = f"host {info.get('host')}, pid {info.get('pid')}"
    if transport == "shm":
        where += f", socket {job_file(store.token, P.socket_file(shard))}"
    return where


def _expect_ok(op: int, shard: int, what: str) -> None:
    if op != P.OK:
        raise RuntimeError(f"shard {shard} answered {what} with error op {op}")
