"""The replica side of the data servers: a prefetched stream of ready batches.

`DataClient` connects replica r to data server r % D (the next one when that
one is not up) through the store, grants it ``prefetch`` credits and receives
batches in a background thread, so the next batch is usually there when the
training loop asks for it. When its server dies or stops answering, the client
connects to another live server or to the dead one's replacement (the
coordinator starts one) and asks for the stream from the first step it has not
received; the batches are a pure function of (seed, replica, step), so
training sees exactly the same data. A server counts as alive while its
heartbeat counter moves, and a server beats only while its accept loop makes
progress (``--progress-timeout``, `runtime.context.Heartbeat`): one whose main
thread hangs is failed over like a dead one, though its process lives on. Every wait is bounded by `timeout`: when
no server can serve, `next` raises `DataUnavailable` naming the data server.

Blocking: `next` blocks until the batch is there (or the timeout); the client
is used by one thread (the training loop). Example::

    with DataClient(store, replica=0, servers=2, start=0, total=100, input_shape=(1, 40),
                    target_shape=(), target_dtype=torch.int64, prefetch=4,
                    timeout=60) as client:
        for step in range(100):
            xb, yb = client.next()
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Callable, ContextManager

import torch

from distbelief.data import protocol as P
from distbelief.runtime.channel import Channel, ChannelClosed
from distbelief.runtime.context import Liveness, beat_key
from distbelief.runtime.store import JobStore

log = logging.getLogger(__name__)

FRESH_HEARTBEAT = 5.0  # seconds of this replica's clock: a server that beat since is alive
# (and its accept loop advanced within --progress-timeout: a stalled one stops beating)


class DataUnavailable(RuntimeError):
    """No data server could serve the replica's next batch within the timeout."""


