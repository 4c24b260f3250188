"""Hogwild! (Recht et al., 2011): W worker processes on this host update one shared
parameter tensor without locks.

The coordinator keeps the parameters (and the update rule's state) in one
tensor in this host's shared memory (its "shared" parameters); `worker.py` maps
it and trains. Workers start together once every one has mapped it. A worker
that dies ends the job: its part of the data would go untrained and its steps
uncounted, so the result would not be the run that was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from distbelief.algorithms.base import (BATCHES, COMMON, MIXED, REPORTS, RULE, RULE_STATE,
                                        Algorithm, Coordination, Exchange, Watch)
from distbelief.errors import UserError

RULES = ("sgd", "momentum", "adagrad")  # elementwise, no shared step count


@dataclass(kw_only=True)
class HogwildConfig:
    workers: int = 2
    """Processes on this host that update one shared parameter tensor without locks (Hogwild!)."""


class Hogwild(Algorithm):
    name = "hogwild"
    title = "W worker processes update one shared parameter tensor without locks"
    section = HogwildConfig
    honours = COMMON | RULE | BATCHES | REPORTS | MIXED
    defaults = {"optimizer.rule": "sgd", "optimizer.lr": 0.02,  # Hogwild's maths is plain SGD
                "train.on_nonfinite": "skip"}
    refusal_fixes = {
        "cluster.replicas": "use --workers W for the processes that share the parameters",
        "cluster.shards": "the workers share one tensor in this host's memory; leave it out",
        "cluster.transport": "the workers share one tensor in this host's memory; leave it out",
        "cluster.device": "the workers update one parameter tensor in this host's shared memory "
                          "(/dev/shm) in place, which a GPU cannot; leave it out",
    }
    parameters = "shared"
    replica_noun, replica_kind = "hogwild worker", "worker"
    lost_replica = "the job stops (its part of the data would go untrained): start the run again"
    role_modules = ("distbelief.algorithms.hogwild.worker",)
    replicas_option = "workers"

    def exchange(self, cfg) -> Exchange:
        return Exchange(shared=True, local_rule=True, rule_state=RULE_STATE[cfg.optimizer.rule])

    def validate(self, cfg) -> None:
        if cfg.hogwild.workers < 1:
            raise UserError(f"--workers must be >= 1, got {cfg.hogwild.workers}: give at least "
                            "one worker process")
        rule = cfg.optimizer.rule
        if rule is not None and rule not in RULES:
            raise UserError(f"--rule {rule} does not work with --algorithm hogwild: its bias "
                            "correction needs one step count shared by every update, which "
                            f"lock-free workers do not keep; use {', '.join(RULES)}")

    def replicas(self, cfg) -> int:
        return cfg.hogwild.workers

    def steps(self, cfg, train_samples: int) -> int:
        workers = cfg.hogwild.workers
        if workers > train_samples:
            raise UserError(f"--workers {workers} is more than the {train_samples} training "
                            f"samples: use at most {train_samples} workers")
        return super().steps(cfg, train_samples)

    def run_replica(self, ctx) -> None:
        from distbelief.algorithms.hogwild.worker import run_worker

        run_worker(ctx)

    def start(self, co: Coordination) -> None:
        workers = range(co.config.hogwild.workers)
        co.wait_for([f"hogwild/ready/{w}" for w in workers],
                    "the workers to load the data and map the shared parameters")
        co.store.set_json("hogwild/go", True)

    def summary(self, cfg, watch: Watch, done: list[dict]) -> dict:
        starts = [d["start"] for d in done if "start" in d]
        ends = [d["end"] for d in done if "end" in d]
        train_seconds = max(ends) - min(starts) if starts and ends else None
        samples = sum(d.get("samples", 0) for d in done)
        workers = cfg.hogwild.workers
        return {
            "workers": workers, "train_seconds": train_seconds, "train_samples": samples,
            # CPU time the workers' processes used while training: independent of other load
            "train_cpu_seconds": sum(d.get("cpu_seconds", 0.0) for d in done),
            "train_samples_per_second": samples / train_seconds if train_seconds else None,
            "updates_applied": sum(d.get("updates", 0) for d in done),
            "worker_updates": [d.get("updates") for d in done],
            "threads_per_worker": cfg.cluster.threads_per_process(workers),
        }
