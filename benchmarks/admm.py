"""Consensus ADMM and its dual-layers split, next to the algorithms they replace.

Measures, in one run:

* **Time to accuracy** on MNIST-1D (the zoo's CNN): wall-clock seconds from the
  job's start until the first evaluation at or above ``--target`` test accuracy
  (0.90), for consensus ADMM with R = 2 and R = 4 replicas, each with its
  ``fixed`` and ``balance`` rho schedules (the best schedule of each R is the
  ADMM figure), next to Downpour with Adagrad and synchronous all-reduce, both
  with R = 4. The configurations run interleaved, round after round
  (``--repeats``), and each figure is the median over its repeats; ratios are
  Downpour's (and sync's) time over ADMM's, so > 1 means ADMM got there first.
  Evaluations happen every ``eval_every`` steps of the leading replica, so a
  time is accurate to one evaluation period.
* **Dual-layers throughput**: samples per second of one replica of the zoo's
  MLP cut in K = 2 partitions after its last ReLU (``--balance 5,1``), trained
  by ADMM's dual-layers split (one boundary exchange per round of
  ``--local-steps`` steps) versus the pipeline (``--algorithm downpour --split
  layers``, the same partitions, batch and threads). Samples per second are
  counted between the loss partition's first and last report, so start-up is
  left out.

Every configuration is a real local job through `distbelief.train`. Prints ONE
JSON document on stdout; progress goes to stderr.

Example::

    python benchmarks/admm.py            # ~6 minutes on 2 cores
    python benchmarks/admm.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import distbelief
from distbelief.metrics.log import read_metrics


@dataclass(frozen=True, kw_only=True)
class Plan:
    num_samples: int | None
    """MNIST-1D samples (None: the dataset's 50,000)."""
    epochs: float
    """Passes over the training data each time-to-accuracy job may take."""
    eval_every: int
    """Steps of the leading replica between evaluations."""
    repeats: int
    """Rounds of the interleaved configurations."""
    throughput_steps: int
    """Steps of each throughput job (multiples of the local steps)."""


FULL = Plan(num_samples=None, epochs=6.0, eval_every=40, repeats=1, throughput_steps=1500)
QUICK = Plan(num_samples=2000, epochs=1.0, eval_every=5, repeats=1, throughput_steps=20)

CONFIGS = {  # name -> options of one time-to-accuracy job
    "admm_r2_fixed": dict(algorithm="admm", replicas=2, rho_schedule="fixed"),
    "admm_r2_balance": dict(algorithm="admm", replicas=2, rho_schedule="balance"),
    "admm_r4_fixed": dict(algorithm="admm", replicas=4, rho_schedule="fixed"),
    "admm_r4_balance": dict(algorithm="admm", replicas=4, rho_schedule="balance"),
    "downpour_adagrad_r4": dict(algorithm="downpour", replicas=4, rule="adagrad"),
    "sync_r4": dict(algorithm="sync", replicas=4),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def time_to_accuracy(run_dir: Path, options: dict, plan: Plan, target: float) -> dict:
    began = time.perf_counter()
    summary = distbelief.train(dataset="mnist1d", model="cnn", num_samples=plan.num_samples,
                               epochs=plan.epochs, eval_every=plan.eval_every, shards=2,
                               run_dir=str(run_dir), **options)
    evals = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "eval"]
    reached = next((e for e in evals if e["test_accuracy"] >= target), None)
    return {"seconds": reached["time"] if reached else None,
            "step": reached["step"] if reached else None,
            "final_accuracy": summary["test_accuracy"], "wall_seconds": summary["wall_seconds"],
            "job_seconds": time.perf_counter() - began}


def throughput(run_dir: Path, options: dict, plan: Plan) -> dict:
    summary = distbelief.train(dataset="mnist1d", model="mlp", num_samples=plan.num_samples,
                               replicas=1, partitions=2, shards=2, balance="5,1", threads=1,
                               batch_size=64, steps=plan.throughput_steps, log_every=10,
                               run_dir=str(run_dir), **options)
    train = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"]
    first, last = train[0], train[-1]
    samples = sum(e["samples"] for e in train[1:])
    return {"samples_per_second": samples / max(last["time"] - first["time"], 1e-9),
            "reports": len(train), "test_accuracy": summary["test_accuracy"],
            "boundary_bytes": summary["partition"]["boundary_bytes"],
            "wall_seconds": summary["wall_seconds"]}


def _median(values: list[float | None]) -> float | None:
    reached = [v for v in values if v is not None]
    return statistics.median(reached) if len(reached) == len(values) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks it works")
    parser.add_argument("--target", type=float, default=0.90, help="test accuracy to reach")
    parser.add_argument("--repeats", type=int, help="rounds of the interleaved jobs")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    repeats = args.repeats or plan.repeats
    configs = {"admm_r2_fixed": CONFIGS["admm_r2_fixed"]} if args.quick else CONFIGS
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="admm-bench-") as tmp:
        root = Path(tmp)
        for repeat in range(repeats):
            for name, options in configs.items():
                result = time_to_accuracy(root / f"{name}-{repeat}", options, plan, args.target)
                log(f"{name} #{repeat}: {result['seconds']} s to {args.target:g} "
                    f"(final {result['final_accuracy']:.4f})")
                runs[name].append(result)
        dual = throughput(root / "dual", dict(algorithm="admm", local_steps=10), plan)
        log(f"dual layers: {dual['samples_per_second']:,.0f} samples/s")
        pipe = throughput(root / "pipe", dict(algorithm="downpour", split="layers"), plan)
        log(f"pipeline: {pipe['samples_per_second']:,.0f} samples/s")
    seconds = {name: _median([r["seconds"] for r in results]) for name, results in runs.items()}
    best = {}
    for r in (2, 4):
        candidates = [(s, n) for n, s in seconds.items()
                      if n.startswith(f"admm_r{r}_") and s is not None]
        best[f"admm_r{r}"] = min(candidates)[1] if candidates else None
    ratios = {}
    for peer in ("downpour_adagrad_r4", "sync_r4"):
        for admm, name in best.items():
            if peer in seconds and name is not None:
                ratios[f"{peer}_over_{admm}"] = _ratio(seconds[peer], seconds[name])
    report = {
        "benchmark": "admm", "quick": args.quick, "target_accuracy": args.target,
        "machine": {"cpus": os.cpu_count()}, "repeats": repeats,
        "time_to_accuracy": {name: {"seconds": seconds[name], "runs": results}
                             for name, results in runs.items()},
        "best_schedule": best,
        "time_ratios": ratios,
        "dual_layers": {"admm": dual, "pipeline": pipe,
                        "samples_per_second_ratio": (dual["samples_per_second"]
                                                     / pipe["samples_per_second"])},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
