"""Start-up stress: many small jobs back to back, each must reach its first train event.

A job that opens its connections badly does not fail: it hangs, and only the
coordinator's "no replica reported progress for 120 s" tells. This benchmark
starts `--runs` small jobs one after the other, cycling through every way a
job opens connections (1-4 shards, 1-6 replicas, shm and gloo, chunked layouts,
partitions split by layers and by units, data servers, Sandblaster workers,
sync with and without a quorum, Hogwild), optionally while `--load N` busy-loop
processes compete for the cores, and checks that each job reaches its first
"train" event (metrics.jsonl) within `--bound` seconds and finishes.

The jobs run through `distbelief.train` in a worker process of this script
(one interpreter and one role zygote for many jobs, as a long-lived user of the
API would have), so a job costs its own start-up, not Python's. A job with no
train event after `--bound` seconds counts as a hang: the worker and every
process under it are killed by PID, their role logs' last lines are kept in the
report, and a fresh worker takes the next job (the killed job's few /dev/shm files,
distbelief-<token>-*, stay behind).

Start-up is the first train event's ``time``: seconds since the coordinator
began the job (store up, data loaded), through spawning the roles, their
connections and the first logged step. The peer, measured in the same run, is
what plain torch.distributed pays to start: fresh interpreters that import
torch, join one gloo group and all-reduce once.

Prints ONE JSON document on stdout; progress goes to stderr. Example::

    python benchmarks/startup_stress.py --runs 40            # a few minutes on 2 cores
    python benchmarks/startup_stress.py --runs 40 --load 2   # with 2 busy processes beside
    python benchmarks/startup_stress.py --quick              # two jobs: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

BASE = {"dataset": "digits", "model": "mlp", "steps": 3, "log_every": 1}
"""Every job: real data, a small model, a few steps, a train event after the first."""


def _downpour(rng: random.Random) -> dict:
    return {"shards": rng.randint(1, 4), "replicas": rng.randint(1, 6)}


def _gloo(rng: random.Random) -> dict:
    return {"shards": rng.randint(1, 3), "replicas": rng.randint(1, 4), "transport": "gloo"}


def _chunks(rng: random.Random) -> dict:
    return {"shards": rng.randint(2, 4), "replicas": rng.randint(1, 3),
            "shard_layout": "chunks", "chunk_bytes": 4096,
            "transport": rng.choice(["auto", "gloo"])}


def _layers(rng: random.Random) -> dict:
    return {"shards": 2, "replicas": rng.randint(1, 3), "partitions": 2, "split": "layers"}


def _units(rng: random.Random) -> dict:
    return {"shards": 2, "replicas": rng.randint(1, 2), "partitions": 2, "split": "units"}


def _data_servers(rng: random.Random) -> dict:
    return {"shards": rng.randint(1, 2), "replicas": rng.randint(1, 4),
            "data_servers": rng.randint(1, 2)}


def _sync(rng: random.Random) -> dict:
    return {"algorithm": "sync", "shards": rng.randint(1, 2), "replicas": rng.randint(2, 4),
            "data_servers": rng.choice([0, 1])}


def _sync_quorum(rng: random.Random) -> dict:
    return {"algorithm": "sync", "shards": 1, "replicas": rng.randint(3, 4),
            "sync_fraction": 0.75}


def _sandblaster(rng: random.Random) -> dict:
    # L-BFGS reports every iteration (no log_every); two iterations are enough
    return {"algorithm": "sandblaster", "shards": rng.randint(1, 2),
            "replicas": rng.randint(1, 3), "steps": 2, "log_every": None,
            "transport": rng.choice(["auto", "gloo"])}


def _hogwild(rng: random.Random) -> dict:
    return {"algorithm": "hogwild", "workers": rng.randint(2, 4)}


def _admm(rng: random.Random) -> dict:
    # the round closer and its answers; with 2 partitions, each boundary's links too
    return {"algorithm": "admm", "shards": 2, "replicas": rng.randint(1, 3), "steps": 4,
            "local_steps": 2, "partitions": rng.choice([1, 2]),
            "transport": rng.choice(["auto", "gloo"])}


CONFIGURATIONS = {
    "downpour": _downpour, "downpour_gloo": _gloo, "chunks": _chunks,
    "partitions_layers": _layers, "partitions_units": _units,
    "data_servers": _data_servers, "sync": _sync, "sync_quorum": _sync_quorum,
    "sandblaster": _sandblaster, "hogwild": _hogwild, "admm": _admm,
}
"""Every path that opens connections, each a function of a seeded RNG -> options."""


def job_options(name: str, draw: int, seed: int) -> dict:
    """The options of configuration `name`'s `draw`-th job (the same for the same seed)."""
    options = {**BASE, **CONFIGURATIONS[name](random.Random(f"{seed}/{name}/{draw}"))}
    return {k: v for k, v in options.items() if v is not None}


# ---- the worker: runs the jobs it is sent, one JSON line back each --------------------


