"""The replica side of the parameter server: concurrent pull/push to all shards.

`PSClient` keeps one connection per shard, each driven by its own worker
thread, so the requests to different shards run concurrently and in the
background, while requests to one shard run in the order they were made (a
push issued before a pull is applied before that pull is served). Every call
returns a `Handle` at once; `Handle.wait()` blocks for the result and re-raises
the first worker exception with its traceback.

Buffers: `pull(flat)` writes into `flat` in the background and `push(grad)`
reads `grad` in the background, so the caller must not touch those tensors
until the handle is done (Downpour alternates two gradient buffers for this).

Example::

    with PSClient(store, layout, "replica0", transport="shm", timeout=30) as ps:
        versions = ps.pull(flat_params).wait()
        acks = ps.push(flat_grad, versions=versions).wait()   # [(version, staleness), ...]
"""

from __future__ import annotations

import socket
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch

from distbelief.ps import protocol as P
from distbelief.ps.layout import Layout
from distbelief.runtime.channel import Channel, ChannelClosed, SharedTensor, job_file
from distbelief.runtime.store import JobStore


class Handle:
    """The pending result of one request to every shard."""

    def __init__(self, futures: Sequence[Future]):
        self._futures = list(futures)

    def wait(self, timeout: float | None = None) -> list:
        """Block until every shard answered; return their results in shard order."""
        return [f.result(timeout) for f in self._futures]

    def done(self) -> bool:
        return all(f.done() for f in self._futures)


class ShardConnection:
    """One client's connection to one shard. Used by one thread at a time."""

    def __init__(self, store: JobStore, shard: int, numel: int, client: str, transport: str,
                 timeout: float):
        self.shard = shard
        self.numel = numel
        ticket = store.add(P.conn_counter(shard), 1)
        store.set_json(P.conn_key(shard, ticket), {"client": client, "transport": transport})
        self.channel = Channel(store.raw, P.channel_name(shard, ticket), 1, timeout)
        self.shm = transport == "shm"
        self.channel.send_header(P.HELLO, P.TRANSPORT_IDS[transport], numel)
        op, a, b, *_ = self.channel.recv_header()
        if op != P.OK:
            raise RuntimeError(f"shard {shard} refused the connection (code {a}, it holds {b} "
                               f"parameters, the client expected {numel})")
        if self.shm:
            self.params = SharedTensor(job_file(store.token, P.params_file(shard)), numel,
                                       torch.float32, create=False).tensor
            self.grad = SharedTensor(job_file(store.token, P.grad_file(shard, ticket)), numel,
                                     torch.float32, create=False).tensor
        self.channel.send_header(P.READY)

    def pull_into(self, out: torch.Tensor) -> int:
        """Copy the shard's slice into `out`; returns the slice's version."""
        self.channel.send_header(P.PULL)
        op, version, *_ = self.channel.recv_header()
        _expect_ok(op, self.shard, "pull")
        if self.shm:
            out.copy_(self.params)
            self.channel.send_header(P.DONE)
        else:
            self.channel.recv(out)
        return version

    def push_from(self, grad: torch.Tensor, fetched_version: int) -> tuple[int, int]:
        """Send a gradient for this slice; returns (new version, staleness)."""
        if self.shm:  # the gradient must be in place before the shard hears PUSH
            self.grad.copy_(grad)
            self.channel.send_header(P.PUSH, fetched_version)
        else:
            self.channel.send_header(P.PUSH, fetched_version)
            self.channel.send(grad.contiguous())
        op, version, staleness, *_ = self.channel.recv_header()
        _expect_ok(op, self.shard, "push")
        return version, staleness

    def set_from(self, values: torch.Tensor) -> int:
        """Overwrite the shard's slice (initial values, warm start from a checkpoint)."""
        self.channel.send_header(P.SET)
        op, version, *_ = self.channel.recv_header()
        _expect_ok(op, self.shard, "set")
        if self.shm:
            self.params.copy_(values)
            self.channel.send_header(P.DONE)
        else:
            self.channel.send(values.contiguous())
        return version

    def close(self) -> None:
        self.channel.send_header(P.BYE)
        self.channel.recv_header()


class PSClient:
    """Connections to every shard of a layout, each with its own worker thread."""

    def __init__(self, store: JobStore, layout: Layout, client: str, *, transport: str,
                 timeout: float):
        self.layout = layout
        self.timeout = timeout
        self.client = client
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix=f"{client}-shard{s}")
                       for s in range(layout.shards)]
        self._conns: list[ShardConnection | None] = [None] * layout.shards
        self.fetched_versions = [0] * layout.shards
        try:
            kinds = [resolve_transport(transport, store, s) for s in range(layout.shards)]
            Handle([pool.submit(self._connect, store, s, kinds[s])
                    for s, pool in enumerate(self._pools)]).wait(timeout)
        except BaseException:
            self._shutdown()
            raise

    def _connect(self, store: JobStore, shard: int, transport: str) -> None:
        self._conns[shard] = ShardConnection(store, shard, self.layout.size(shard), self.client,
                                             transport, self.timeout)

    def pull(self, flat: torch.Tensor) -> Handle:
        """Fetch every slice into `flat`; the handle gives each shard's version."""
        return Handle([self._pools[s].submit(self._pull_one, s, flat[a:b])
                       for s, (a, b) in enumerate(self.layout.ranges)])

    def _pull_one(self, shard: int, out: torch.Tensor) -> int:
        version = self._conns[shard].pull_into(out)
        self.fetched_versions[shard] = version
        return version

    def push(self, grad: torch.Tensor, versions: Sequence[int] | None = None) -> Handle:
        """Send every slice of `grad`; the handle gives (version, staleness) per shard.

        `versions` are the shard versions the gradient was computed against
        (default: those of the last completed pull).
        """
        versions = list(self.fetched_versions if versions is None else versions)
        return Handle([self._pools[s].submit(self._conns[s].push_from, grad[a:b], versions[s])
                       for s, (a, b) in enumerate(self.layout.ranges)])

    def set(self, flat: torch.Tensor) -> Handle:
        """Overwrite every shard's slice with `flat`'s."""
        return Handle([self._pools[s].submit(self._conns[s].set_from, flat[a:b])
                       for s, (a, b) in enumerate(self.layout.ranges)])

    def close(self) -> None:
        """Say goodbye to every shard still reachable, then stop the worker threads."""
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

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_transport(transport: str, store: JobStore, shard: int) -> str:
    """auto -> shm when the shard runs on this host, else gloo."""
    if transport != "auto":
        return transport
    info = store.get_json(f"members/shard/{shard}", what=f"shard {shard} to register")
    return "shm" if info.get("host") == socket.gethostname() else "gloo"


def _expect_ok(op: int, shard: int, what: str) -> None:
    if op != P.OK:
        raise RuntimeError(f"shard {shard} answered {what} with error op {op}")
