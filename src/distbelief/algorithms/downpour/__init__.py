"""Downpour SGD (DistBelief, Dean et al. 2012, section 4.1): asynchronous replicas
against a sharded parameter server that applies the update rule.

`replica.py` is a replica's loop, `workers.py` its lock-free threads
(``--replica-workers``, Project Adam); the fetch/push cadence is
`algorithms.schedule`. A replica may be cut into partitions (``--partitions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from distbelief.algorithms.base import (BATCHES, COMMON, DATA_SERVING, MIXED, PARTITIONS, REPORTS,
                                        RULE, SERVED, Algorithm, Exchange, RULE_STATE)
from distbelief.config import at_least, option
from distbelief.errors import UserError

if TYPE_CHECKING:
    from distbelief.runtime.store import JobStore


@dataclass(kw_only=True)
class DownpourConfig:
    n_fetch: int = 1
    """A replica fetches fresh parameters every N steps."""
    n_push: int = 1
    """A replica pushes its accumulated gradient every N steps."""
    warm_start_steps: int = 0
    """Replica 0 trains alone for W steps before the other replicas join."""
    replica_workers: int = 1
    """Threads per replica (Project Adam), each on its own batches, updating the replica's local copy lock-free with plain SGD between fetches; a step is one batch per thread."""
    max_staleness: int | None = option(None, unset="unbounded")
    """Stale synchronous parallel (Ho et al. 2013): a replica waits before step t until every live replica has finished step t - s (0: lockstep), and fetches again if its parameters may miss a gradient of those steps; a step counts finished once its push is applied, so with --n-push n it needs s >= n - 1."""


