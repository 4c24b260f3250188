"""The data server role (Project Adam): read, shuffle and augment, stream batches.

A data server loads the training data once, then serves any number of
replicas, each on its own pair of channels in its own thread (see
`distbelief.data.protocol`): it computes replica r's batches from the asked-for
start step on with `ReplicaFeed` (a pure function of (seed, r, step)) and sends
each as soon as the replica has credit for it, so the replica finds its next
batch ready while it computes a gradient. A replica that dies breaks only its
own connection. A replacement started after a crash (``restart/dataserver<d>``)
answers only the requests addressed to its own generation.

Publishes ``dataserver<d>/generation`` once the data is loaded, adds the
batches it sent to the counter ``dataserver<d>/served`` (every 0.2 s, so a
killed server loses at most that much of its count), and writes
``stats/dataserver<d>`` when the job stops. Example (inside the role process)::

    server = DataServer(store, 0, generation=0, feed_for=feeds, timeout=120,
                        target_dtype=task.target_dtype)
    server.serve(stop=lambda: store.has("job/stop"))
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable

import torch

from distbelief.data import protocol as P
from distbelief.data.feed import ReplicaFeed, load_job_data
from distbelief.task import task_of
from distbelief.runtime.channel import Channel, ChannelClosed
from distbelief.runtime.faults import fault
from distbelief.runtime.store import JobStore

log = logging.getLogger(__name__)

REQUEST_SECONDS = 5.0  # the longest a ticket's request may take to appear


class DataServer:
    """Serves replicas' batch streams until stopped. `serve` is called by one thread.

    ``target_dtype``: the dtype the targets are sent in, the job's task's
    (`distbelief.task.Task.target_dtype`), which the replicas receive them in.
    """

    def __init__(self, store: JobStore, ident: int, *, generation: int,
                 feed_for: Callable[[int], ReplicaFeed], timeout: float,
                 target_dtype: torch.dtype = torch.int64):
        self.store, self.ident, self.generation = store, ident, generation
        self.feed_for, self.timeout, self.target_dtype = feed_for, timeout, target_dtype
        self._lock = threading.Lock()
        self._served: dict[int, int] = {}  # batches sent, by replica
        self._published = 0
        self._clients: list[str] = []
        self._lost: list[str] = []
        self._connections: list[_Connection] = []
        self._stopping = threading.Event()

    def serve(self, stop: Callable[[], bool], poll: float = 0.02, skip_tickets: int = 0,
              tick: Callable[[], None] | None = None) -> None:
        """Accept connection requests until `stop()` is true, calling `tick()` (if given) once
        a pass (the role's progress). Blocks; always cleans up."""
        seen = skip_tickets
        next_publish = 0.0
        try:
            while not stop():
                if tick is not None:
                    tick()
                count = self.store.add(P.conn_counter(self.ident), 0)
                while seen < count:
                    seen += 1
                    self._accept(seen)
                if time.monotonic() >= next_publish:
                    self._publish()
                    next_publish = time.monotonic() + 0.2
                time.sleep(poll)
        finally:
            self._stopping.set()
            for conn in self._connections:
                conn.join(5)
            self._publish()

    def _accept(self, ticket: int) -> None:
        try:  # a client writes its request right after taking the ticket
            request = self.store.get_json(P.conn_key(self.ident, ticket),
                                          timeout=min(self.timeout, REQUEST_SECONDS))
        except TimeoutError:  # it died in between: nobody to serve
            log.warning("data connection request %d never came; skipped", ticket)
            return
        if request.get("generation") != self.generation:
            return  # addressed to a predecessor (or a successor) of this process
        conn = _Connection(self, ticket, request)
        self._connections = [c for c in self._connections if c.alive] + [conn]
        conn.start()

    def count(self, replica: int) -> None:
        with self._lock:
            self._served[replica] = self._served.get(replica, 0) + 1

    def record(self, client: str, lost: bool) -> None:
        with self._lock:
            (self._lost if lost else self._clients).append(client)

    def _publish(self) -> None:
        with self._lock:
            total = sum(self._served.values())
        if total > self._published:
            self.store.add(P.served_key(self.ident), total - self._published)
            self._published = total

    def stats(self) -> dict:
        with self._lock:
            return {"server": self.ident, "generation": self.generation,
                    "served": sum(self._served.values()),
                    "served_by_replica": {str(r): n for r, n in sorted(self._served.items())},
                    "clients": list(self._clients), "clients_lost": list(self._lost)}


class _Connection:
    """One replica's stream: the sending thread and the thread reading its credits."""

    def __init__(self, server: DataServer, ticket: int, request: dict):
        self.server, self.ticket, self.request = server, ticket, request
        self.client = str(request.get("client"))
        self._credit = 0
        self._bye = False
        self._broken = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"dataserver{server.ident}-conn{ticket}")

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        s, req = self.server, self.request
        down_name, up_name = (P.channel_name(s.ident, s.generation, self.ticket, direction)
                              for direction in ("down", "up"))
        down = up = reader = None
        # its own store connection: joining a channel holds one until the peer joins
        store = s.store.clone()
        try:
            down = Channel(store.raw, down_name, 0, s.timeout)
            up = Channel(store.raw, up_name, 0, s.timeout)
            reader = threading.Thread(target=self._read_credits, args=(up,), daemon=True,
                                      name=f"{self._thread.name}-credits")
            reader.start()
            self._send_stream(down, int(req["replica"]), int(req["start"]), int(req["total"]))
            deadline = time.monotonic() + s.timeout  # the replica says BYE once it has
            while reader.is_alive() and not s._stopping.is_set() \
                    and time.monotonic() < deadline:  # what it needs
                reader.join(0.1)
        except ChannelClosed as exc:
            if not self._bye:
                log.warning("data connection %s (%s) ended: %s", self.ticket, self.client, exc)
        except Exception:  # a bug: log it with its traceback; the replica fails over
            log.exception("data connection %s (%s) failed", self.ticket, self.client)
        finally:
            for channel in (down, up):  # the peer's (and our reader's) calls fail, not hang
                if channel is not None:
                    channel.close()
            if reader is not None:
                reader.join(5)
            store.close()
            s.record(self.client, lost=not self._bye)

    def _send_stream(self, down: Channel, replica: int, start: int, total: int) -> None:
        """Send steps start..total-1 as credit allows (until the replica says BYE); when the
        server stops first, tell the replica (END), which then connects elsewhere."""
        feed = self.server.feed_for(replica)
        try:
            for step in range(start, total):
                if not self._take_credit():
                    if not (self._bye or self._broken):  # the replica waits for a batch
                        down.send_header(P.END)
                    return
                xb, yb = feed.batch(step)
                down.send_header(P.BATCH, step, len(yb))
                down.send(xb.contiguous())
                down.send(yb.to(self.server.target_dtype).contiguous())
                self.server.count(replica)
        finally:
            feed.close()  # its DataLoader's reader processes, if any

    def _take_credit(self) -> bool:
        """Wait for one credit; False when the replica or the server is gone."""
        with self._cond:
            while self._credit == 0:
                if self._broken or self._bye or self.server._stopping.is_set():
                    return False
                self._cond.wait(0.1)
            self._credit -= 1
            return True

    def _read_credits(self, up: Channel) -> None:
        try:
            while True:
                op, amount, *_ = up.recv_header()
                with self._cond:
                    if op == P.CREDIT:
                        self._credit += amount
                    else:  # BYE
                        self._bye = True
                    self._cond.notify_all()
                if op != P.CREDIT:
                    return
        except ChannelClosed:
            with self._cond:
                self._broken = True
                self._cond.notify_all()


