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

import copy
import logging
import threading
import time
from typing import Callable

import torch

from distbelief.config import OptimizerConfig
from distbelief.ps import protocol as P
from distbelief.ps.rules import all_finite, make_rule
from distbelief.ps.vectors import (PARAMS, ShardVectors, VectorError, bits_float,
                                   float_bits)
from distbelief.runtime.channel import TENSOR_TAG, Channel, ChannelClosed, ChannelTimeout
from distbelief.runtime.shm import SharedTensor, job_file
from distbelief.runtime.local import LocalListener
from distbelief.runtime.store import JobStore

log = logging.getLogger(__name__)


class ShardServer:
    """Holds one slice; applies pushes with its rule; serves pulls. See module doc."""

    def __init__(self, store: JobStore, *, shard: int, numel: int, rule_cfg: OptimizerConfig,
                 timeout: float, on_nonfinite: str = "skip", total_updates: int | None = None):
        self.store = store
        self.shard = shard
        self.numel = numel
        self.timeout = timeout
        self._params_shm = SharedTensor(job_file(store.token, P.params_file(shard)), numel,
                                        torch.float32, create=True)
        self.params = self._params_shm.tensor
        # shm clients connect here; gloo clients through the store's connection requests
        self._listener = LocalListener(job_file(store.token, P.socket_file(shard)), timeout)
        # Sandblaster's shards apply no rule: L-BFGS moves them through vector operations
        # `total_updates`: the pushes it will apply in the job, the clock of --lr-schedule
        self.rule = (make_rule(rule_cfg, self.params, total=total_updates)
                     if rule_cfg.rule is not None else None)
        self.vectors = ShardVectors(self.params)
        self.lock = threading.Lock()
        self.version = 0
        self.pushes = 0
        self.pulls = 0
        self.clients_lost: list[str] = []
        self.on_nonfinite = on_nonfinite
        self.nonfinite = 0  # pushes refused because they held NaN or inf
        self.clients: set[str] = set()  # every client that connected (partition isolation)
        self.errors: list[str] = []
        self._threads: list[threading.Thread] = []
        self._stats_lock = threading.Lock()

    # ---- the accept loop ------------------------------------------------------

    def serve(self, stop: Callable[[], bool], poll: float = 0.02,
              tick: Callable[[], None] | None = None, skip_tickets: int = 0) -> None:
        """Accept connections until `stop()` is true, calling `tick()` (if given) between
        polls, e.g. to write a requested checkpoint. A restarted shard skips the first
        `skip_tickets` connection requests (made to its predecessor). Blocks; always
        cleans up.

        The loop never waits for one client: a gloo client takes its ticket, then
        writes its request, and a ticket whose request is not there yet is looked at
        again on the next pass (dropped, and counted in the errors, after the
        timeout: the client died in between)."""
        seen = skip_tickets
        pending: dict[int, float] = {}  # tickets taken, request not read yet -> first seen
        try:
            while not stop():
                if tick is not None:
                    tick()
                count = self.store.add(P.conn_counter(self.shard), 0)
                while seen < count:
                    seen += 1
                    pending[seen] = time.monotonic()
                for ticket in sorted(pending):
                    self._take_request(ticket, pending)
                local = self._listener.accept(poll)  # waits up to `poll` for an shm client
                if local is not None:
                    self._start(f"local{len(self._threads)}", self._open_local, local)
        finally:
            self._listener.close()
            self._params_shm.unlink()
            # let every connection thread finish tearing down its channel: a process
            # that exits while gloo still closes a pair aborts
            for thread in self._threads:
                thread.join(5)

    def _take_request(self, ticket: int, pending: dict[int, float]) -> None:
        """Serve gloo ticket `ticket` if its request is written; drop it after the timeout."""
        request = self.store.try_get_json(P.conn_key(self.shard, ticket))
        if request is not None:
            del pending[ticket]
            self._start(f"conn{ticket}", self._open_gloo, ticket, request)
        elif time.monotonic() - pending[ticket] > self.timeout:
            del pending[ticket]
            message = f"connection request {ticket} never came (the client died?)"
            log.warning("shard %d: %s", self.shard, message)
            with self._stats_lock:
                self.errors.append(message)

    def _start(self, name: str, opener: Callable, *args) -> None:
        """Serve one client in a thread of its own; `opener(*args)` -> (channel, request)."""
        thread = threading.Thread(target=self._serve_client, args=(opener, args),
                                  name=f"shard{self.shard}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _open_gloo(self, ticket: int, request: dict) -> tuple[Channel, dict]:
        # the channel joins over a store connection of its own (runtime/channel.py), so the
        # accept loop and the other connection threads never wait behind its rendezvous
        return Channel(self.store.raw, P.channel_name(self.shard, ticket), 0,
                       self.timeout), request

    def _open_local(self, channel) -> tuple:
        return channel, channel.read_request(self.store.token)

    def save(self, path) -> dict:
        """Write this shard's slice, rule state and counts to `path` (atomically); returns
        the counts written. A consistent snapshot: taken under the shard's lock."""
        from distbelief.checkpoint import write_atomic

        with self.lock:
            state = {"params": self.params.clone(), "version": self.version,
                     "pushes": self.pushes,
                     # consensus ADMM's contributions not yet averaged (none for the others)
                     "vectors": {v: t.clone() for v, t in self.vectors.vectors.items()
                                 if v != PARAMS},
                     "rule": copy.deepcopy(self.rule.state_dict()) if self.rule else None}
        write_atomic(path, state)
        return {"version": state["version"], "pushes": state["pushes"]}

    def restore(self, state: dict) -> None:
        """Continue from a state written by `save` (before serving anyone)."""
        if state["params"].numel() != self.numel:
            raise ValueError(f"checkpoint holds {state['params'].numel()} values, shard "
                             f"{self.shard} {self.numel}")
        with self.lock:
            self.params.copy_(state["params"])
            self.version = int(state["version"])
            self.pushes = int(state["pushes"])
            for v, t in (state.get("vectors") or {}).items():
                self.vectors.vectors[int(v)] = t.clone()
            if self.rule is not None and state.get("rule") is not None:
                self.rule.load_state_dict(state["rule"])

    def stats(self) -> dict:
        with self._stats_lock:
            return {"shard": self.shard, "version": self.version, "pushes": self.pushes,
                    "pulls": self.pulls, "clients_lost": list(self.clients_lost),
                    "clients": sorted(self.clients), "nonfinite": self.nonfinite,
                    "errors": list(self.errors)}

    # ---- one client -------------------------------------------------------------

    def _serve_client(self, opener: Callable, args: tuple) -> None:
        try:
            channel, request = opener(*args)
        except ChannelClosed as exc:  # never joined, or not one of the job's processes
            log.warning("shard %d: refused a connection (%s)", self.shard, exc)
            with self._stats_lock:
                self.errors.append(f"refused a connection: {exc}")
            return
        client = str(request.get("client"))
        try:
            grads = self._handshake(channel, request)
            if grads is None:
                return
            with self._stats_lock:
                self.clients.add(client)
            shm = request.get("transport") == "shm"
            while True:
                try:
                    op, a, b, c, d, _ = channel.recv_header()
                except ChannelTimeout:
                    # a quiet client, not a lost one: it makes a new connection when it
                    # next needs the shard (`PSClient`: idle connections are renewed)
                    log.info("shard %d: %s sent nothing for the timeout; its connection is "
                             "closed until it needs another", self.shard, client)
                    return
                if op == P.PUSH:
                    self._push(channel, grads, client, fetched_version=a, buffer=b, numel=c,
                               dtype=d, shm=shm)
                elif op == P.PULL:
                    self._pull(channel, shm=shm)
                elif op == P.SET:
                    self._set(channel, shm=shm)
                elif op == P.VEC:
                    self._vector(channel, op=a, v=b, src=c, alpha=bits_float(d))
                elif op == P.ACCUM:
                    self._accumulate(channel, grads, buffer=a, v=b, replace=bool(c), shm=shm)
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
        finally:
            channel.close()  # the client's pending and later requests fail at once

    def _handshake(self, channel: Channel, request: dict) -> list[torch.Tensor] | None:
        """Agree on size and transport; returns this connection's gradient buffers."""
        op, transport, numel, _, _, _ = channel.recv_header()
        if op != P.HELLO:
            raise RuntimeError(f"expected HELLO, got op {op}")
        if numel != self.numel:
            channel.send_header(P.ERR, P.ERR_NUMEL, self.numel)
            return None
        if transport == P.TRANSPORT_SHM:
            grads = self._map_client_grads(request)
        elif transport == P.TRANSPORT_GLOO:
            grads = [torch.empty(self.numel, dtype=torch.float32)]
        else:
            channel.send_header(P.ERR, P.ERR_TRANSPORT, 0)
            return None
        channel.send_header(P.OK, self.numel, self.version)
        channel.recv_header()  # READY
        return grads

    def _map_client_grads(self, request: dict) -> list:
        """This shard's range of each of the client's gradient files (chunk layout: its
        segments, gathered when a push is read)."""
        if "segments" in request:
            return self._map_client_segments(request)
        names, total, offset = request["grad_files"], int(request["grad_numel"]), int(request["offset"])
        if not all(P.valid_file_name(n) for n in names) or offset + self.numel > total:
            raise RuntimeError(f"bad gradient buffers in request {request}")
        return [SharedTensor(job_file(self.store.token, name), total, torch.float32,
                             create=False).tensor[offset: offset + self.numel]
                for name in names]

    def _map_client_segments(self, request: dict) -> list[Segments]:
        names, total = request["grad_files"], int(request["grad_numel"])
        segments = [(int(a), int(b)) for a, b in request["segments"]]
        if (not all(P.valid_file_name(n) for n in names)
                or not all(0 <= a < b <= total for a, b in segments)
                or sum(b - a for a, b in segments) != self.numel):
            raise RuntimeError(f"bad gradient buffers in request {request}")
        gathered = torch.empty(self.numel, dtype=torch.float32)  # one per connection
        views = [SharedTensor(job_file(self.store.token, name), total, torch.float32,
                              create=False).tensor for name in names]
        return [Segments([t[a:b] for a, b in segments], gathered) for t in views]

    def _push(self, channel: Channel, grads: list[torch.Tensor], client: str, *,
              fetched_version: int, buffer: int, numel: int, dtype: int, shm: bool) -> None:
        """Apply one push (or refuse it, and say why)."""
        if numel != self.numel or dtype != P.DTYPES["float32"]:
            message = (f"refused a push from {client}: {numel} {P.dtype_name(dtype)} values, "
                       f"but this shard takes {self.numel} float32")
            log.error("shard %d: %s", self.shard, message)
            with self._stats_lock:
                self.errors.append(message)
            # over TCP the payload waits for the go-ahead, so nothing is on its way
            channel.send_header(P.ERR, P.ERR_SHAPE, self.numel)
            return
        grad = self._incoming_grad(channel, grads, buffer, shm)
        if self.rule is None:  # Sandblaster's shards: gradients arrive through ACCUM
            log.warning("shard %d: push refused: this shard applies no update rule", self.shard)
            channel.send_header(P.ERR, P.ERR_NO_RULE)
            return
        if not all_finite(grad):
            with self._stats_lock:
                self.nonfinite += 1
                first = self.nonfinite == 1
            if first:
                log.warning("shard %d: refused a non-finite gradient from %s", self.shard, client)
            if self.on_nonfinite == "stop":
                self.store.set_json("job/nonfinite", {"shard": self.shard, "client": client})
            channel.send_header(P.ERR, P.ERR_NONFINITE, self.version)
            return
        with self.lock:
            # clamped: after a restart from a checkpoint a client may hold newer versions
            staleness = max(0, self.version - fetched_version)
            self.rule.apply(grad)
            self.version += 1
            version = self.version
        with self._stats_lock:
            self.pushes += 1
        channel.send_header(P.OK, version, staleness)

    def _vector(self, channel: Channel, *, op: int, v: int, src: int, alpha: float) -> None:
        try:
            with self.lock:
                result = self.vectors.run(op, v, src, alpha)
        except VectorError as exc:
            log.warning("shard %d: %s", self.shard, exc)
            channel.send_header(P.ERR, P.ERR_VECTOR)
            return
        channel.send_header(P.OK, float_bits(result))

    def _accumulate(self, channel: Channel, grads: list[torch.Tensor], *, buffer: int, v: int,
                    replace: bool, shm: bool) -> None:
        grad = self._incoming_grad(channel, grads, buffer, shm)
        try:
            with self.lock:
                self.vectors.accumulate(v, grad, replace=replace)
        except VectorError as exc:
            log.warning("shard %d: %s", self.shard, exc)
            channel.send_header(P.ERR, P.ERR_VECTOR)
            return
        with self._stats_lock:
            self.pushes += 1
        channel.send_header(P.OK)

    def _incoming_grad(self, channel: Channel, grads: list[torch.Tensor], buffer: int,
                       shm: bool) -> torch.Tensor:
        """The pushed gradient: the client's shm buffer in place, or received over TCP
        (the receive posted before the go-ahead, so gloo need not stage it)."""
        if not shm:
            posted = channel.post_recv(grads[0])
            channel.send_header(P.GO)
            posted.wait()
            return grads[0]
        if not 0 <= buffer < len(grads):
            raise RuntimeError(f"push names gradient buffer {buffer}; there are {len(grads)}")
        grad = grads[buffer]
        return grad.gather() if isinstance(grad, Segments) else grad

    def _pull(self, channel: Channel, shm: bool) -> None:
        with self.lock:
            channel.send_header(P.OK, self.version)
            if shm:
                channel.recv_header()  # DONE: the client has copied the slice
            else:  # into the receive the client posted before asking
                channel.send(self.params, TENSOR_TAG)
        with self._stats_lock:
            self.pulls += 1

    def _set(self, channel: Channel, shm: bool) -> None:
        with self.lock:
            if shm:
                channel.send_header(P.OK, self.version)
                channel.recv_header()
            else:
                posted = channel.post_recv(self.params)
                channel.send_header(P.OK, self.version)
                posted.wait()


class Segments:
    """A client's shm gradient buffer seen through a chunk layout's segments.

    `gather()` concatenates them into `out`, a buffer the connection's Segments
    share: one connection reads one push at a time, so one buffer is enough."""

    def __init__(self, views: list[torch.Tensor], out: torch.Tensor):
        self.views = views
        self.out = out

    def gather(self) -> torch.Tensor:
        return torch.cat(self.views, out=self.out)

