"""Soak: many replicas against several shards for a bounded time, on this machine.

Runs ``distbelief train`` with 16 Downpour replicas and 4 shards (MLP on digits)
as a subprocess and, while it runs, samples the resident memory of every role
process (found among the command's descendants by their names, db-<role><id>). It
checks that

* nothing deadlocks: the job ends by itself within the time bound;
* no update is lost: the shards' count of applied pushes equals the replicas'
  count of pushes they saw acknowledged (``summary.json``);
* memory is flat after warm-up: each role's resident set at the end against
  its value once a quarter of the steps were done (start-up, imports and the
  first allocations are behind it by then).

Prints ONE JSON document on stdout; progress goes to stderr. The job's processes
are gone and its run directory removed when the command returns.

Example::

    python benchmarks/soak.py            # about 2 minutes on 2 cores
    python benchmarks/soak.py --quick    # 4 replicas, 2 shards: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from distbelief.metrics.log import read_metrics


def roles(process: psutil.Process) -> dict[str, psutil.Process]:
    """The command's role processes by name ("shard0", "replica3"), itself as "coordinator"."""
    found = {"coordinator": process}
    for child in process.children(recursive=True):
        try:
            name = child.name()  # a role process names itself "db-<role><id>"
        except psutil.Error:
            continue
        if name.startswith("db-"):
            found[name[3:]] = child
    return found


def rss_mb(processes: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, proc in processes.items():
        try:
            rss = proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
        if rss > 0:  # 0: a role that just ended (a zombie until reaped) has no memory left
            out[name] = rss
    return out


def progress(run_dir: Path, total: int) -> float:
    """The fraction of all replicas' steps reported so far."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0.0
    last: dict[int, int] = {}
    for event in read_metrics(path):
        if event["event"] == "train":
            last[event["replica"]] = event["step"]
    return sum(last.values()) / total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 replicas, 2 shards, 300 steps, on 4,000 MNIST-1D samples")
    parser.add_argument("--replicas", type=int, default=16)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="steps per replica")
    parser.add_argument("--bound", type=float, default=540.0,
                        help="seconds the job may take before it counts as hung")
    args = parser.parse_args()
    data = ["--dataset", "digits"]
    if args.quick:
        args.replicas, args.shards, args.steps, args.bound = 4, 2, 300, 240.0
        # digits costs every replica process the import of scikit-learn, most of a short
        # job's time on two cores; MNIST-1D is read from the cache the other smoke tests share
        data = ["--dataset", "mnist1d", "--num-samples", "4000"]
    with tempfile.TemporaryDirectory(prefix="distbelief-soak-") as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "distbelief.cli", "train", *data,
                   "--model", "mlp", "--replicas", str(args.replicas), "--shards",
                   str(args.shards), "--steps", str(args.steps), "--log-every", "25",
                   "--lr", "0.02", "--run-dir", str(run_dir), "--quiet"]
        start = time.monotonic()
        proc = subprocess.Popen(command, cwd=tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        coordinator = psutil.Process(proc.pid)
        total = args.replicas * args.steps
        warm: dict[str, float] = {}
        end: dict[str, float] = {}
        hung = False
        try:
            while proc.poll() is None:
                if time.monotonic() - start > args.bound:
                    hung = True
                    break
                done = progress(run_dir, total)
                if not warm and done >= 0.25:
                    warm = rss_mb(roles(coordinator))
                    end = dict(warm)  # a short job may end before the next sample
                    print(f"warm-up memory taken at {done:.0%}", file=sys.stderr)
                elif warm and done < 0.97:
                    end.update(rss_mb(roles(coordinator)))  # the last sample before the end
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                for p in [*roles(coordinator).values()]:
                    try:
                        p.send_signal(signal.SIGKILL)
                    except psutil.Error:
                        pass
            out, err = proc.communicate(timeout=60)
        wall = time.monotonic() - start
        summary = {}
        if (run_dir / "summary.json").exists():
            summary = json.loads((run_dir / "summary.json").read_text())
    applied = sum(summary.get("shard_pushes") or [0])
    acked = summary.get("pushes_acked", 0)
    growth = {name: {"warm_mb": round(warm[name], 1), "end_mb": round(end[name], 1),
                     "growth": round(end[name] / warm[name], 3)}
              for name in sorted(warm) if name in end}
    worst = max((g["growth"] for g in growth.values()), default=None)
    report = {
        "benchmark": "soak", "quick": args.quick, "replicas": args.replicas,
        "shards": args.shards, "steps_per_replica": args.steps,
        "wall_seconds": round(wall, 1), "bound_seconds": args.bound,
        "finished": proc.returncode == 0 and not hung, "hung": hung,
        "exit_code": proc.returncode,
        "pushes_applied_by_shards": applied, "pushes_acknowledged_to_replicas": acked,
        "lost_updates": acked - applied if summary else None,
        "no_lost_update": bool(summary) and applied == acked,
        "total_steps": summary.get("total_steps"), "expected_steps": total,
        "samples_per_second": summary.get("samples_per_second"),
        "test_accuracy": summary.get("test_accuracy"),
        "store_keys_at_end": summary.get("store_keys"),
        "rss": growth, "max_rss_growth": worst,
        "memory_flat": worst is not None and worst <= 1.10,
        "targets": {"memory_flat": "every role's resident memory at the end within 10% of "
                                   "its value after warm-up (a quarter of the steps)"},
        "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
        "stderr_tail": err.strip().splitlines()[-3:] if proc.returncode else [],
    }
    print(json.dumps(report, indent=2))
    return 0 if report["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
