"""Is Downpour as fast as torch DDP? (issue #12): samples/s, start-up and time to 0.95.

Every peer trains the built-in CNN on MNIST-1D (40,000 training, 10,000 test
samples) with Adagrad (lr 0.02, the ``make demo`` job's), batch 64 per worker,
one torch thread per process (``OMP_NUM_THREADS=1`` for every process,
``--threads 1`` for distbelief's workers), for 6 epochs, from the same weights.
Why 6: fetch = push = 4 makes one update per 256 samples of a replica, and
after 4 epochs it ended between 0.93 and 0.97; lr 0.04 made it worse (0.87).

* ``plain``: one process, a ``torch.optim.Adagrad`` loop: what a user has without us;
* ``ddp``: ``DistributedDataParallel``, 2 processes over gloo, rank r on
  distbelief's replica r half of the data, in that replica's batch order;
* ``downpour_f1`` / ``downpour_f4``: Downpour, 2 replicas, 2 shards,
  fetch = push = 1 (the demo) and fetch = push = 4;
* ``downpour_r1``: Downpour, 1 replica, 1 shard, fetch = push = 1, whose
  ``samples_per_second_vs_plain`` is its steady rate over the plain loop's;
* ``sync``: ``--algorithm sync``, 2 replicas; ``hogwild``: ``--workers 2``.

plain and ddp are this script as child processes (``--worker``) built from
distbelief's ``load_dataset``, ``replica_indices``, ``BatchStream`` and
``build_model``: the same data, batches and weights as distbelief's workers,
which run as the venv's ``distbelief train`` (its ``metrics.jsonl`` is read).

Per run, all times count from the command's start (imports, data loading and
process start-up included, so the peers compare):

* ``startup_seconds``: to the first train report; every peer reports every 10
  steps (``--log-every 10``), so it is the first 10 steps done.
  ``training_began_seconds``: when the first step began (distbelief: its first
  report's time less that report's samples over its rate). distbelief's event
  times count from its job start, placed by the mtime of ``config.toml``
  (written just before it).
* ``steady_samples_per_second``: every worker's rate over its reports after the
  first ``WARMUP_FRACTION`` of its training span, summed over the workers.
* ``time_to_target_seconds``: when the parameters that first reached 0.95 test
  accuracy existed (``..._training_seconds``: less training_began); null when
  no evaluation within the budget reached it.

Evaluation: all 10,000 test samples, every 12,800 samples trained (2 workers x
64 x ``eval_every`` = 100 steps; plain: 200 steps) and at the end. One
evaluation costs about as much as training 3,500 samples, so a denser cadence
slows distbelief, whose coordinator evaluates on the same cores while the
workers train (every 6,400 samples cost a Downpour run about a third of its
throughput); the report estimates that share (``eval_cpu_share_estimate``).
plain and ddp copy their parameters at those points and evaluate the copies
after training: the clock is stopped, which favours the baseline. A
distbelief evaluation is dated by the leading worker's report of the step
that triggered it (its parameters are pulled right after).

Runs are interleaved (the order rotates each round), round r with seed r for
every peer (the seed also generates the data; each seed's cache is made first).
Ratios are of medians against ddp's: samples/s (above 1: faster) and time to
0.95 (below 1: faster); a run that never reached 0.95 counts as infinitely
slow. The 2-worker peers need both cores, so other jobs depress them most: the
machine's load is recorded.

``--quick`` (the smoke test): plain, ddp and downpour_f1 only, 1 round, 4,000
MNIST-1D samples, 2 epochs: it checks that everything runs, not the numbers.

Prints ONE JSON document on stdout; progress goes to stderr. Every child is
reaped (SIGTERM, then SIGKILL) and the run directories removed on return.

Example::

    python benchmarks/vs_ddp.py            # ~8 minutes on 2 busy cores
    python benchmarks/vs_ddp.py --quick    # smoke test, ~20 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

TARGET_ACCURACY = 0.95
WARMUP_FRACTION = 0.2  # of each worker's training span, left out of the steady rate
LOG_EVERY = 10
RUN_TIMEOUT = 600.0  # seconds one peer run may take before it is killed
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


@dataclass(frozen=True)
class Plan:
    dataset: str
    num_samples: int | None  # None: the dataset's default (50,000 for mnist1d)
    model: str
    batch_size: int
    rule: str
    lr: float
    epochs: float
    eval_every: int  # steps per worker of a 2-worker peer between evaluations
    peers: tuple[str, ...]
    repeats: int


@dataclass(frozen=True)
class Peer:
    name: str
    workers: int
    options: tuple[str, ...] = ()  # distbelief train options; () for plain and ddp


PEERS = {p.name: p for p in (
    Peer("plain", 1), Peer("ddp", 2),
    Peer("downpour_f1", 2, ("--algorithm", "downpour", "--replicas", "2", "--shards", "2",
                            "--n-fetch", "1", "--n-push", "1")),
    Peer("downpour_f4", 2, ("--algorithm", "downpour", "--replicas", "2", "--shards", "2",
                            "--n-fetch", "4", "--n-push", "4")),
    Peer("downpour_r1", 1, ("--algorithm", "downpour", "--replicas", "1", "--shards", "1",
                            "--n-fetch", "1", "--n-push", "1")),
    Peer("sync", 2, ("--algorithm", "sync", "--replicas", "2")),
    Peer("hogwild", 2, ("--algorithm", "hogwild", "--workers", "2")))}

FULL = Plan(dataset="mnist1d", num_samples=None, model="cnn", batch_size=64, rule="adagrad",
            lr=0.02, epochs=6, eval_every=100, peers=tuple(PEERS), repeats=3)
QUICK = Plan(dataset="mnist1d", num_samples=4000, model="cnn", batch_size=64, rule="adagrad",
             lr=0.02, epochs=2, eval_every=10, peers=("plain", "ddp", "downpour_f1"), repeats=1)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---- plain and ddp: this script as a child process --------------------------------------


def worker(spec: dict) -> None:
    """One plain process or one DDP rank; writes its reports and evaluations to spec["out"].
    With spec["device"] == "cuda" (benchmarks/gpu.py) each rank trains on GPU rank mod
    count, over spec["backend"] (NCCL); otherwise on the CPU over gloo."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    from distbelief.algorithms.schedule import steps_per_replica
    from distbelief.data.datasets import BatchStream, load_dataset, replica_indices
    from distbelief.model.evaluate import evaluate
    from distbelief.model.zoo import build_model

    def now() -> float:
        return time.time() - spec["t0"]

    torch.set_num_threads(1)
    rank, world, batch = spec["rank"], spec["world"], spec["batch_size"]
    device = torch.device("cpu")
    if spec.get("device") == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)

    def finished() -> None:  # a report or snapshot counts finished steps only
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if world > 1:  # a file rendezvous: no port to pick, so none to collide with other jobs
        dist.init_process_group(spec.get("backend", "gloo"),
                                init_method=f"file://{spec['rendezvous']}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=spec["timeout"]))
    data = load_dataset(spec["dataset"], seed=spec["seed"], num_samples=spec["num_samples"])
    torch.manual_seed(spec["seed"])  # as load_data_and_model: the distbelief workers' weights
    model = build_model(spec["model"], data.input_shape, data.num_classes).to(device)
    ids = [device.index] if device.type == "cuda" else None
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    optimizer = torch.optim.Adagrad(model.parameters(), lr=spec["lr"])
    steps = steps_per_replica(steps=None, epochs=spec["epochs"], train_samples=len(data.y_train),
                              replicas=world, batch_size=batch)
    stream = BatchStream(data.x_train, data.y_train,
                         replica_indices(len(data.y_train), rank, world, spec["seed"]), batch,
                         seed=spec["seed"] * 1000 + rank)  # distbelief's replica `rank` order
    snap_every = spec["eval_samples"] // (batch * world)
    reports, snapshots, samples, began = [], [], 0, now()
    for step in range(1, steps + 1):
        xb, yb = (t.to(device, non_blocking=True) for t in stream.next())
        optimizer.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        optimizer.step()
        samples += len(yb)
        if step % LOG_EVERY == 0 or step == steps:
            finished()
            reports.append({"time": now(), "step": step, "samples": samples})
            samples = 0
        if rank == 0 and (step % snap_every == 0 or step == steps):  # a copy; evaluated below
            finished()
            snapshots.append((now(), step, parameters_to_vector(model.parameters()).clone()))
    if world > 1:
        # both ranks done with every collective before either tears its pairs down: a rank
        # that destroys the group while its peer still talks aborts the peer ("terminate
        # called without an active exception", seen once)
        dist.barrier()
        dist.destroy_process_group()
    model.cpu()
    evals = []
    for i, (seconds, step, params) in enumerate(snapshots):  # the clock is stopped now
        if evals and evals[-1]["test_accuracy"] >= spec["target"] and i < len(snapshots) - 1:
            continue  # the first crossing is known: only the final one is still needed
        vector_to_parameters(params.cpu(), model.parameters())
        evals.append({"seconds": seconds, "step": step, "samples": step * batch * world,
                      "test_accuracy": evaluate(model, data.x_test, data.y_test)["accuracy"]})
    Path(spec["out"]).write_text(json.dumps({"began": began, "reports": reports,
                                             "evals": evals, "test_samples": len(data.y_test)}))


# ---- the parent: start, reap and read every peer run ------------------------------------


def run_children(commands: list[list[str]], logs: list[Path], timeout: float) -> float:
    """Start the commands together and wait for all; seconds they took. Every child is
    reaped whatever happens (SIGTERM, then SIGKILL); RuntimeError naming a failed one."""
    env = {**os.environ, **CHILD_ENV}
    procs: list[subprocess.Popen] = []
    began = time.time()
    try:
        for command, path in zip(commands, logs):
            with open(path, "w") as out:
                procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                              env=env, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        for proc, path in zip(procs, logs):
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if rc != 0:
                raise RuntimeError(f"{' '.join(proc.args[:4])} ... exited with {rc}: "
                                   f"{path.read_text()[-1500:]}")
        return time.time() - began
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # distbelief's coordinator unwinds and reaps its roles
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def run_local(peer: Peer, plan: Plan, seed: int, root: Path, *, script: str = __file__,
              extra: dict | None = None) -> dict:
    """plain or ddp: `script`'s workers (this one's by default, with `extra` in their spec);
    their reports and evaluations."""
    spec = {"world": peer.workers, "t0": time.time(), "dataset": plan.dataset,
            "num_samples": plan.num_samples, "model": plan.model, "batch_size": plan.batch_size,
            "lr": plan.lr, "epochs": plan.epochs, "seed": seed, "target": TARGET_ACCURACY,
            "eval_samples": eval_samples(plan), "timeout": RUN_TIMEOUT,
            "rendezvous": str(root / "rendezvous"), **(extra or {})}
    outs = [root / f"rank{r}.json" for r in range(peer.workers)]
    commands = [[sys.executable, script, "--worker",
                 json.dumps({**spec, "rank": r, "out": str(outs[r])})] for r in range(peer.workers)]
    wall = run_children(commands, [root / f"rank{r}.log" for r in range(peer.workers)],
                        RUN_TIMEOUT)
    ranks = [json.loads(o.read_text()) for o in outs]
    return {"wall_seconds": wall, "began": [r["began"] for r in ranks],
            "reports": [r["reports"] for r in ranks], "evals": ranks[0]["evals"],
            "test_samples": ranks[0]["test_samples"]}


def run_distbelief(peer: Peer, plan: Plan, seed: int, root: Path) -> dict:
    """One `distbelief train` job; its metrics on this script's clock (from the command)."""
    exe = Path(sys.executable).with_name("distbelief")
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "distbelief.cli"]
    run_dir = root / "run"
    command = [*base, "train", *peer.options, "--dataset", plan.dataset, "--model", plan.model,
               "--batch-size", str(plan.batch_size), "--rule", plan.rule, "--lr", str(plan.lr),
               "--epochs", str(plan.epochs),
               "--eval-every", str(plan.eval_every * 2 // peer.workers),  # the same samples
               "--log-every", str(LOG_EVERY), "--threads", "1", "--seed", str(seed),
               "--run-dir", str(run_dir), "--quiet"]
    if plan.num_samples is not None:
        command += ["--num-samples", str(plan.num_samples)]
    t0 = time.time()
    wall = run_children([command], [root / "train.log"], RUN_TIMEOUT)
    offset = (run_dir / "config.toml").stat().st_mtime - t0  # job start on our clock
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if line.strip()]
    train = [e for e in events if e["event"] == "train"]
    workers = sorted({e["replica"] for e in train})
    reports = [[{"time": offset + e["time"], "step": e["step"], "samples": e["samples"]}
                for e in train if e["replica"] == w] for w in workers]
    firsts = [next(e for e in train if e["replica"] == w) for w in workers]
    began = [offset + e["time"] - e["samples"] / e["samples_per_second"] for e in firsts]
    evals = []
    for e in (e for e in events if e["event"] == "eval"):
        reached = [t["time"] for t in train if t["step"] >= e["step"]]
        pulled = max(t["time"] for t in train) if e.get("final") else min(reached)
        evals.append({"seconds": offset + pulled, "step": e["step"],  # leading worker's step
                      "samples": e["step"] * plan.batch_size * peer.workers,
                      "test_accuracy": e["test_accuracy"]})
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"wall_seconds": wall, "began": began, "reports": reports, "evals": evals,
            "test_samples": summary["test_samples"], "command": command[1:]}