class DataClient:
    """Replica `replica`'s batches, steps start..total-1, from the job's data servers.

    Each batch is (x float32 ``(n, *input_shape)``, y ``(n, *target_shape)`` of
    ``target_dtype``): the shapes from the job description, the dtype the job's
    task's (default: class ids, int64 ``(n,)``).
    """

    def __init__(self, store: JobStore, *, replica: int, servers: int, start: int, total: int,
                 input_shape: tuple[int, ...], prefetch: int, timeout: float,
                 target_shape: tuple[int, ...] = (), target_dtype: torch.dtype = torch.int64,
                 waiting: Callable[[], ContextManager[None]] = contextlib.nullcontext):
        """`waiting`: the replica's watchdog's wait marker (`RoleContext.waiting`), entered
        while `next` waits for a server: a slow or lost server is no stall of the replica."""
        # a channel joins over a store connection of its own (runtime/channel.py), so the
        # replica's heartbeat and reports never wait behind a join
        self.store, self.replica, self.servers = store, replica, servers
        self.step, self.total = start, total
        self.input_shape, self.prefetch, self.timeout = tuple(input_shape), prefetch, timeout
        self.target_shape, self.target_dtype = tuple(target_shape), target_dtype
        self._waiting = waiting
        self.wait_seconds = 0.0
        self.failovers = 0  # connections lost and made again to another (or a new) server
        self.served_by: dict[int, int] = {}  # batches received, by data server
        self._conn: _Stream | None = None
        self._failed: set[tuple[int, int]] = set()  # (server, generation) that broke
        self._last_error = ""
        # judged on this process's clock by the servers' heartbeat counters: hosts' clocks
        # need not agree
        self._liveness = Liveness(lambda name: self.store.add(beat_key(name), 0),
                                  FRESH_HEARTBEAT)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the next step. Blocks at most `timeout` seconds; raises
        DataUnavailable naming the data server when none could serve it."""
        if self.step >= self.total:
            raise IndexError(f"replica {self.replica} asked for step {self.step + 1} of "
                             f"{self.total}")
        began = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        try:
            with self._waiting():  # for a server: a slow or lost one is no stall of ours
                return self._receive(deadline)
        finally:
            self.wait_seconds += time.perf_counter() - began

    def _receive(self, deadline: float) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._conn is None:
                self._conn = self._connect(deadline)
            item = self._conn.get(max(0.0, deadline - time.monotonic()))
            if isinstance(item, tuple):
                return self._take(*item)
            self._drop(item or f"sent nothing for {self.timeout:g} s (--timeout)")

    def _take(self, step: int, xb: torch.Tensor, yb: torch.Tensor):
        if step != self.step:
            raise RuntimeError(f"data server {self._conn.server} sent step {step + 1} when "
                               f"replica {self.replica} expected {self.step + 1} (a bug)")
        self.step += 1
        self.served_by[self._conn.server] = self.served_by.get(self._conn.server, 0) + 1
        if self.step < self.total:
            self._conn.grant(1)
        else:
            self._conn.finish()
            self._conn = None
        return xb, yb

    def _drop(self, reason: str) -> None:
        """The connection broke (or stalled): forget it and fail over."""
        conn, self._conn = self._conn, None
        self._failed.add((conn.server, conn.generation))
        self._last_error = f"data server {conn.server} {reason}"
        log.warning("replica %d: %s at step %d; connecting again", self.replica,
                    self._last_error, self.step + 1)
        conn.close()
        self.failovers += 1

    def _candidates(self) -> list[tuple[int, int]]:
        """(server, generation) that look alive, the preferred one (r % D) first."""
        found = []
        for i in range(self.servers):
            d = (self.replica + i) % self.servers
            generation = self.store.try_get_json(P.generation_key(d))
            name = f"dataserver/{d}"
            if (generation is None or (d, generation) in self._failed
                    or self._liveness.count(name) == 0 or self._liveness.lost(name)):
                continue
            found.append((d, generation))
        return found

    def _connect(self, deadline: float) -> _Stream:
        while time.monotonic() < deadline:
            for d, generation in self._candidates():
                try:
                    return self._open(d, generation)
                except ChannelClosed as exc:
                    self._failed.add((d, generation))
                    host = (self.store.try_get_json(f"members/dataserver/{d}") or {}).get("host")
                    self._last_error = f"data server {d} on host {host} did not connect ({exc})"
            time.sleep(0.05)
        last = self._last_error or f"data server {self.replica % self.servers} never came up"
        raise DataUnavailable(
            f"replica {self.replica}: no data server could serve step {self.step + 1} within "
            f"{self.timeout:g} s (--timeout); last: {last}; see its log "
            f"(logs/dataserver<id>.log in the run directory)")

    def _open(self, server: int, generation: int) -> _Stream:
        """A stream from `server`'s `generation`, given up as soon as that generation is
        replaced: a server whose accept loop hangs never joins the stream's channels, and
        their join would otherwise hold this replica for the whole --timeout while the
        server's replacement is up. Blocks; ChannelClosed when it cannot connect."""
        outcome: dict = {}
        lock = threading.Lock()

        def attempt() -> None:
            try:
                stream = _Stream(self, server, generation, store=connecting)
            except BaseException as exc:  # reported to the waiting thread
                connecting.close()
                with lock:
                    outcome["error"] = exc
                return
            with lock:
                if not outcome.get("abandoned"):
                    outcome["stream"] = stream
                    return
            stream.close()  # connected after all, but too late: the replacement serves

        # a connection of the stream's own (the store is not shared between threads; the
        # stream's channels keep it, and closing the stream closes it)
        connecting = self.store.clone()
        thread = threading.Thread(target=attempt, daemon=True,
                                  name=f"replica{self.replica}-connect")
        thread.start()
        while True:
            thread.join(0.1)
            with lock:
                if "stream" in outcome:
                    return outcome["stream"]
                if "error" in outcome:
                    raise outcome["error"]
                if self.store.try_get_json(P.generation_key(server)) != generation:
                    outcome["abandoned"] = True
                    raise ChannelClosed(f"generation {generation} was replaced while this "
                                        "replica connected")

    def stats(self) -> dict:
        return {"data_seconds": self.wait_seconds, "data_failovers": self.failovers,
                "data_served_by": {str(d): n for d, n in sorted(self.served_by.items())}}

    def close(self) -> None:
        """Say goodbye to the server (also when not every batch was taken) and disconnect."""
        if self._conn is not None:
            self._conn.finish()
            self._conn = None

    def __enter__(self) -> DataClient:
        if self.step < self.total:  # connect now: the first batches arrive while we set up
            began = time.perf_counter()
            self._conn = self._connect(time.monotonic() + self.timeout)
            self.wait_seconds += time.perf_counter() - began
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Stream:
    """One connection to one data server: credits go up, batches come down into a queue."""

    def __init__(self, client: DataClient, server: int, generation: int,
                 store: JobStore | None = None):
        """Connect to `server`'s `generation` through `store` (default the client's; a store
        given is the stream's own, closed with it)."""
        self.server, self.generation = server, generation
        self._own_store = store
        store = store or client.store
        ticket = store.add(P.conn_counter(server), 1)
        store.set_json(P.conn_key(server, ticket), {
            "client": f"replica{client.replica}", "replica": client.replica,
            "generation": generation, "start": client.step, "total": client.total})
        down, up = (P.channel_name(server, generation, ticket, direction)
                    for direction in ("down", "up"))
        self.down = Channel(store.raw, down, 1, client.timeout)
        try:
            self.up = Channel(store.raw, up, 1, client.timeout)
        except ChannelClosed:
            self.down.close()
            raise
        self.queue: queue.Queue = queue.Queue()  # at most `prefetch` batches, by the credits
        self._thread = threading.Thread(target=self._receive,
                                        args=(client.step, client.total, client.input_shape,
                                              client.target_shape, client.target_dtype),
                                        name=f"replica{client.replica}-data", daemon=True)
        self._thread.start()
        self.grant(client.prefetch)

    def _receive(self, start: int, total: int, shape: tuple[int, ...],
                 target_shape: tuple[int, ...], target_dtype: torch.dtype) -> None:
        try:
            for expected in range(start, total):
                op, step, n, *_ = self.down.recv_header()
                if op == P.END:
                    self.queue.put("is shutting down")
                    return
                if op != P.BATCH:
                    raise RuntimeError(f"data server {self.server} sent op {op}, not a batch")
                xb = torch.empty((n, *shape))
                yb = torch.empty((n, *target_shape), dtype=target_dtype)
                self.down.recv(xb)
                self.down.recv(yb)
                self.queue.put((step, xb, yb))
        except ChannelClosed as exc:
            self.queue.put(f"stopped sending ({exc})")
        except Exception as exc:  # reported to the training loop, which fails over
            log.exception("data stream from data server %d failed", self.server)
            self.queue.put(f"failed ({type(exc).__name__}: {exc})")

    def get(self, timeout: float):
        """A (step, x, y) batch, an error text, or None when nothing came within `timeout`."""
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def grant(self, credits: int) -> None:
        try:
            self.up.send_header(P.CREDIT, credits)
        except ChannelClosed:
            pass  # the receiving thread reports the broken connection

    def finish(self) -> None:
        """Every batch arrived: say goodbye and release the channels."""
        try:
            self.up.send_header(P.BYE)
        except ChannelClosed:
            pass
        self.close()

    def close(self) -> None:
        self.down.close()
        self.up.close()
        self._thread.join(5)
        if self._own_store is not None:
            self._own_store.close()
