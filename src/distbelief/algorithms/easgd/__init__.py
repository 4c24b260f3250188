"""Elastic averaging SGD (Zhang, Choromanska and LeCun, NIPS 2015), asynchronous form.

Each replica keeps its own parameters x_i and trains them locally (``--rule
sgd``, or ``momentum``: EAMSGD, the paper's; or an adaptive rule such as
``adamw``, whose state stays with the replica as momentum's does). Every ``--period`` tau steps it pulls the
centre x~ from the shards, computes e = alpha (x_i - x~), sets x_i <- x_i - e
and adds e into the centre where each slice lives (x~ <- x~ + e: ``ACCUM``
into the shard's parameters, no rule state). The centre is the model:
evaluations, checkpoints and ``model.pt`` come from it. `replica.py` is a
replica's loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distbelief.algorithms.base import (BATCHES, COMMON, MIXED, REPORTS, RULE, RULE_STATE,
                                        SERVED, Algorithm, Exchange, Watch)
from distbelief.config import at_least, option
from distbelief.errors import UserError

BETA = 0.9  # the paper's moving rate beta = alpha * R


@dataclass(kw_only=True)
class EasgdConfig:
    alpha: float | None = option(None, unset="0.9/R, the paper's choice for beta = 0.9")
    """The elastic coefficient: at each exchange a replica moves alpha of the way towards the centre, and the centre the same amount towards it."""
    period: int = 4
    """Local steps between two elastic exchanges (tau): one pull and one push of the parameters per period."""


class Easgd(Algorithm):
    name = "easgd"
    title = "elastic averaging SGD: replicas train locally, pulled every tau steps towards a centre in the shards"
    section = EasgdConfig
    honours = (COMMON | SERVED | RULE | BATCHES | REPORTS | MIXED
               | {"train.checkpoint_every", "cluster.restart_replicas"})
    defaults = {"optimizer.rule": "momentum", "optimizer.lr": 0.1, "train.on_nonfinite": "skip"}
    refusal_fixes = {"cluster.device": "its replicas keep their local copy and rule state on "
                                       "the CPU (no GPU path yet); leave it out"}
    shard_rule = False
    role_modules = ("distbelief.algorithms.easgd.replica",)

    def exchange(self, cfg) -> Exchange:
        # every period: fetch the centre, add alpha * (x - centre) into it
        return Exchange(pull=1 / cfg.easgd.period, push=1 / cfg.easgd.period, local_rule=True,
                        rule_state=RULE_STATE[cfg.optimizer.rule])

    def validate(self, cfg) -> None:
        e = cfg.easgd
        at_least("--period", e.period, 1, "exchange at least every step (1) or less often")
        if e.alpha is not None and not 0 <= e.alpha <= 1:
            raise UserError(f"--alpha must be in [0, 1], got {e.alpha}: the paper uses "
                            f"{BETA:g}/R (leave it out for that)")

    def resolve(self, data: dict) -> None:
        if data["easgd"]["alpha"] is None:
            data["easgd"]["alpha"] = BETA / data["cluster"]["replicas"]

    def run_replica(self, ctx) -> None:
        from distbelief.algorithms.easgd.replica import run_replica

        run_replica(ctx)

    def summary(self, cfg, watch: Watch, done: list[dict]) -> dict:
        steps = sum(d.get("steps", 0) for d in done)
        moved = sum(sum((d.get("transport_bytes") or {}).values()) for d in done)
        return {"easgd": {"exchanges": sum(d.get("exchanges", 0) for d in done),
                          "bytes_per_step": moved / steps if steps else math.nan}}

    def summary_config(self, cfg) -> dict:
        return {"alpha": cfg.easgd.alpha, "period": cfg.easgd.period}
