"""Entry point of a role process: connect to the job store, then run the role.

Forked by the local launcher's zygote (`runtime.zygote`, which also ties the
process's life to its own), whose child runs `main` with DISTBELIEF_STORE
(host:port), DISTBELIEF_TOKEN, DISTBELIEF_ROLE and DISTBELIEF_ID (and
DISTBELIEF_PART for a partition of a model-parallel replica) in the
environment, or called in-process (`run_role`) when roles are started one per
host. The job's resolved config and layout come from the store; a replica runs
its algorithm's `run_replica` (`algorithms.registry`).

For tests only: DISTBELIEF_TEST_CLOCK_SKEW shifts the wall clock (`time.time`) of
the role processes it names, so a test can run a role whose host's clock is off
(`skew_clock`).
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import time

from distbelief.algorithms.registry import ALGORITHMS, get_algorithm
from distbelief.job import JobConfig
from distbelief.runtime.context import Heartbeat, RoleContext
from distbelief.runtime.store import JobStore

ROLE_MODULES = ("distbelief.ps.serve", "distbelief.data.server", "distbelief.inference")


def preload() -> None:
    """Import what every role would otherwise import on its own (the zygote calls this once)."""
    for name in ROLE_MODULES:
        importlib.import_module(name)
    for algorithm in ALGORITHMS.values():
        for name in algorithm.role_modules:
            importlib.import_module(name)


def run_role(store: JobStore, role: str, ident: int, part: int | None = None) -> None:
    """Register, then run `role` until it finishes. Blocks."""
    store.act_as(f"{role} {ident}")
    job = store.get_json("job", what="the job description from the coordinator")
    config = JobConfig.from_dict(job["config"])
    ctx = RoleContext(store, config, job, role, ident, part)
    store.register(role, ctx.member, {"kind": role, "id": ident, "part": part,
                                      "pid": os.getpid(), "host": socket.gethostname()})
    with Heartbeat(store, role, ctx.member, watchdog=ctx.watchdog,
                   bound=config.cluster.progress_timeout):
        if role == "shard":
            from distbelief.ps.serve import run_shard
            run_shard(ctx, rule=get_algorithm(config.algorithm).shard_rule)
        elif role == "replica":
            get_algorithm(config.algorithm).run_replica(ctx)
        elif role == "dataserver":
            from distbelief.data.server import run_data_server
            run_data_server(ctx)
        elif role == "predictor":
            from distbelief.inference import run_partition
            run_partition(ctx)
        else:
            raise ValueError(f"unknown role {role!r}")


CLOCK_SKEW = "DISTBELIEF_TEST_CLOCK_SKEW"


def skew_clock(spec: str, name: str) -> float:
    """For tests only: shift this process's `time.time` (and `time.time_ns`) by the seconds
    that `spec` gives the role process `name`; returns the shift (0: none).

    `spec` is DISTBELIEF_TEST_CLOCK_SKEW: comma-separated ``<name>=<seconds>`` entries,
    names as the role's log file has them ("replica0", "replica0.1", "shard1"), e.g.
    ``replica0=3600,replica1=-3600``; a bare number shifts every role.
    """
    seconds = 0.0
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        who, _, value = entry.rpartition("=")
        if who in ("", name):
            try:
                seconds = float(value)
            except ValueError:
                raise ValueError(f"{CLOCK_SKEW}={spec!r}: {value!r} is not a number of "
                                 "seconds (e.g. replica0=3600,replica1=-3600)") from None
    if seconds:
        real, real_ns = time.time, time.time_ns
        time.time = lambda: real() + seconds
        time.time_ns = lambda: real_ns() + int(seconds * 1e9)
    return seconds


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = os.environ["DISTBELIEF_STORE"].rsplit(":", 1)
    role, ident = os.environ["DISTBELIEF_ROLE"], int(os.environ["DISTBELIEF_ID"])
    part = os.environ.get("DISTBELIEF_PART")
    if os.environ.get(CLOCK_SKEW):
        skew_clock(os.environ[CLOCK_SKEW], f"{role}{ident}{'.' + part if part else ''}")
    timeout = float(os.environ.get("DISTBELIEF_TIMEOUT", "120"))
    store = JobStore.connect(host, int(port), os.environ["DISTBELIEF_TOKEN"], timeout=timeout)
    run_role(store, role, ident, int(part) if part else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
