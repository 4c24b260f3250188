"""Entry point of a role process: connect to the job store, then run the role.

Forked by the local launcher's zygote (`runtime.zygote`, which also ties the
process's life to its own), whose child runs `main` with DISTBELIEF_STORE (host:port), DISTBELIEF_TOKEN, DISTBELIEF_ROLE and DISTBELIEF_ID
(and DISTBELIEF_PART for a partition of a model-parallel replica) in the environment, or called in-process (`run_role`) when roles are started
one per host. The job's resolved config and layout come from the store.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

from distbelief.config import JobConfig
from distbelief.runtime.store import JobStore


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


def run_role(store: JobStore, role: str, ident: int, part: int | None = None) -> None:
    """Register, then run `role` until it finishes. Blocks."""
    job = store.get_json("job", what="the job description from the coordinator")
    config = JobConfig.from_dict(job["config"])
    ctx = RoleContext(store, config, job, role, ident, part)
    store.register(role, ctx.member, {"kind": role, "id": ident, "part": part,
                                      "pid": os.getpid(), "host": socket.gethostname()})
    with Heartbeat(store, role, ctx.member):
        if role == "shard":
            from distbelief.ps.serve import run_shard
            run_shard(ctx)
        elif role == "replica":
            _replica_entry(config.algorithm)(ctx)
        elif role == "dataserver":
            from distbelief.data.server import run_data_server
            run_data_server(ctx)
        elif role == "predictor":
            from distbelief.inference import run_partition
            run_partition(ctx)
        else:
            raise ValueError(f"unknown role {role!r}")


def _replica_entry(algorithm: str):
    """The function a replica (worker) of `algorithm` runs."""
    if algorithm == "downpour":
        from distbelief.algorithms.downpour import run_replica
        return run_replica
    if algorithm == "sync":
        from distbelief.algorithms.sync import run_replica
        return run_replica
    if algorithm == "sandblaster":
        from distbelief.algorithms.sandblaster_worker import run_worker
        return run_worker
    if algorithm == "hogwild":
        from distbelief.algorithms.hogwild_worker import run_worker
        return run_worker
    raise ValueError(f"unknown algorithm {algorithm!r}")


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = os.environ["DISTBELIEF_STORE"].rsplit(":", 1)
    role, ident = os.environ["DISTBELIEF_ROLE"], int(os.environ["DISTBELIEF_ID"])
    part = os.environ.get("DISTBELIEF_PART")
    timeout = float(os.environ.get("DISTBELIEF_TIMEOUT", "120"))
    store = JobStore.connect(host, int(port), os.environ["DISTBELIEF_TOKEN"], timeout=timeout)
    run_role(store, role, ident, int(part) if part else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