def steady_rate(reports: list[dict]) -> float:
    """One worker's samples/s over its reports after the warm-up part of its span."""
    first, last = reports[0]["time"], reports[-1]["time"]
    cut = first + WARMUP_FRACTION * (last - first)
    start = next(i for i, r in enumerate(reports) if r["time"] >= cut)
    start = min(start, len(reports) - 2)  # at least one report interval
    window = reports[start + 1:]
    return sum(r["samples"] for r in window) / (reports[-1]["time"] - reports[start]["time"])


def measure(peer: Peer, plan: Plan, seed: int, root: Path, eval_seconds: float) -> dict:
    """One run of one peer, reduced to the numbers the report needs."""
    load = os.getloadavg()[0]
    raw = (run_distbelief if peer.options else run_local)(peer, plan, seed, root)
    reports = [r for r in raw["reports"] if len(r) >= 2]
    began = min(raw["began"])
    hit = next((e for e in raw["evals"] if e["test_accuracy"] >= TARGET_ACCURACY), None)
    span = max(r[-1]["time"] for r in reports) - began
    result = {
        "peer": peer.name, "seed": seed, "load_before": load, "wall_seconds": raw["wall_seconds"],
        "startup_seconds": min(r[0]["time"] for r in raw["reports"]),
        "training_began_seconds": began, "training_seconds": span,
        "samples": sum(x["samples"] for r in raw["reports"] for x in r),
        "steady_samples_per_second": sum(steady_rate(r) for r in reports),
        "time_to_target_seconds": hit["seconds"] if hit else None,
        "time_to_target_training_seconds": hit["seconds"] - began if hit else None,
        "samples_to_target": hit["samples"] if hit else None,
        "final_test_accuracy": raw["evals"][-1]["test_accuracy"],
        "test_samples": raw["test_samples"],
        "evals": [[round(e["seconds"], 3), e["samples"], e["test_accuracy"]] for e in raw["evals"]],
    }
    if peer.options:  # its evaluations ran on the same cores while it trained
        result["command"] = raw["command"]
        result["eval_cpu_share_estimate"] = (len(raw["evals"]) * eval_seconds
                                             / (len(reports) * span))
    to = "never" if hit is None else f"{hit['seconds']:.1f} s"
    log(f"{peer.name} seed {seed}: {result['steady_samples_per_second']:,.0f} samples/s, "
        f"start-up {result['startup_seconds']:.1f} s, to {TARGET_ACCURACY}: {to}, final "
        f"{result['final_test_accuracy']:.4f}")
    return result


