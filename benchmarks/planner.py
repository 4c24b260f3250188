"""Is the planner's choice right? Five jobs that favour different choices, every candidate
the planner considered measured next to its choice.

For each scenario:

1. ``make_plan`` runs as ``distbelief plan`` does (``--trials 3``, ``--trial-seconds``):
   profile, enumerate, predict, try the first three of its shortlist, choose;
2. every other candidate it considered is then tried the same way, for the same
   window: the rest of its shortlist (each algorithm's fastest predicted layout)
   and three more layouts spread over its predicted ranking (so the throughput
   ranking is checked over layouts too, not only algorithms);
3. reported: the planner's choice, the best measured candidate (by training-loss
   drop per second, the planner's criterion), the **regret** (the choice's loss
   drop per second over the best's; target >= 0.9) and the **rank correlation**
   (Spearman) between predicted and measured samples/s over the measured
   candidates (target >= 0.8).

Scenarios: the MNIST-1D CNN (small: many replicas pay); DistBelief's 42M-parameter
speech model (transfers dominate: model parallelism or a slow cadence); a wide MLP
on synthetic data (units split); the CNN with heavy augmentation (elastic warps:
data servers); the CNN with one replica 4x slower (``--slow-worker 0:4``: a
fraction of the replicas, or asynchronous training).

Every trial is a real local job (``distbelief train`` in a child process). Prints
ONE JSON document on stdout; progress goes to stderr.

Example::

    python benchmarks/planner.py            # ~15 minutes on 2 cores
    python benchmarks/planner.py --quick    # smoke test: one small scenario, two candidates
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from torch import nn

from distbelief.job import JobConfig
from distbelief.planner import Hardware, make_plan
from distbelief.planner.plan import trial, untriable

HERE = Path(__file__).resolve()


def wide_mlp(input_shape, num_classes) -> nn.Module:
    """Three hidden layers of 2048 ReLU units (about 8.5M parameters on 32 inputs)."""
    import math

    width = 2048
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, num_classes))


SCENARIOS = {
    "mnist1d_cnn": ("the MNIST-1D CNN: small, many replicas pay",
                    {"data": {"dataset": "mnist1d"}, "model": {"name": "cnn"}}),
    # lr 0.002 as a user would give it: at the algorithms' defaults these two diverge
    "speech_42m": ("DistBelief's speech model, 42M parameters: transfers dominate",
                   {"data": {"dataset": "speech"}, "model": {"name": "speech"},
                    "optimizer": {"lr": 0.002}}),
    "wide_mlp": ("a wide MLP (3 x 2048 units) on synthetic data: units split",
                 {"data": {"dataset": "synthetic"}, "model": {"name": f"{HERE}:wide_mlp"},
                  "optimizer": {"lr": 0.002}}),
    "heavy_augmentation": ("the MNIST-1D CNN with elastic warps on every batch: data servers",
                           {"data": {"dataset": "mnist1d"}, "model": {"name": "cnn"},
                            "augment": {"warp": 2.0, "warp_smooth": 64, "shift": 3,
                                        "noise": 0.05}}),
    "slow_replica": ("the MNIST-1D CNN with replica 0 four times slower",
                     {"data": {"dataset": "mnist1d"}, "model": {"name": "cnn"},
                      "cluster": {"slow_worker": "0:4"}}),
}
QUICK = {"digits_mlp": ("scikit-learn's digits, the zoo's MLP (smoke test)",
                        {"data": {"dataset": "digits"}, "model": {"name": "mlp"}})}


def log(text: str) -> None:
    print(f"[planner bench] {text}", file=sys.stderr, flush=True)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None under 3 points."""
    if len(xs) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        r = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else None