def run_data_server(ctx) -> None:
    """The role's entry point: load the data, then serve until the job stops."""
    cfg, d, store = ctx.config, ctx.ident, ctx.store
    torch.set_num_threads(1)  # small per-batch work; concurrent replicas use threads instead
    restart = store.try_get_json(P.restart_key(d))  # this process replaces a lost one
    generation = restart["generation"] if restart else 0
    task = task_of(cfg)
    data = load_job_data(cfg, ctx.job)  # opening reads no sample
    server = DataServer(store, d, generation=generation, timeout=cfg.cluster.timeout,
                        feed_for=lambda r: ReplicaFeed(data.train, None, cfg, r),
                        target_dtype=task.target_dtype)
    # requests made before now are addressed to a predecessor
    skip = store.add(P.conn_counter(d), 0)
    store.set_json(P.generation_key(d), generation)

    def tick() -> None:  # a pass of the accept loop: the data server's main loop advances
        ctx.progress()
        fault("dataserver.pass", f"dataserver{d}.g{generation}")

    try:
        server.serve(stop=ctx.stopping, skip_tickets=skip, tick=tick)
    finally:
        store.set_json(P.stats_key(d), server.stats())


def data_summary(store: JobStore, cfg, done: dict[str, dict], replaced: list[dict],
                 timeout: float = 5.0) -> dict:
    """The summary.json section on data: servers, batches each served, replacements, and
    the seconds each replica waited for its batches (made them, without data servers).

    `done`: each replica member's done record ({} for a lost one); `replaced`: the
    watch's list of lost data servers. Called by the coordinator after ``job/stop``.
    """
    servers = cfg.cluster.data_servers
    deadline = time.monotonic() + timeout
    final = []
    for d in range(servers):  # written by each server as it stops
        try:
            final.append(store.get_json(P.stats_key(d),
                                        timeout=max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            final.append({})
    members = {m: d for m, d in done.items() if "data_seconds" in d}
    return {
        "servers": servers,
        "prefetch": cfg.data.prefetch if servers else None,
        "augment": {k: v for k, v in dataclasses.asdict(cfg.augment).items()
                    if cfg.augment.enabled},
        "batches_served": [store.add(P.served_key(d), 0) for d in range(servers)],
        "clients_lost": [len(f.get("clients_lost", [])) for f in final],
        "servers_replaced": list(replaced),
        "replica_wait_seconds": {m: d["data_seconds"] for m, d in members.items()},
        "replica_failovers": {m: d.get("data_failovers", 0) for m, d in members.items()},
    }