class Downpour(Algorithm):
    name = "downpour"
    title = "R model replicas push gradients to and fetch parameters from S parameter shards"
    section = DownpourConfig
    honours = (COMMON | SERVED | RULE | BATCHES | REPORTS | DATA_SERVING | PARTITIONS | MIXED
               | {"train.checkpoint_every", "cluster.restart_replicas", "cluster.device"})
    defaults = {"optimizer.rule": "adagrad", "optimizer.lr": 0.02, "train.on_nonfinite": "skip"}
    role_modules = ("distbelief.algorithms.downpour.replica",)

    def exchange(self, cfg) -> Exchange:
        return Exchange(pull=1 / cfg.downpour.n_fetch, push=1 / cfg.downpour.n_push,
                        shard_rule=True, rule_state=RULE_STATE[cfg.optimizer.rule])

    def plan_variants(self, cfg) -> tuple[dict, ...]:
        # every step, or Downpour's paper cadence: fetch and push every few steps
        return ({"n_fetch": 1, "n_push": 1}, {"n_fetch": 4, "n_push": 4})

    def validate(self, cfg) -> None:
        d, steps = cfg.downpour, cfg.train.steps
        at_least("--n-fetch", d.n_fetch, 1, "fetch at least every step (1) or less often (>1)")
        at_least("--n-push", d.n_push, 1, "push at least every step (1) or less often (>1)")
        at_least("--warm-start-steps", d.warm_start_steps, 0,
                 "use 0 to start all replicas together")
        if d.warm_start_steps and steps is not None and d.warm_start_steps >= steps:
            raise UserError(
                f"--warm-start-steps {d.warm_start_steps} must be smaller than --steps {steps}: "
                "lower --warm-start-steps or raise --steps")
        at_least("--replica-workers", d.replica_workers, 1,
                 "use 1 for one gradient at a time per replica")
        clip = cfg.optimizer.clip_grad_norm
        if clip is not None and (cfg.model.partitions > 1 or d.replica_workers > 1):
            cut = (f"--partitions {cfg.model.partitions}" if cfg.model.partitions > 1
                   else f"--replica-workers {d.replica_workers}")
            raise UserError(f"--clip-grad-norm {clip} with {cut}: a step's gradient is then "
                            "spread over processes or threads whose norms are not added up "
                            f"yet; leave out {cut.split()[0]} or --clip-grad-norm")
        if d.max_staleness is not None:
            at_least("--max-staleness", d.max_staleness, 0, "use 0 for lockstep, or leave it "
                     "out for unbounded Downpour")
            for value, option_name in ((cfg.model.partitions > 1, "--partitions"),
                                       (d.warm_start_steps > 0, "--warm-start-steps")):
                if value:
                    raise UserError(f"--max-staleness does not work with {option_name} "
                                    f"(replica clocks count whole, unpartitioned replicas "
                                    "that start together): leave one of them out")
            if d.max_staleness < d.n_push - 1:
                raise UserError(
                    f"--max-staleness {d.max_staleness} does not work with --n-push {d.n_push}: "
                    f"a replica's clock moves only when it pushes, every {d.n_push} steps, so "
                    "with a bound below n-push - 1 every replica would wait inside its push "
                    f"window for pushes no one can make; use --max-staleness {d.n_push - 1} or "
                    f"more, or --n-push {d.max_staleness + 1} or less")
        if cfg.cluster.device != "cpu" and d.replica_workers > 1:
            raise UserError(f"--device {cfg.cluster.device} does not work with --replica-workers "
                            f"{d.replica_workers}: the threads update one local copy in host "
                            "memory without locks; use --replica-workers 1 or leave --device out")
        if cfg.cluster.device != "cpu" and cfg.model.partitions > 1 and cfg.model.split == "units":
            raise UserError(f"--device {cfg.cluster.device} does not work with --split units: its "
                            "partitions exchange every layer's blocks through gloo on the host; "
                            "use --split layers (a pipeline) or leave --device out")
        if d.replica_workers > 1 and cfg.model.partitions > 1:
            raise UserError(f"--replica-workers {d.replica_workers} does not work with "
                            f"--partitions {cfg.model.partitions}: the threads share one whole "
                            "local copy; use --replica-workers 1 or --partitions 1")

    def steps(self, cfg, train_samples: int) -> int:
        from distbelief.algorithms.schedule import steps_per_replica

        # a step takes one batch per worker thread
        return steps_per_replica(steps=cfg.train.steps, epochs=cfg.train.resolved_epochs,
                                 train_samples=train_samples, replicas=cfg.cluster.replicas,
                                 batch_size=cfg.data.batch_size * cfg.downpour.replica_workers)

    def shard_updates(self, cfg, steps: int) -> int:
        # each replica pushes after every n_push steps and after its last (pushes refused as
        # stale or non-finite make the count fall short: a schedule then ends above 0)
        return cfg.cluster.replicas * -(-steps // cfg.downpour.n_push)

    def run_replica(self, ctx) -> None:
        from distbelief.algorithms.downpour.replica import run_replica

        run_replica(ctx)

    def on_replica_lost(self, store: JobStore, replica: int) -> None:
        if replica == 0 and not store.has("warm/done"):
            store.set_json("warm/done", True)  # do not leave the others waiting
        from distbelief.algorithms.downpour.staleness import release_lost

        cfg = self._config(store)
        if cfg["downpour"]["max_staleness"] is not None:  # it stops counting
            release_lost(store, replica, cfg["cluster"]["replicas"],
                         cfg["downpour"]["max_staleness"])

    @staticmethod
    def _config(store: JobStore) -> dict:
        return store.get_json("job")["config"]

    def summary(self, cfg, watch, done: list[dict]) -> dict:
        from distbelief.runtime.device import device_summary

        device = {"device": device_summary(cfg.cluster.device, done)}
        if cfg.downpour.max_staleness is None:
            return {**super().summary(cfg, watch, done), **device}
        gaps = [d["max_clock_gap"] for d in done if "max_clock_gap" in d]
        return {"downpour": {**watch.extra, "max_clock_gap": max(gaps, default=None),
                             "staleness_wait_seconds": sum(d.get("staleness_wait_seconds", 0)
                                                           for d in done)}, **device}

    def summary_config(self, cfg) -> dict:
        d = cfg.downpour
        return {"n_fetch": d.n_fetch, "n_push": d.n_push, "warm_start_steps": d.warm_start_steps,
                "max_staleness": d.max_staleness}