def considered(plan, extra: int) -> list:
    """The shortlist plus `extra` layouts spread over the rest of the predicted ranking."""
    chosen = list(plan.shortlist)
    rest = [c for c in plan.candidates if c not in chosen and not c.layout.exchange.full_batch]
    if rest and extra:
        step = max(1, (len(rest) - 1) // max(1, extra - 1)) if extra > 1 else len(rest)
        chosen += rest[::step][:extra]
    return chosen


def run_scenario(name: str, description: str, settings: dict, *, trials: int,
                 seconds: float, extra: int, hardware: Hardware, limit: int | None = None
                 ) -> dict:
    log(f"{name}: planning ({description})")
    cfg = JobConfig.from_dict(settings)
    fixed = {f"{s}.{k}" for s, values in settings.items() for k in values}
    began = time.monotonic()
    plan = make_plan(cfg, fixed, hardware=hardware, trials=trials, trial_seconds=seconds,
                     message=lambda s: log(f"{name}: {s}"))
    planning = time.monotonic() - began
    rows = []
    measured = [plan.choice] + [c for c in considered(plan, extra) if c is not plan.choice]
    for c in measured[:limit]:
        tried_by_planner = c.measured is not None
        reason = untriable(c, plan.profile, seconds)
        if reason:
            log(f"{name}: not measuring {c.name}: {reason}")
            c.measured = {"status": "untriable", "reason": reason}
        elif not tried_by_planner:
            log(f"{name}: measuring {c.name}")
            c.measured = trial(c, seconds, plan.profile.initial_loss)
        m = c.measured
        rows.append({"name": c.name, "algorithm": c.algorithm, "options": c.options,
                     "predicted_samples_per_second": c.prediction.samples_per_second,
                     "predicted_bottleneck": c.prediction.bottleneck,
                     "measured_samples_per_second": m.get("samples_per_second"),
                     "loss_drop_per_second": m.get("loss_drop_per_second"),
                     "status": m["status"], "tried_by_planner": tried_by_planner,
                     "chosen": c is plan.choice})
    scored = [r for r in rows if r["loss_drop_per_second"] is not None]
    best = max(scored, key=lambda r: r["loss_drop_per_second"]) if scored else None
    chosen = next(r for r in rows if r["chosen"])
    regret = (chosen["loss_drop_per_second"] / best["loss_drop_per_second"]
              if best and chosen["loss_drop_per_second"] is not None
              and best["loss_drop_per_second"] > 0 else None)
    paired = [r for r in rows if r["measured_samples_per_second"]]
    rho = spearman([r["predicted_samples_per_second"] for r in paired],
                   [r["measured_samples_per_second"] for r in paired])
    return {"scenario": name, "description": description, "choice": chosen["name"],
            "why": plan.why, "best_measured": best["name"] if best else None,
            "regret": regret, "rank_correlation": rho, "planning_seconds": planning,
            "candidates_enumerated": len(plan.candidates), "candidates": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small scenario: checks it works")
    parser.add_argument("--only", default=None, help="comma-separated scenario names")
    parser.add_argument("--trial-seconds", type=float, default=None,
                        help="each trial's window (default: 3; --quick 1)")
    parser.add_argument("--trials", type=int, default=None,
                        help="the planner's own trials (default: 3; --quick 1)")
    args = parser.parse_args(argv)
    scenarios = QUICK if args.quick else SCENARIOS
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in {**SCENARIOS, **QUICK}]
        if unknown:
            parser.error(f"unknown scenario {unknown[0]!r}: pick from {', '.join(SCENARIOS)}")
        scenarios = {w: {**SCENARIOS, **QUICK}[w] for w in wanted}
    seconds = args.trial_seconds or (1.0 if args.quick else 3.0)
    trials = args.trials if args.trials is not None else (1 if args.quick else 3)
    extra = 1 if args.quick else 3
    limit = 2 if args.quick else None  # the smoke test: the choice and one more
    hardware = Hardware.measure()
    results = [run_scenario(name, description, settings, trials=trials, seconds=seconds,
                            extra=extra, hardware=hardware, limit=limit)
               for name, (description, settings) in scenarios.items()]
    regrets = [r["regret"] for r in results if r["regret"] is not None]
    rhos = [r["rank_correlation"] for r in results if r["rank_correlation"] is not None]
    report = {
        "benchmark": "planner", "quick": args.quick, "trial_seconds": seconds,
        "planner_trials": trials, "hardware": hardware.to_dict(),
        "scenarios": results,
        "targets": {"regret_at_least": 0.9, "rank_correlation_at_least": 0.8},
        "summary": {
            "regret": {r["scenario"]: r["regret"] for r in results},
            "rank_correlation": {r["scenario"]: r["rank_correlation"] for r in results},
            "scenarios_meeting_regret": sum(1 for g in regrets if g >= 0.9),
            "scenarios_meeting_rank_correlation": sum(1 for p in rhos if p >= 0.8),
            "scenarios": len(results),
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
