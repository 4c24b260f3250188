"""Synchronous data parallelism: the replicas all-reduce their gradients each step, and
a step may end once the fastest fraction reported (Project Adam). `replica.py` is a
replica's loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distbelief.algorithms.base import (BATCHES, COMMON, DATA_SERVING, MIXED, QUORUM, REPORTS,
                                        RULE, SERVED, Algorithm, Exchange, Poller, RULE_STATE,
                                        Watch)

if TYPE_CHECKING:
    from distbelief.runtime.store import JobStore


QUORUM_POLL_SECONDS = 0.002
"""How often a replica asks the store whether its step's quorum formed."""

class Sync(Algorithm):
    name = "sync"
    title = "synchronous all-reduce of the replicas' gradients, ending a step on a fraction"
    honours = (COMMON | SERVED | RULE | BATCHES | REPORTS | DATA_SERVING | QUORUM | MIXED
               | {"train.checkpoint_every", "cluster.device"})
    defaults = {"optimizer.rule": "adagrad", "optimizer.lr": 0.02, "train.on_nonfinite": "skip"}
    lost_replica = "synchronous training cannot go on without it"
    role_modules = ("distbelief.algorithms.sync.replica",)

    def exchange(self, cfg) -> Exchange:
        # each step: count the arrival in the store, then poll it for the quorum
        return Exchange(allreduce=True, quorum=True, local_rule=True,
                        rule_state=RULE_STATE[cfg.optimizer.rule], store_ops=2,
                        poll_seconds=QUORUM_POLL_SECONDS)

    def plan_variants(self, cfg) -> tuple[dict, ...]:
        # every replica, or the fastest half (Project Adam): pays when one replica is slow
        return ({"sync_fraction": 1.0}, {"sync_fraction": 0.5})

    def run_replica(self, ctx) -> None:
        from distbelief.algorithms.sync.replica import run_replica

        run_replica(ctx)

    def poller(self, co) -> Poller:
        return _TrimQuorumKeys(co.store, co.config.cluster.replicas)

    def summary(self, cfg, watch: Watch, done: list[dict]) -> dict:
        from distbelief.runtime.device import device_summary

        return {**super().summary(cfg, watch, done),
                "device": device_summary(cfg.cluster.device, done)}

    def summary_config(self, cfg) -> dict:
        return {"sync_fraction": cfg.cluster.sync_fraction}


class _TrimQuorumKeys(Poller):
    """Deletes the quorum keys of steps every replica is past.

    A replica that reported step X may still be finishing its gradient of step
    X - 1 (one it was dropped from), which counts itself in at
    ``sync/<X-1>/arrived``; no replica touches a step below the slowest one's
    report minus 1, so those keys go.
    """

    def __init__(self, store: JobStore, replicas: int):
        self.store, self.replicas = store, replicas
        self.trimmed = 0

    def poll(self, watch: Watch) -> None:
        if len(watch.steps) < self.replicas:
            return
        below = min(watch.steps.values()) - 2
        for step in range(self.trimmed, below):
            self.store.delete(f"sync/{step}/arrived", f"sync/{step}/quorum")
        self.trimmed = max(self.trimmed, below)