def worker() -> int:
    """Read {"options", "run_dir", "timeout"} lines; run each job; answer one line each."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the jobs print goes to stderr, not into the answers
    from distbelief.runtime.launch import QUICK_RESOLVER

    os.environ.setdefault("RES_OPTIONS", QUICK_RESOLVER)  # as `distbelief train` does
    import distbelief

    for line in sys.stdin:
        spec = json.loads(line)
        try:
            summary = distbelief.train(show_progress=False, run_dir=spec["run_dir"],
                                       timeout=spec["timeout"], **spec["options"])
            answer = {"ok": True, "wall_seconds": summary["wall_seconds"],
                      "transport_bytes": summary.get("transport_bytes"),
                      "replicas_lost": summary.get("replicas_lost")}
        except Exception as exc:  # noqa: BLE001 - reported as this job's failure
            text = str(exc).strip().splitlines()
            answer = {"ok": False, "error": f"{type(exc).__name__}: {text[0] if text else ''}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


class Worker:
    """The worker process, its answers read without blocking; killed with everything
    under it by PID."""

    def __init__(self, stderr_path: Path):
        self._stderr = open(stderr_path, "ab")
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, bufsize=1)
        self._select = selectors.DefaultSelector()
        self._select.register(self.proc.stdout, selectors.EVENT_READ)

    def send(self, spec: dict) -> None:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()

    def answer(self, wait: float) -> dict | None:
        """The next answer, or None when none came within `wait` seconds. A worker that
        died answers {"ok": False, ...}."""
        if not self._select.select(wait):
            return None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            return {"ok": False, "error": f"the worker exited with code {self.proc.returncode}"}
        return json.loads(line)

    def kill(self) -> None:
        """SIGKILL the worker and every process under it (zygote, roles), each by PID."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        for proc in [*tree, psutil.Process(self.proc.pid)]:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        self.close()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._select.close()
        self.proc.stdout.close()
        self._stderr.close()


# ---- one job ---------------------------------------------------------------------------


def first_train_time(run_dir: Path) -> float | None:
    """The `time` of the first train event in the run's metrics, or None (yet)."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:  # a line still being written
            continue
        if event.get("event") == "train":
            return float(event["time"])
    return None


def log_tails(run_dir: Path, lines: int = 2) -> dict[str, str]:
    """The last lines of every role's log (for a job that hung or failed)."""
    tails = {}
    for path in sorted((run_dir / "logs").glob("*.log")):
        try:
            text = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            continue
        tails[path.stem] = " | ".join(text[-lines:])
    return tails


def run_one(worker: Worker, run: int, name: str, options: dict, run_dir: Path,
            bound: float, timeout: float) -> dict:
    """Send one job to the worker and follow it; its record. The worker is dead when the
    record's outcome is "hang" (the caller starts a new one)."""
    began = time.monotonic()
    worker.send({"options": options, "run_dir": str(run_dir), "timeout": timeout})
    record = {"run": run, "config": name, "options": options}
    first_wall = None
    answer = None
    while answer is None:
        answer = worker.answer(0.05)
        elapsed = time.monotonic() - began
        if first_wall is None and first_train_time(run_dir) is not None:
            first_wall = elapsed
        if answer is None and first_wall is None and elapsed > bound:
            record.update(outcome="hang", phase="start-up", seconds=elapsed,
                          logs=log_tails(run_dir))
            worker.kill()
            return record
        if answer is None and elapsed > bound + 4 * timeout:  # started, then stuck
            record.update(outcome="hang", phase="after the first train event",
                          seconds=elapsed, logs=log_tails(run_dir))
            worker.kill()
            return record
    startup = first_train_time(run_dir)
    record.update(job_seconds=time.monotonic() - began, startup_seconds=startup,
                  first_train_wall_seconds=first_wall)
    if not answer["ok"]:
        record.update(outcome="failure", error=answer["error"], logs=log_tails(run_dir))
    elif startup is None or startup > bound:
        record.update(outcome="slow" if startup is not None else "failure",
                      error=("no train event" if startup is None
                             else f"first train event after {startup:.1f} s"))
    else:
        record.update(outcome="ok", transport_bytes=answer["transport_bytes"])
    return record


# ---- the peer ------------------------------------------------------------------------------

PEER = """
import datetime, sys, time
import torch, torch.distributed as dist
rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world, timeout=datetime.timedelta(seconds=60))
t = torch.ones(4)
dist.all_reduce(t)
assert t[0].item() == world
dist.barrier()
dist.destroy_process_group()
"""


