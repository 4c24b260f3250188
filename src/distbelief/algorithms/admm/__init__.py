"""Consensus ADMM across replicas (Boyd et al. 2011, section 7.1; the source notes, section 5).

Each replica i keeps its own parameters x_i and scaled dual u_i; the consensus
z is the model, held in the parameter shards. A round: every replica takes
``--local-steps L`` steps of its local optimizer (``--rule``, ``--lr``) on
f_i(x) + rho/2 ||x - z + u_i||^2 over its own data, then contributes x_i + u_i;
the shards set z to the mean of the replicas' latest contributions (the
vector operation MEAN, where each slice lives) once ceil(F R) fresh ones
arrived (``--sync-fraction F``, Project Adam's rule; a late replica's last
contribution stays in the mean, its new one rolls into a later round); each
replica whose fresh contribution the round took pulls z and sets
u_i <- u_i + x_i - z.
rho changes between rounds as ``--rho-schedule`` says (`rho.py`).

`replica.py` is a replica's loop, `rounds.py` the coordinator's round closer
(a `Poller` of the watch loop), `layers.py` the "dual layers" split of one
network across partitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distbelief.algorithms.base import (BATCHES, COMMON, MIXED, QUORUM, REPORTS, RULE, SERVED,
                                        Algorithm, Exchange, RULE_STATE, Watch)
from distbelief.algorithms.admm.rho import SCHEDULES
from distbelief.config import at_least, option
from distbelief.errors import UserError

MAX_REPLICAS = 63  # a round's members travel to the shards as the bits of one int64


@dataclass(kw_only=True)
class AdmmConfig:
    local_steps: int = 10
    """Local optimizer steps (--rule, --lr) each replica takes between two consensus exchanges: one exchange per L steps."""
    rho: float = 0.1
    """The penalty of the augmented Lagrangian, rho/2 ||x - z + u||^2, that pulls each replica towards the consensus (the first round's value when --rho-schedule changes it)."""
    rho_schedule: str = option("fixed", choices=SCHEDULES)
    """How rho changes between rounds: fixed; balance (Boyd et al.'s residual balancing: x2 when the primal residual exceeds 10x the dual one, /2 in the opposite case); grow (x10 every round, the source notes' rule, capped by --rho-max). The scaled duals are rescaled whenever rho changes."""
    rho_max: float = 1e4
    """The largest rho a schedule may reach."""
    boundary_rho: float = 1.0
    """--partitions K (the "dual layers" split): the penalty on a sample's squared mismatch between a partition's output and the next one's input variable."""
    boundary_step: float = option(1.0, toml_only=True)
    """--partitions K: the largest proximal step of a partition's input rows (each row's step adapts below it)."""
    balance_mu: float = option(10.0, toml_only=True)
    """--rho-schedule balance: the residual ratio beyond which rho changes."""
    balance_tau: float = option(2.0, toml_only=True)
    """--rho-schedule balance: the factor rho changes by."""


class Admm(Algorithm):
    name = "admm"
    title = ("consensus ADMM: replicas train locally for L steps, then agree on the model in "
             "the shards")
    section = AdmmConfig
    honours = (COMMON | SERVED | RULE | BATCHES | REPORTS | QUORUM | MIXED
               | {"train.checkpoint_every", "cluster.restart_replicas", "model.partitions",
                  "model.balance"})
    defaults = {"optimizer.rule": "adam", "train.on_nonfinite": "skip"}
    computed_defaults = {"optimizer.lr": "0.01 (0.001 with --partitions K > 1)"}  # `resolve`
    refusal_fixes = {"model.split": "the dual-layers split cuts contiguous layers (--split "
                                    "layers, the default); leave it out",
                     "model.micro_batches": "the dual-layers split exchanges each boundary "
                                            "once per round, not per micro-batch; leave it out",
                     "cluster.device": "its replicas keep their local copy, duals and rule "
                                       "state on the CPU (no GPU path yet); leave it out"}
    shard_rule = False
    role_modules = ("distbelief.algorithms.admm.replica",)

    def exchange(self, cfg) -> Exchange:
        # every round: contribute x + u, pull z; the round closes on the fastest ceil(F*R)
        k = cfg.admm.local_steps
        return Exchange(pull=1 / k, push=1 / k, quorum=True, rounds_every=k, local_rule=True,
                        rule_state=RULE_STATE[cfg.optimizer.rule] + 1,  # + the dual u
                        store_ops=3 / k,  # announce, await the answer, read it
                        local_passes=3)  # grad += rho (x - z + u)

    def validate(self, cfg) -> None:
        a = cfg.admm
        at_least("--local-steps", a.local_steps, 1, "take at least one local step per round")
        if not 0 < a.rho < math.inf:
            raise UserError(f"--rho must be a finite number > 0, got {a.rho}: try 1")
        if not a.rho <= a.rho_max < math.inf:
            raise UserError(f"--rho-max must be finite and at least --rho ({a.rho}), got "
                            f"{a.rho_max}: raise --rho-max or lower --rho")
        if a.rho_schedule not in SCHEDULES:
            raise UserError(f"--rho-schedule {a.rho_schedule!r} is not one of "
                            f"{', '.join(SCHEDULES)}: pick one of those")
        if not 1 < a.balance_mu < math.inf or not 1 < a.balance_tau < math.inf:
            raise UserError(f"admm.balance_mu and admm.balance_tau must be finite numbers > 1, "
                            f"got {a.balance_mu} and {a.balance_tau}: Boyd et al. use 10 and 2")
        if not 0 < a.boundary_rho < math.inf or not 0 < a.boundary_step < math.inf:
            raise UserError(f"--boundary-rho and admm.boundary_step must be finite numbers > 0, "
                            f"got {a.boundary_rho} and {a.boundary_step}: try 1")
        if cfg.model.partitions > 1:
            self._validate_dual_layers(cfg)
        if cfg.cluster.replicas > MAX_REPLICAS:
            raise UserError(f"--replicas {cfg.cluster.replicas}: consensus ADMM takes at most "
                            f"{MAX_REPLICAS} replicas (a round's members travel as a 63-bit "
                            "set); use fewer replicas")

    def _validate_dual_layers(self, cfg) -> None:
        k = cfg.model.partitions
        if cfg.optimizer.clip_grad_norm is not None:
            raise UserError(f"--clip-grad-norm {cfg.optimizer.clip_grad_norm} with --partitions "
                            f"{k}: each dual-layers part takes its own Adam steps, with no "
                            "gradient of the whole model to clip; leave one of them out")
        if cfg.optimizer.rule not in (None, "adam"):
            raise UserError(f"--rule {cfg.optimizer.rule} with --algorithm admm --partitions "
                            f"{k}: each partition trains its weights with Adam (its learning "
                            "rate decaying to 0, which lets the boundaries agree); use --rule "
                            "adam or leave it out")
        o = cfg.optimizer
        if o.lr_schedule != "constant" or o.warmup_steps:
            raise UserError(f"--lr-schedule {o.lr_schedule} --warmup-steps {o.warmup_steps} with "
                            f"--algorithm admm --partitions {k}: each partition's Adam decays "
                            "its own learning rate; leave them out, or use --partitions 1")
        for given, option in ((cfg.train.checkpoint_every, "--checkpoint-every"),
                              (cfg.cluster.restart_replicas, "--restart-replicas")):
            if given:
                raise UserError(f"{option} does not work yet with --algorithm admm "
                                f"--partitions {k} (a partition's boundary rows and duals "
                                "are not checkpointed); leave it out, or use --partitions 1")

    def resolve(self, data: dict) -> None:
        if data["optimizer"]["lr"] is None:  # Adam's steps per round, as measured
            data["optimizer"]["lr"] = 0.01 if data["model"]["partitions"] == 1 else 0.001

    def steps(self, cfg, train_samples: int) -> int:
        """Whole rounds: the steps --steps/--epochs give, rounded up to --local-steps."""
        steps = super().steps(cfg, train_samples)
        return -(-steps // cfg.admm.local_steps) * cfg.admm.local_steps

    def rounds(self, cfg, steps: int) -> int:
        """The job's consensus rounds, each of --local-steps of each replica's `steps`."""
        return steps // cfg.admm.local_steps

    def run_replica(self, ctx) -> None:
        from distbelief.algorithms.admm.replica import run_replica

        run_replica(ctx)

    def poller(self, co):
        from distbelief.algorithms.admm.rounds import RoundCloser

        return RoundCloser(co, self.rounds(co.config, co.store.get_json("job")["steps"]))

    def summary(self, cfg, watch: Watch, done: list[dict]) -> dict:
        return {"admm": {**watch.extra,
                         "rounds_joined": [d.get("rounds_joined") for d in done]}}

    def summary_config(self, cfg) -> dict:
        a = cfg.admm
        return {"local_steps": a.local_steps, "rho": a.rho, "rho_schedule": a.rho_schedule,
                "rho_max": a.rho_max, "sync_fraction": cfg.cluster.sync_fraction}