def eval_samples(plan: Plan) -> int:
    return plan.eval_every * plan.batch_size * 2  # 2 workers' steps: one cadence for all


def prepare(plan: Plan) -> float:
    """Generate each seed's dataset once (its cache), so no run pays for it; the seconds of
    one evaluation of the test set on one thread (to estimate distbelief's evaluation cost)."""
    import torch

    from distbelief.data.datasets import load_dataset
    from distbelief.model.evaluate import evaluate
    from distbelief.model.zoo import build_model

    torch.set_num_threads(1)
    for seed in range(plan.repeats):
        data = load_dataset(plan.dataset, seed=seed, num_samples=plan.num_samples)
    model = build_model(plan.model, data.input_shape, data.num_classes)
    evaluate(model, data.x_test, data.y_test)
    began = time.perf_counter()
    evaluate(model, data.x_test, data.y_test)
    return time.perf_counter() - began


def _median(values: list[float | None]) -> float | None:
    """Median with None (never reached) counting as infinitely slow; None when it is the median."""
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else m


def summarise(runs: list[dict], plan: Plan, eval_seconds: float, load_before: list[float],
              seconds: float, quick: bool) -> dict:
    peers = {}
    for name in plan.peers:
        mine = [r for r in runs if r["peer"] == name]
        ok = [r for r in mine if "error" not in r]
        peers[name] = {
            "workers": PEERS[name].workers, "errors": len(mine) - len(ok),
            **({key: (_median([r[key] for r in ok]) if ok else None) for key in (
                "steady_samples_per_second", "startup_seconds", "time_to_target_seconds",
                "time_to_target_training_seconds")}),
            "reached_target": sum(r["time_to_target_seconds"] is not None for r in ok),
            "final_test_accuracy": statistics.mean(r["final_test_accuracy"] for r in ok) if ok else None,
        }

    def ratio(name: str, key: str) -> float | None:
        mine, ddp = peers[name][key], peers.get("ddp", {}).get(key)
        return mine / ddp if mine is not None and ddp else None

    for name in peers:
        peers[name]["samples_per_second_vs_ddp"] = ratio(name, "steady_samples_per_second")
        peers[name]["time_to_target_vs_ddp"] = ratio(name, "time_to_target_seconds")
        peers[name]["time_to_target_training_vs_ddp"] = ratio(name, "time_to_target_training_seconds")
    if "downpour_r1" in peers and "plain" in peers:  # one replica against the one-process loop
        mine, plain = (peers[n]["steady_samples_per_second"] for n in ("downpour_r1", "plain"))
        peers["downpour_r1"]["samples_per_second_vs_plain"] = (mine / plain if mine is not None
                                                               and plain else None)
    test_samples = next((r["test_samples"] for r in runs if "error" not in r), None)
    return {
        "benchmark": "vs_ddp", "quick": quick, "repeats": plan.repeats,
        "settings": {**asdict(plan), "target_accuracy": TARGET_ACCURACY, "log_every": LOG_EVERY,
                     "threads_per_process": 1, "warmup_fraction": WARMUP_FRACTION},
        "evaluation": {
            "test_samples": test_samples, "every_samples": eval_samples(plan),
            "every_steps_per_worker_of_2": plan.eval_every, "also": "at the end",
            "distbelief": "--eval-every: concurrent, cost inside its times",
            "plain_and_ddp": "copies evaluated after training: cost outside their times",
            "one_evaluation_seconds_1_thread": eval_seconds},
        "peers": peers, "runs": runs,
        "machine": {"cpus": os.cpu_count(), "load_before": load_before,
                    "load_after": list(os.getloadavg())},
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:  # a plain process or a DDP rank started by run_local
        worker(json.loads(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="plain, ddp and downpour_f1 on 4,000 samples, one round: a smoke test")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 3; 1 with --quick)")
    parser.add_argument("--epochs", type=float, help="passes over the training data (default 6)")
    parser.add_argument("--lr", type=float, help="Adagrad learning rate (default 0.02)")
    parser.add_argument("--eval-every", type=int,
                        help="steps per worker of a 2-worker peer between evaluations (default 100)")
    parser.add_argument("--peers", help=f"comma-separated subset of {','.join(PEERS)}")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    changes = {"repeats": args.repeats, "epochs": args.epochs, "lr": args.lr,
               "eval_every": args.eval_every,
               "peers": tuple(args.peers.split(",")) if args.peers else None}
    plan = replace(plan, **{k: v for k, v in changes.items() if v is not None})
    if unknown := [p for p in plan.peers if p not in PEERS]:
        parser.error(f"unknown peers {unknown}: choose from {','.join(PEERS)}")
    if plan.repeats < 1 or plan.epochs <= 0 or plan.eval_every < 1:
        parser.error("--repeats and --eval-every must be >= 1 and --epochs > 0")
    began, load_before = time.perf_counter(), list(os.getloadavg())
    log("preparing the datasets")
    eval_seconds = prepare(plan)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="vs-ddp-") as tmp:
        for r in range(plan.repeats):
            shift = r % len(plan.peers)  # each peer takes its turn at running first
            for name in plan.peers[shift:] + plan.peers[:shift]:
                root = Path(tmp) / f"{name}-{r}"
                root.mkdir()
                try:
                    runs.append(measure(PEERS[name], plan, r, root, eval_seconds))
                except Exception as exc:  # a failed run is a result too: reported, the rest go on
                    log(f"{name} seed {r} failed: {type(exc).__name__}: {exc}")
                    runs.append({"peer": name, "seed": r,
                                 "error": f"{type(exc).__name__}: {exc}"[-2000:]})
    report = summarise(runs, plan, eval_seconds, load_before, time.perf_counter() - began,
                       args.quick)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
