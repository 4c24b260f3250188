"""What a role process knows about itself, and its heartbeat.

`RoleContext` is handed to every role's entry point (shard, replica, data
server, predictor) by the dispatcher (`distbelief.roles`); `Heartbeat` keeps
the coordinator from declaring the process lost while it works.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from distbelief.runtime.store import JobStore

if TYPE_CHECKING:
    from distbelief.job import JobConfig


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


class Heartbeat:
    """Publishes `heartbeat/<role>/<id>` = wall time every `period` seconds, in a thread.

    The coordinator declares a role lost when its heartbeat is older than its
    limit. Context manager: the thread always stops on exit.
    """

    def __init__(self, store: JobStore, role: str, ident: int | str, period: float = 1.0):
        self._store, self._key, self._period = store, f"heartbeat/{role}/{ident}", period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        try:
            # a connection of its own, made here so that the role need not wait for it: a
            # role's blocking store waits (a channel's rendezvous) hold theirs, and a
            # heartbeat stuck behind one would read as death. Until the first beat the
            # coordinator counts the role alive.
            store = self._store.clone()
        except Exception:  # the store is gone: the job is over
            return
        while not self._stop.is_set():
            try:
                store.set_json(self._key, time.time())
            except Exception:  # the store is gone: the job is over
                return
            self._stop.wait(self._period)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
