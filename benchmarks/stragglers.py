"""Robustness to a slow machine: Sandblaster's portions and backups, sync's fraction.

Measures, in one run, with one worker made 4x slower (``--slow-worker``, which
sleeps 3x as long as it computed) and each figure next to the same one without
a slow worker:

* Sandblaster L-BFGS (W workers, fixed-step iterations so every iteration is
  one batch): seconds per iteration with dynamic portions and backups
  (``--portions 8W --backups``) versus a static equal split of the data
  (``--portions W --no-backups``: each worker gets one W-th, and the batch waits
  for the slowest). Target: dynamic >= 2x faster with the slow worker.
* Synchronous all-reduce (R replicas): seconds per step with
  ``--sync-fraction 0.75`` (a step completes once the fastest 3/4 reported;
  the late gradient is dropped) versus 1.0. Target: >= 2x faster.

Each configuration is a real local job through `distbelief.train`. Seconds per
iteration (step) come from the job's metrics.jsonl: the median of the
iterations after the first (Sandblaster), or the time between the first and
last report of replica 0 over the steps between them (sync), so process
start-up is not counted. Prints ONE JSON document on stdout; progress goes to
stderr.

Example::

    python benchmarks/stragglers.py            # ~3 minutes on 2 cores
    python benchmarks/stragglers.py --quick    # smoke test
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

SLOW = 4.0
TARGET = 2.0


@dataclass(frozen=True, kw_only=True)
class Plan:
    """The size of every job; the configurations (portions, backups, fractions) are fixed."""

    num_samples: int
    """MNIST-1D samples generated (a fifth of them held out): one Sandblaster iteration is
    one pass over the training part."""
    sandblaster_steps: int
    """L-BFGS iterations per job; the first (start-up) is not timed, so at least 2."""
    sync_steps: int
    """Steps per sync job; timed between replica 0's first and last report."""
    sync_log_every: int
    """Steps between reports: sync_steps >= 2 x this leaves at least one step timed."""


FULL = Plan(num_samples=20000, sandblaster_steps=4, sync_steps=40, sync_log_every=5)
QUICK = Plan(num_samples=1000, sandblaster_steps=2, sync_steps=2, sync_log_every=1)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sandblaster_seconds(run_root: Path, name: str, *, workers: int, portions: int,
                        backups: bool, slow: bool, plan: Plan) -> dict:
    run_dir = run_root / name
    options = dict(algorithm="sandblaster", dataset="mnist1d", model="cnn",
                   num_samples=plan.num_samples, replicas=workers, shards=2,
                   portions=portions, backups=backups, line_search="none", lr=0.5, history=5,
                   steps=plan.sandblaster_steps, tolerance_grad=0.0, tolerance_change=0.0,
                   run_dir=str(run_dir))
    if slow:
        options["slow_worker"] = f"{workers - 1}:{SLOW:g}"
    began = time.perf_counter()
    summary = distbelief.train(**options)
    train = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"]
    per_iteration = [e["seconds"] for e in train[1:]]  # the first includes start-up
    stats = summary["sandblaster"]
    result = {"seconds_per_iteration": statistics.median(per_iteration),
              "iterations_timed": len(per_iteration), "portions": portions, "backups": backups,
              "slow_worker": options.get("slow_worker"),
              "backups_issued": stats["backups_issued"],
              "answers_discarded": stats["answers_discarded"],
              "job_seconds": time.perf_counter() - began}
    log(f"sandblaster {name}: {result['seconds_per_iteration']:.3f} s/iteration")
    return result


def sync_seconds(run_root: Path, name: str, *, replicas: int, fraction: float, slow: bool,
                 plan: Plan) -> dict:
    run_dir = run_root / name
    options = dict(algorithm="sync", dataset="mnist1d", model="cnn",
                   num_samples=plan.num_samples, replicas=replicas, shards=1,
                   batch_size=256, steps=plan.sync_steps, log_every=plan.sync_log_every,
                   sync_fraction=fraction,
                   rule="sgd", lr=0.05, run_dir=str(run_dir))
    if slow:
        options["slow_worker"] = f"{replicas - 1}:{SLOW:g}"
    began = time.perf_counter()
    summary = distbelief.train(**options)
    reports = [e for e in read_metrics(run_dir / "metrics.jsonl")
               if e["event"] == "train" and e["replica"] == 0]
    first, last = reports[0], reports[-1]
    result = {"seconds_per_step": (last["time"] - first["time"]) / (last["step"] - first["step"]),
              "steps_timed": last["step"] - first["step"], "sync_fraction": fraction,
              "slow_worker": options.get("slow_worker"),
              "late_gradients_dropped": summary["late_gradients_dropped"],
              "job_seconds": time.perf_counter() - began}
    log(f"sync {name}: {result['seconds_per_step']:.3f} s/step")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks it works")
    parser.add_argument("--workers", type=int, default=4, help="Sandblaster workers and "
                        "sync replicas (one of them is the slow one)")
    args = parser.parse_args(argv)
    w, plan = args.workers, QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="stragglers-") as tmp:
        root = Path(tmp)
        blaster = {
            "dynamic_slow": sandblaster_seconds(root, "dynamic_slow", workers=w, portions=8 * w,
                                                backups=True, slow=True, plan=plan),
            "static_slow": sandblaster_seconds(root, "static_slow", workers=w, portions=w,
                                               backups=False, slow=True, plan=plan),
            "dynamic": sandblaster_seconds(root, "dynamic", workers=w, portions=8 * w,
                                           backups=True, slow=False, plan=plan),
            "static": sandblaster_seconds(root, "static", workers=w, portions=w,
                                          backups=False, slow=False, plan=plan),
        }
        sync = {
            "fraction_0.75_slow": sync_seconds(root, "f075_slow", replicas=w, fraction=0.75,
                                               slow=True, plan=plan),
            "fraction_1_slow": sync_seconds(root, "f1_slow", replicas=w, fraction=1.0,
                                            slow=True, plan=plan),
            "fraction_0.75": sync_seconds(root, "f075", replicas=w, fraction=0.75, slow=False,
                                          plan=plan),
            "fraction_1": sync_seconds(root, "f1", replicas=w, fraction=1.0, slow=False,
                                       plan=plan),
        }
    blaster_speedup = (blaster["static_slow"]["seconds_per_iteration"]
                       / blaster["dynamic_slow"]["seconds_per_iteration"])
    sync_speedup = (sync["fraction_1_slow"]["seconds_per_step"]
                    / sync["fraction_0.75_slow"]["seconds_per_step"])
    report = {
        "benchmark": "stragglers", "quick": args.quick, "slow_factor": SLOW, "workers": w,
        "machine": {"cpus": os.cpu_count()},
        "sandblaster": {**blaster, "speedup_dynamic_vs_static_with_slow_worker": blaster_speedup,
                        "target": TARGET, "met": blaster_speedup >= TARGET},
        "sync": {**sync, "speedup_fraction_0.75_vs_1_with_slow_worker": sync_speedup,
                 "target": TARGET, "met": sync_speedup >= TARGET},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
