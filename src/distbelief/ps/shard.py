"""A parameter shard: one slice of the flat parameter vector and its update rule.

The shard serves every client (replicas, the coordinator) on its own channel,
each in its own thread. Pushes are applied with the shard's rule under one lock,
so updates to the slice are serialised and counted: the version is the number of
pushes applied, and a push's staleness is how many other pushes were applied
since the parameters it was computed on were fetched.

A client that dies breaks only its own channel: its thread records the loss and
ends; the others go on.

Example (inside a shard process)::

    server = ShardServer(store, shard=0, numel=layout.size(0), rule_cfg=cfg.optimizer)
    server.serve(stop=lambda: store.has("job/stop"))
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from distbelief.config import OptimizerConfig
from distbelief.ps import protocol as P
from distbelief.ps.rules import make_rule
from distbelief.runtime.channel import Channel, ChannelClosed, SharedTensor, job_file
from distbelief.runtime.store import JobStore

log = logging.getLogger(__name__)


class ShardServer:
    """Holds one slice; applies pushes with its rule; serves pulls. See module doc."""

    def __init__(self, store: JobStore, *, shard: int, numel: int, rule_cfg: OptimizerConfig,
                 timeout: float):
        self.store = store
        self.shard = shard
        self.numel = numel
        self.timeout = timeout
        self._params_shm = SharedTensor(job_file(store.token, P.params_file(shard)), numel,
                                        torch.float32, create=True)
        self.params = self._params_shm.tensor
        self.rule = make_rule(rule_cfg, self.params)
        self.lock = threading.Lock()
        self.version = 0
        self.pushes = 0
        self.pulls = 0
        self.clients_lost: list[str] = []
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []
        self._stats_lock = threading.Lock()

    # ---- the accept loop ------------------------------------------------------

    def serve(self, stop: Callable[[], bool], poll: float = 0.02) -> None:
        """Accept connections until `stop()` is true. Blocks; always cleans up."""
        seen = 0
        try:
            while not stop():
                count = self.store.add(P.conn_counter(self.shard), 0)
                while seen < count:
                    seen += 1
                    request = self.store.get_json(P.conn_key(self.shard, seen),
                                                  timeout=self.timeout, what="connection request")
                    thread = threading.Thread(target=self._serve_client,
                                              args=(seen, str(request["client"])),
                                              name=f"shard{self.shard}-conn{seen}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
                time.sleep(poll)
        finally:
            self._params_shm.unlink()

    def stats(self) -> dict:
        with self._stats_lock:
            return {"shard": self.shard, "version": self.version, "pushes": self.pushes,
                    "pulls": self.pulls, "clients_lost": list(self.clients_lost),
                    "errors": list(self.errors)}

    # ---- one client -------------------------------------------------------------

    def _serve_client(self, ticket: int, client: str) -> None:
        try:
            channel = Channel(self.store.raw, P.channel_name(self.shard, ticket), 0, self.timeout)
            grad = self._handshake(channel, ticket)
            if grad is None:
                return
            while True:
                op, a, b, c, _, _ = channel.recv_header()
                if op == P.PUSH:
                    self._push(channel, grad, fetched_version=a)
                elif op == P.PULL:
                    self._pull(channel, shm=grad.is_shared_file)
                elif op == P.SET:
                    self._set(channel, shm=grad.is_shared_file)
                elif op == P.BYE:
                    channel.send_header(P.OK)
                    return
                else:
                    raise RuntimeError(f"unknown op {op} from {client}")
        except ChannelClosed as exc:
            log.warning("shard %d: lost client %s (%s)", self.shard, client, exc)
            with self._stats_lock:
                self.clients_lost.append(client)
        except Exception as exc:  # a broken client must not take the shard down
            log.exception("shard %d: error serving %s", self.shard, client)
            with self._stats_lock:
                self.errors.append(f"{client}: {exc}")

    def _handshake(self, channel: Channel, ticket: int):
        op, transport, numel, _, _, _ = channel.recv_header()
        if op != P.HELLO:
            raise RuntimeError(f"expected HELLO, got op {op}")
        if numel != self.numel:
            channel.send_header(P.ERR, P.ERR_NUMEL, self.numel)
            return None
        if transport == P.TRANSPORT_SHM:
            grad_shm = SharedTensor(job_file(self.store.token, P.grad_file(self.shard, ticket)),
                                    self.numel, torch.float32, create=True)
            try:
                channel.send_header(P.OK, self.numel, self.version)
                channel.recv_header()  # READY: the client has mapped both files
            finally:
                grad_shm.unlink()
            return _SharedGrad(grad_shm.tensor)
        if transport == P.TRANSPORT_GLOO:
            channel.send_header(P.OK, self.numel, self.version)
            channel.recv_header()
            return _SharedGrad(torch.empty(self.numel, dtype=torch.float32), shared=False)
        channel.send_header(P.ERR, P.ERR_TRANSPORT, 0)
        return None

    def _push(self, channel: Channel, grad: _SharedGrad, fetched_version: int) -> None:
        if not grad.is_shared_file:
            channel.recv(grad.tensor)
        with self.lock:
            staleness = self.version - fetched_version
            self.rule.apply(grad.tensor)
            self.version += 1
            version = self.version
        with self._stats_lock:
            self.pushes += 1
        channel.send_header(P.OK, version, staleness)

    def _pull(self, channel: Channel, shm: bool) -> None:
        with self.lock:
            channel.send_header(P.OK, self.version)
            if shm:
                channel.recv_header()  # DONE: the client has copied the slice
            else:
                channel.send(self.params)
        with self._stats_lock:
            self.pulls += 1

    def _set(self, channel: Channel, shm: bool) -> None:
        with self.lock:
            channel.send_header(P.OK, self.version)
            if shm:
                channel.recv_header()
            else:
                channel.recv(self.params)


class _SharedGrad:
    """The per-connection gradient buffer: in /dev/shm (shm) or private (gloo)."""

    def __init__(self, tensor: torch.Tensor, shared: bool = True):
        self.tensor = tensor
        self.is_shared_file = shared
