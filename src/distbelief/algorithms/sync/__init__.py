"""Synchronous data parallelism: the replicas all-reduce their gradients each step, and
a step may end once the fastest fraction reported (Project Adam). `replica.py` is a
replica's loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from distbelief.algorithms.base import (BATCHES, COMMON, DATA_SERVING, REPORTS, RULE, SERVED,
                                        Algorithm, Watch)
from distbelief.config import option
from distbelief.errors import UserError

if TYPE_CHECKING:
    from distbelief.runtime.store import JobStore


@dataclass(kw_only=True)
class SyncConfig:
    fraction: float = option(1.0, name="sync_fraction")
    """A step completes once this fraction of the replicas reported (the fastest); late gradients are dropped and counted (Project Adam)."""


class Sync(Algorithm):
    name = "sync"
    title = "synchronous all-reduce of the replicas' gradients, ending a step on a fraction"
    section = SyncConfig
    honours = (COMMON | SERVED | RULE | BATCHES | REPORTS | DATA_SERVING
               | {"train.checkpoint_every"})
    defaults = {"optimizer.rule": "adagrad", "optimizer.lr": 0.02, "train.on_nonfinite": "skip"}
    lost_replica = "synchronous training cannot go on without it"
    role_modules = ("distbelief.algorithms.sync.replica",)

    def validate(self, cfg) -> None:
        f = cfg.sync.fraction
        if not 0 < f <= 1:
            raise UserError(f"--sync-fraction must be in (0, 1], got {f}: a step completes once "
                            "this fraction of the replicas reported; 1 waits for all, 0.75 is "
                            "Project Adam's choice")

    def run_replica(self, ctx) -> None:
        from distbelief.algorithms.sync.replica import run_replica

        run_replica(ctx)

    def poller(self, store: JobStore, cfg) -> Callable[[Watch], None]:
        trimmed = 0

        def trim(watch: Watch) -> None:
            """Delete the quorum keys of steps every replica is past.

            A replica that reported step X may still be finishing its gradient of
            step X - 1 (one it was dropped from), which counts itself in at
            ``sync/<X-1>/arrived``; no replica touches a step below the slowest
            one's report minus 1, so those keys go.
            """
            nonlocal trimmed
            if len(watch.steps) < cfg.cluster.replicas:
                return
            below = min(watch.steps.values()) - 2
            for step in range(trimmed, below):
                store.delete(f"sync/{step}/arrived", f"sync/{step}/quorum")
            trimmed = max(trimmed, below)
        return trim

    def summary_config(self, cfg) -> dict:
        return {"sync_fraction": cfg.sync.fraction}
