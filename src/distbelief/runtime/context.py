"""What a role process knows about itself, its heartbeat, and the record of heartbeats.

`RoleContext` is handed to every role's entry point (shard, replica, data
server, predictor) by the dispatcher (`distbelief.roles`). `Heartbeat` keeps
the coordinator from declaring the process lost while it works: it counts
``beat/<role>/<id>`` up once a period, but only while the role's main loop
advances. The loop says so through its `Watchdog` (``ctx.progress()`` each
step or pass, ``ctx.waiting()`` around a wait for other roles); a loop that
made no progress for ``--progress-timeout`` seconds stops the beats and writes
``stuck/<role>/<id>``, so a role whose main thread hangs is lost exactly like a
dead one, though its process and the heartbeat thread live on. `Liveness` is
the coordinator's side: when each counter last changed, by the coordinator's
own monotonic clock, so no two hosts' clocks are ever compared.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

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
    watchdog: Watchdog = field(default_factory=lambda: Watchdog())
    """Whether this role's main loop advances (`progress`, `waiting`); the heartbeat reads it."""

    @property
    def member(self) -> str:
        """The name this process is known by in the store: "3", or "3.1" for partition 1."""
        return member_name(self.ident, self.part)

    def stopping(self) -> bool:
        return self.store.has("job/stop")

    def progress(self) -> None:
        """The main loop advanced (a step trained, a pass over requests made). Call it from
        the role's main loop only: a feed from another thread would hide a stuck loop."""
        self.watchdog.feed()

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        """Context manager around a wait for other roles (a staleness barrier, an all-reduce
        with slower peers, a checkpoint pause): its time is no lack of progress. Only for
        waits that end by themselves within --timeout."""
        return self.watchdog.waiting()


def member_name(ident: int, part: int | None) -> str:
    return str(ident) if part is None else f"{ident}.{part}"


def beat_key(name: str) -> str:
    """The store key of a role's heartbeat counter; `name` is "<role>/<member>"."""
    return f"beat/{name}"


def stuck_key(name: str) -> str:
    """The store key a role's heartbeat writes when its main loop stopped advancing:
    ``{"seconds": bound}``; `name` is "<role>/<member>"."""
    return f"stuck/{name}"


class Watchdog:
    """How long a role's main loop has gone without progress, fed by the loop itself.

    The loop calls `feed()` once per step (a replica) or pass (a shard's or data
    server's accept loop); a wait for other roles runs inside `waiting()`, and
    counts as progress for as long as it lasts: such a wait ends by itself within
    --timeout (the role then fails, or goes on), and a slower peer is no fault of
    this role. Until its first feed the role is starting up and is not judged
    (its start is bounded by the registration waits). `stalled_for` is read by
    the heartbeat thread. Thread-safe; never blocks.

    Example::

        dog = Watchdog()
        for step in range(total):
            dog.feed()
            with dog.waiting():
                barrier.wait()          # a slow peer: no stall
            train_step()
        dog.stalled_for()               # seconds since the last feed (0 while waiting)
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._fed: float | None = None
        self._waits = 0

    def feed(self) -> None:
        with self._lock:
            self._fed = self._clock()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        with self._lock:
            self._waits += 1
        try:
            yield
        finally:
            with self._lock:
                self._waits -= 1
                if self._fed is not None:  # the wait is over: the loop's time counts anew
                    self._fed = self._clock()

    def stalled_for(self) -> float:
        """Seconds since the last feed; 0 before the first one and during a wait."""
        with self._lock:
            if self._fed is None or self._waits:
                return 0.0
            return self._clock() - self._fed


class Heartbeat:
    """Adds 1 to ``beat/<role>/<id>`` every `period` seconds, in a thread of its own, while
    the role's main loop advances.

    A counter, not a time: the coordinator notes on its own clock when the
    counter last changed (`Liveness`), so a host whose clock is off is judged
    like any other. With a `watchdog` and a `bound`, a beat is left out while
    the watchdog says the loop has made no progress for more than `bound`
    seconds: the role then reads as lost to everyone who judges it by its beats
    (the coordinator, the data clients), like a dead process. The first such
    beat left out writes ``stuck/<role>/<id>`` (the bound, for the coordinator's
    message) and logs where the role's thread (the one that made the Heartbeat)
    stands; a loop that advances again beats again. A store error is logged and
    the beat tried again on a new connection; the thread ends only when the
    block exits, the job stops (``job/stop``), or the store has not answered for
    the store's timeout (the job is then over). Context manager: the thread
    always stops on exit.

    Example::

        with Heartbeat(store, "replica", "0", watchdog=ctx.watchdog, bound=300):
            train()  # feeds ctx.watchdog: the coordinator sees replica 0 beat meanwhile
    """

    def __init__(self, store: JobStore, role: str, ident: int | str, period: float = 1.0, *,
                 watchdog: Watchdog | None = None, bound: float | None = None):
        self._store, self._period = store, period
        self._watchdog, self._bound = watchdog, bound
        self._key = beat_key(f"{role}/{ident}")
        self._stuck_key = stuck_key(f"{role}/{ident}")
        self._name = f"{role} {ident}"
        self._owner = threading.get_ident()  # the role's thread, whose stack a stall logs
        self._stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _advancing(self, store: JobStore) -> bool:
        """Whether the role's loop made progress within the bound; says so once when not."""
        if self._watchdog is None or self._bound is None:
            return True
        stalled = self._watchdog.stalled_for()
        if stalled <= self._bound:
            if self._stalled:
                log.warning("%s makes progress again; it may have been declared lost meanwhile",
                            self._name)
                self._stalled = False
                store.delete(self._stuck_key)
            return True
        if not self._stalled:
            frame = sys._current_frames().get(self._owner)
            where = "".join(traceback.format_stack(frame)) if frame is not None else "?\n"
            log.error("%s made no progress for %.1f s (--progress-timeout %g): the heartbeat "
                      "stops, so the job counts it as lost. Its thread stands at:\n%s",
                      self._name, stalled, self._bound, where.rstrip())
            store.set_json(self._stuck_key, {"seconds": self._bound})
            self._stalled = True
        return False

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
                if self._advancing(store):
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
