"""Sandblaster L-BFGS (DistBelief, Dean et al. 2012, section 4.2): batch L-BFGS driven
by the coordinator, its vectors kept in the parameter shards, each gradient computed
over portions of the data handed out to the workers, with backup copies.

`driver.py` is the coordinator side, `worker.py` a worker, `lbfgs.py` the L-BFGS
maths over a vector space (`vector_space.py`), `portions.py` the hand-out,
`reduction.py` the fixed order in which the portions are summed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from distbelief.algorithms.base import COMMON, SERVED, Algorithm, Coordination, Exchange
from distbelief.config import at_least, choice, option
from distbelief.errors import JobFailed, UserError

LINE_SEARCHES = ("strong_wolfe", "none")
PORTIONS_PER_WORKER = 8  # default number of portions per worker


@dataclass(kw_only=True)
class SandblasterConfig:
    portions: int | None = option(None, unset=f"{PORTIONS_PER_WORKER} per worker")
    """Pieces the data is cut into per gradient evaluation, handed out as workers free up."""
    backups: bool = True
    """Give idle workers backup copies of the portions still outstanding; the first answer wins."""
    push_every: int = 4
    """A worker sends its accepted portions' gradients to the shards every K of them."""
    history: int = 10
    """L-BFGS history size: the (s, y) pairs the shards keep."""
    line_search: str = option("strong_wolfe", choices=LINE_SEARCHES)
    """strong_wolfe, or none (a fixed step of --lr)."""
    tolerance_grad: float = 1e-7
    """Stop when the largest gradient component is at most this."""
    tolerance_change: float = 1e-9
    """Stop when the loss or the step changes by less than this."""


class Sandblaster(Algorithm):
    name = "sandblaster"
    title = "batch L-BFGS driven by the coordinator; the replicas are its workers"
    section = SandblasterConfig
    honours = COMMON | SERVED
    defaults = {"optimizer.lr": 1.0, "train.steps": 50}
    refusal_fixes = {
        "train.epochs": "leave it out and give --steps, the number of L-BFGS iterations",
        "data.batch_size": "leave it out; --portions sets how finely the data is cut",
        "train.log_every": "L-BFGS reports every iteration; leave it out",
        "train.on_nonfinite": "L-BFGS cannot skip a batch, a NaN/inf loss always ends the job; "
                              "leave it out",
        "cluster.device": "its workers compute gradients of whole portions on the CPU and the "
                          "L-BFGS vectors live in the shards; leave it out",
        "train.precision": "L-BFGS's line search and curvature pairs need float32 losses and "
                           "gradients; leave it out",
    }
    replica_noun = "worker"
    drives_itself = True
    # its workers compute portions at L-BFGS's trial points, in no fixed order: no worker's
    # running statistics are the model's
    trains_buffers = False
    role_modules = ("distbelief.algorithms.sandblaster.worker",)

    def exchange(self, cfg) -> Exchange:
        # a worker pulls x once per iteration (its portions) and sends every portion's
        # gradient on its own (into a slot the shards sum in portion order, so the result
        # does not depend on who computed what); the L-BFGS vectors live in the shards
        # (history pairs of x and g, a few more, and the slots of portions pushed ahead of
        # the first missing one: about push_every per worker)
        portions = cfg.sandblaster.portions or PORTIONS_PER_WORKER * cfg.cluster.replicas
        per_worker = max(1.0, portions / cfg.cluster.replicas)
        slots = min(portions, cfg.cluster.replicas * cfg.sandblaster.push_every)
        # each portion: claim it, read the evaluation's point, append its result
        return Exchange(pull=1 / per_worker, push=1.0, full_batch=True,
                        rule_state=2 * cfg.sandblaster.history + slots, store_ops=3)

    def validate(self, cfg) -> None:
        b = cfg.sandblaster
        if b.portions is not None and b.portions < cfg.cluster.replicas:
            raise UserError(f"--portions {b.portions} is smaller than the {cfg.cluster.replicas} "
                            "workers (--replicas): give at least one portion per worker, "
                            "ideally several")
        choice("line_search", b.line_search, LINE_SEARCHES, "--line-search")
        at_least("--push-every", b.push_every, 1, "push after every portion (1) or less often")
        at_least("--history", b.history, 1, "keep at least one (s, y) pair; 10 is usual")
        for option_, value in (("--tolerance-grad", b.tolerance_grad),
                               ("--tolerance-change", b.tolerance_change)):
            if not 0 <= value < math.inf:
                raise UserError(f"{option_} must be a finite number >= 0, got {value}: "
                                "use 0 to never stop early")

    def resolve(self, data: dict) -> None:
        if data["sandblaster"]["portions"] is None:
            data["sandblaster"]["portions"] = PORTIONS_PER_WORKER * data["cluster"]["replicas"]

    def steps(self, cfg, train_samples: int) -> int:
        return cfg.train.steps  # L-BFGS iterations

    def progress_total(self, cfg, steps: int) -> int:
        return steps

    def run_replica(self, ctx) -> None:
        from distbelief.algorithms.sandblaster.worker import run_worker

        run_worker(ctx)

    def drive(self, co: Coordination) -> None:
        """Run L-BFGS from the coordinator; the replicas are its workers."""
        from distbelief.algorithms.sandblaster.driver import SandblasterFailed, SandblasterJob, drive

        from distbelief.task import task_of  # torch: not while the command line starts

        cfg, watch = co.config, co.watch
        task = task_of(cfg)

        def show(iterations: int, loss: float, samples_per_second: float) -> None:
            watch.steps[0] = iterations
            watch.last[0] = {"loss": loss}
            co.show(iterations, loss=loss, samples_per_second=samples_per_second,
                    staleness=None)

        def on_iteration(k: int) -> None:
            if cfg.train.eval_every and k % cfg.train.eval_every == 0:
                metrics = co.evaluate()
                co.write_event({"event": "eval", "time": time.time() - co.start_time, "step": k,
                                **task.fields(metrics, f"{co.watched}_")})
                co.message(f"iteration {k}: {task.describe(metrics, co.watched)}")

        def write_event(event: dict) -> None:
            co.write_event(event)
            if event["event"] == "train":
                watch.samples += event["samples"]
            elif event["event"] == "replica_lost":
                watch.lost.add(event["replica"])
                co.message(f"worker {event['replica']} was lost; its portions are handed "
                           "out again")

        job = SandblasterJob(store=co.store, config=cfg, ps=co.ps, write_event=write_event,
                             show=show, is_lost=co.is_lost, on_iteration=on_iteration,
                             start_time=co.start_time)
        try:
            watch.extra = drive(job)
        except SandblasterFailed as exc:
            raise JobFailed(f"{exc}{co.exit_detail(min(watch.lost, default=0))}") from None
        if watch.extra["converged"]:
            co.message(f"L-BFGS converged ({watch.extra['converged']}) after "
                       f"{watch.extra['iterations']} iterations")

    def summary_config(self, cfg) -> dict:
        b = cfg.sandblaster
        return {"portions": b.portions, "backups": b.backups, "line_search": b.line_search}
