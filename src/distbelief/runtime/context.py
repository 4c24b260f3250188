"""What a role process knows about itself, its heartbeat, and the record of heartbeats.

`RoleContext` is handed to every role's entry point (shard, replica, data
server, predictor) by the dispatcher (`distbelief.roles`). `Heartbeat` keeps
the coordinator from declaring the process lost while it works: it counts
``beat/<role>/<id>`` up once a period. `Liveness` is the coordinator's side:
when each counter last changed, by the coordinator's own monotonic clock, so no
two hosts' clocks are ever compared.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from distbelief.runtime.store import JobStore

if TYPE_CHECKING:
    from distbelief.job import JobConfig

log = logging.getLogger(__name__)


@dataclass
class RoleContext:
    """What a role needs: the store, the job's config and description, who it is."""

    store: JobStore
    config: JobConfig
    job: dict
    role: str
    ident: int
    part: int | None = None
    """This process's partition of a model-parallel replica (None: not partitioned)."""

    @property
    def member(self) -> str:
        """The name this process is known by in the store: "3", or "3.1" for partition 1."""
        return member_name(self.ident, self.part)

    def stopping(self) -> bool:
        return self.store.has("job/stop")


def member_name(ident: int, part: int | None) -> str:
    return str(ident) if part is None else f"{ident}.{part}"


def beat_key(name: str) -> str:
    """The store key of a role's heartbeat counter; `name` is "<role>/<member>"."""
    return f"beat/{name}"


class Heartbeat:
    """Adds 1 to ``beat/<role>/<id>`` every `period` seconds, in a thread of its own.

    A counter, not a time: the coordinator notes on its own clock when the
    counter last changed (`Liveness`), so a host whose clock is off is judged
    like any other. A store error is logged and the beat tried again on a new
    connection; the thread ends only when the block exits, the job stops
    (``job/stop``), or the store has not answered for the store's timeout (the
    job is then over). Context manager: the thread always stops on exit.

    Example::

        with Heartbeat(store, "replica", "0"):
            train()  # the coordinator sees replica 0 beat meanwhile
    """

    def __init__(self, store: JobStore, role: str, ident: int | str, period: float = 1.0):
        self._store, self._period = store, period
        self._key = beat_key(f"{role}/{ident}")
        self._name = f"{role} {ident}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        store: JobStore | None = None
        failing_since: float | None = None
        while not self._stop.is_set():
            try:
                if store is None:
                    # a connection of its own, made here so that the role need not wait for
                    # it: a role's blocking store waits (a channel's rendezvous) hold theirs,
                    # and a heartbeat stuck behind one would read as death
                    store = self._store.clone()
                if store.has("job/stop"):
                    return  # the job is over: nobody watches any more
                store.add(self._key, 1)
            except Exception as exc:  # noqa: BLE001 - any store failure: retry, bounded below
                store = None  # the connection may be broken: make a new one next time
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("heartbeat of %s: the job store did not answer (%s); trying "
                                "again every %g s", self._name, exc, self._period)
                elif now - failing_since > self._store.timeout:
                    log.error("heartbeat of %s: no answer from the job store for %.0f s "
                              "(--timeout): the job is over, the heartbeat stops",
                              self._name, now - failing_since)
                    return
            else:
                if failing_since is not None:
                    log.info("heartbeat of %s: the job store answers again after %.1f s",
                             self._name, time.monotonic() - failing_since)
                    failing_since = None
            self._stop.wait(self._period)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


class Liveness:
    """When each role's heartbeat counter last changed, by this process's monotonic clock.

    A role is lost once its counter has stood still for `limit` seconds of this
    clock; a role that never beat, `limit` seconds after it was expected
    (`expect`: spawned, registered, or replaced). Nothing compares the role's
    clock with this one, so clock skew between hosts does not matter. Names are
    "<role>/<member>" ("replica/0.1"); `read(name)` returns the counter (0 or
    the last one when nobody beats), and is called at most once every `every`
    seconds per name, so asking often costs no store traffic.

    Thread-safe (one lock; `read` is called under it): the watch loop and
    Sandblaster's watchdog thread ask the same record.

    Example::

        liveness = Liveness(lambda name: store.add(beat_key(name), 0), limit=6.0)
        liveness.expect("replica/0", "shard/0")  # both registered just now
        ...
        if liveness.lost("replica/0"):
            ...  # no beat for 6 s of this clock
    """

    def __init__(self, read: Callable[[str], int], limit: float, *, every: float = 0.2,
                 clock: Callable[[], float] = time.monotonic):
        self.limit, self.every = limit, every
        self._read, self._clock = read, clock
        self._lock = threading.Lock()
        self._seen: dict[str, _Record] = {}

    def expect(self, *names: str) -> None:
        """Each name is expected to beat from now on: its limit counts from now, and its
        counter as it stands now (a replaced process's last beat) is no beat."""
        with self._lock:
            now = self._clock()
            for name in names:
                self._seen[name] = _Record(self._read(name), now, now)

    def count(self, name: str) -> int:
        """`name`'s counter as last read (0: it has not beaten yet)."""
        self.silent_for(name)  # reads it when due
        with self._lock:
            return self._seen[name].count

    def lost(self, name: str) -> bool:
        """True once `name`'s counter stood still for `limit` seconds; a name never
        expected is expected from this first question on."""
        return self.silent_for(name) > self.limit

    def silent_for(self, name: str) -> float:
        """Seconds since `name`'s counter last changed (or since it was expected)."""
        with self._lock:
            now = self._clock()
            record = self._seen.get(name)
            if record is None:
                self._seen[name] = _Record(self._read(name), now, now)
                return 0.0
            if now - record.read_at >= self.every:
                count = self._read(name)
                record.read_at = now
                if count != record.count:
                    record.count, record.changed_at = count, now
            return now - record.changed_at


@dataclass
class _Record:
    count: int
    changed_at: float
    read_at: float