def peer_gloo_world(world: int, bound: float) -> dict:
    """Seconds for `world` fresh interpreters to import torch, join one gloo group and
    all-reduce once (what a plain torch.distributed job pays to start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    began = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", PEER, str(r), str(world), str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for r in range(world)]
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(max(1.0, bound - (time.monotonic() - began))))
    except subprocess.TimeoutExpired:
        codes.append(None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return {"processes": world, "seconds": time.monotonic() - began,
            "ok": all(c == 0 for c in codes) and len(codes) == world}


# ---- the report ----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(records: list[dict]) -> dict:
    startups = [r["startup_seconds"] for r in records if r.get("startup_seconds") is not None]
    jobs = [r["job_seconds"] for r in records if r.get("job_seconds") is not None]
    walls = [r["first_train_wall_seconds"] for r in records
             if r.get("first_train_wall_seconds") is not None]
    slowest = max((r for r in records if r.get("startup_seconds") is not None),
                  key=lambda r: r["startup_seconds"], default=None)
    per_config: dict[str, dict] = {}
    for r in records:
        c = per_config.setdefault(r["config"], {"runs": 0, "ok": 0, "hangs": 0, "failures": 0,
                                                "slow": 0, "slowest_startup_seconds": None})
        c["runs"] += 1
        c[{"ok": "ok", "hang": "hangs", "failure": "failures", "slow": "slow"}[r["outcome"]]] += 1
        if r.get("startup_seconds") is not None:
            c["slowest_startup_seconds"] = max(c["slowest_startup_seconds"] or 0.0,
                                               r["startup_seconds"])
    return {
        "hangs": sum(r["outcome"] == "hang" for r in records),
        "failures": sum(r["outcome"] == "failure" for r in records),
        "slow": sum(r["outcome"] == "slow" for r in records),
        "ok": sum(r["outcome"] == "ok" for r in records),
        "startup_seconds": {"p50": percentile(startups, 0.5), "p95": percentile(startups, 0.95),
                            "slowest": max(startups, default=None),
                            "mean": statistics.fmean(startups) if startups else None},
        "first_train_wall_seconds": {"p50": percentile(walls, 0.5),
                                     "p95": percentile(walls, 0.95),
                                     "slowest": max(walls, default=None)},
        "job_seconds": {"p50": percentile(jobs, 0.5), "slowest": max(jobs, default=None)},
        "slowest": None if slowest is None else {
            k: slowest[k] for k in ("run", "config", "options", "startup_seconds")},
        "configurations": per_config,
        "problems": [r for r in records if r["outcome"] != "ok"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40, help="jobs to start, one after another")
    parser.add_argument("--quick", action="store_true",
                        help="two jobs (downpour over shm and over gloo), no peer: a smoke test")
    parser.add_argument("--bound", type=float, default=30.0,
                        help="seconds a job may take to its first train event before it "
                             "counts as hung")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="the jobs' --timeout (any single wait inside a job)")
    parser.add_argument("--load", type=int, default=0,
                        help="busy-loop processes competing for the cores meanwhile")
    parser.add_argument("--seed", type=int, default=0, help="draws the jobs' sizes")
    parser.add_argument("--only", default=None,
                        help="comma-separated configurations to cycle through (default: all "
                             f"of {', '.join(CONFIGURATIONS)})")
    parser.add_argument("--no-peer", action="store_true", help="skip the torch.distributed peer")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker()
    runs = 2 if args.quick else args.runs
    names = list(CONFIGURATIONS) if args.only is None else args.only.split(",")
    unknown = sorted(set(names) - set(CONFIGURATIONS))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: not a configuration; choose from "
                     f"{', '.join(CONFIGURATIONS)}")
    plan = [(run, names[run % len(names)],
             job_options(names[run % len(names)], run // len(names), args.seed))
            for run in range(runs)]
    load_before = os.getloadavg()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.load)]
    records: list[dict] = []
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="startup-stress-") as tmp:
            worker_log = Path(tmp) / "worker.log"
            current: Worker | None = None
            try:
                for run, name, options in plan:
                    if current is None:
                        current = Worker(worker_log)
                    run_dir = Path(tmp) / f"run{run}"
                    record = run_one(current, run, name, options, run_dir, args.bound,
                                     args.timeout)
                    records.append(record)
                    print(f"run {run} {name} {options}: {record['outcome']}, start-up "
                          f"{record.get('startup_seconds') or float('nan'):.2f} s",
                          file=sys.stderr)
                    if record["outcome"] == "hang":
                        current = None  # killed with its children
                    shutil.rmtree(run_dir, ignore_errors=True)
            finally:
                if current is not None:
                    current.close()
            peer = None if (args.quick or args.no_peer) else peer_gloo_world(4, 120.0)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait(10)
    stats = summarise(records)
    report = {
        "benchmark": "startup_stress", "quick": args.quick, "runs": len(records),
        "bound_seconds": args.bound, "job_timeout_seconds": args.timeout,
        "load_processes": args.load, "seed": args.seed,
        "wall_seconds": time.monotonic() - began,
        "machine": {"cpus": os.cpu_count(), "load_before": list(load_before),
                    "load_after": list(os.getloadavg())},
        **stats,
        "peers": {} if peer is None else {"torch_gloo_world": peer},
        "target": {"hangs": 0, "failures": 0, "startup_within_seconds": args.bound},
        "met": stats["hangs"] == 0 and stats["failures"] == 0 and stats["slow"] == 0,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
