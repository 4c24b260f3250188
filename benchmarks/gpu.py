"""Downpour on GPUs against torch DDP (NCCL) on the same GPUs, and the cost of its copies.

The training setup is ``vs_ddp.py``'s (whose helpers this script reuses): the
built-in CNN on MNIST-1D, Adagrad (lr 0.02), batch 64 per worker, 2 workers, the
same data, batches and initial weights for every peer; per run, the steady
samples/s summed over the workers and the time to 0.95 test accuracy (all 10,000
test samples, every 12,800 samples trained and at the end), both from the
command's start.

* ``ddp``: ``DistributedDataParallel`` over NCCL, rank r on GPU r (``vs_ddp.py``'s
  workers as child processes); with one GPU both ranks share it and DDP runs
  over gloo (NCCL refuses two ranks on one GPU): ``ddp_backend`` says which.
* ``downpour_gpu``: ``distbelief train --algorithm downpour --replicas 2 --shards 2
  --device cuda`` (replica r on GPU r mod the GPUs; the shards on the CPU),
  fetch = push = 1; ``downpour_gpu_f4``: fetch = push = 4.

``copies``: the host-device traffic of one replica step, measured in this process
on GPU 0 with distbelief's own copier (`distbelief.runtime.device.DeviceMirror`):
the gradient copied into a /dev/shm buffer pinned in place and the parameters
copied back from a pinned buffer, against the step's forward and backward on the
device (medians over 50 steps). Each Downpour run also reports the device time
its replicas' copies took (``copy_seconds_per_copy``, from ``summary.json``).

Without a CUDA device it prints ``{"benchmark": "gpu", "skipped": "no CUDA
device"}`` and exits 0 (the CI smoke test). Prints ONE JSON document on stdout;
progress goes to stderr; every child is reaped (see ``vs_ddp.run_children``).

Example::

    python benchmarks/gpu.py            # 3 rounds
    python benchmarks/gpu.py --quick    # 4,000 samples, 2 epochs, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from vs_ddp import (TARGET_ACCURACY, Peer, Plan, _median, log, prepare, run_distbelief,
                    run_local, steady_rate)

COMMON = ("--algorithm", "downpour", "--replicas", "2", "--shards", "2", "--device", "cuda")
PEERS = {p.name: p for p in (
    Peer("ddp", 2),
    Peer("downpour_gpu", 2, (*COMMON, "--n-fetch", "1", "--n-push", "1")),
    Peer("downpour_gpu_f4", 2, (*COMMON, "--n-fetch", "4", "--n-push", "4")))}
FULL = Plan(dataset="mnist1d", num_samples=None, model="cnn", batch_size=64, rule="adagrad",
            lr=0.02, epochs=6, eval_every=100, peers=tuple(PEERS), repeats=3)
QUICK = replace(FULL, num_samples=4000, epochs=2, eval_every=10,
                peers=("ddp", "downpour_gpu"), repeats=1)
COPY_STEPS, COPY_WARMUP = 50, 5


# ---- ddp: vs_ddp.py's workers as child processes, one per rank and GPU -------------------


def run_ddp(peer: Peer, plan: Plan, seed: int, root: Path, backend: str) -> dict:
    """DDP over `backend` on the GPUs: `vs_ddp`'s workers, each on its own GPU."""
    return run_local(peer, plan, seed, root, extra={"backend": backend, "device": "cuda"})


def measure(peer: Peer, plan: Plan, seed: int, root: Path, backend: str) -> dict:
    """One run of one peer, reduced as `vs_ddp.measure` does."""
    if peer.options:
        raw = run_distbelief(peer, plan, seed, root)
        device = json.loads((root / "run" / "summary.json").read_text())["device"]
    else:
        raw, device = run_ddp(peer, plan, seed, root, backend), None
    reports = [r for r in raw["reports"] if len(r) >= 2]
    began = min(raw["began"])
    hit = next((e for e in raw["evals"] if e["test_accuracy"] >= TARGET_ACCURACY), None)
    result = {
        "peer": peer.name, "seed": seed, "wall_seconds": raw["wall_seconds"],
        "startup_seconds": min(r[0]["time"] for r in raw["reports"]),
        "training_began_seconds": began,
        "samples": sum(x["samples"] for r in raw["reports"] for x in r),
        "steady_samples_per_second": sum(steady_rate(r) for r in reports),
        "time_to_target_seconds": hit["seconds"] if hit else None,
        "time_to_target_training_seconds": hit["seconds"] - began if hit else None,
        "final_test_accuracy": raw["evals"][-1]["test_accuracy"],
        "test_samples": raw["test_samples"]}
    if device is not None:  # the replicas' host-device copies, from the job's summary
        result["device"] = {**device, "copy_seconds_per_copy": (
            device["copy_seconds"] / device["copies"] if device["copies"] else None)}
    to = "never" if hit is None else f"{hit['seconds']:.1f} s"
    log(f"{peer.name} seed {seed}: {result['steady_samples_per_second']:,.0f} samples/s, "
        f"to {TARGET_ACCURACY}: {to}, final {result['final_test_accuracy']:.4f}")
    return result


# ---- the copies of one replica step, against the step -------------------------------------


def copy_costs(plan: Plan) -> dict:
    """Median seconds of one step's forward and backward on GPU 0, and of its copies: the
    gradient into a /dev/shm buffer pinned in place, the parameters back from a pinned one."""
    import torch
    import torch.nn.functional as F

    from distbelief.data.datasets import BatchStream, load_dataset, replica_indices
    from distbelief.model.flat import FlatModel
    from distbelief.model.zoo import build_model
    from distbelief.runtime.device import DeviceMirror

    data = load_dataset(plan.dataset, seed=0, num_samples=plan.num_samples)
    torch.manual_seed(0)
    device = torch.device("cuda", 0)
    model = build_model(plan.model, data.input_shape, data.num_classes).to(device)
    numel = sum(p.numel() for p in model.parameters())
    stream = BatchStream(data.x_train, data.y_train,
                         replica_indices(len(data.y_train), 0, 1, 0), plan.batch_size, seed=0)
    path = Path("/dev/shm") / f"distbelief-gpu-bench-{os.getpid()}"
    shared = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    steps, copies = [], []
    try:
        with DeviceMirror(device) as mirror:
            grad = mirror.device_twin(shared)  # pinned in place, as a replica's shm buffer
            flat = FlatModel(model, grads=[grad])
            mirror.host_twin(flat.params)
            for i in range(COPY_WARMUP + COPY_STEPS):
                xb, yb = mirror.to_device(*stream.next())
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                grad.zero_()
                F.cross_entropy(model(xb), yb).backward()
                torch.cuda.synchronize(device)
                t1 = time.perf_counter()
                mirror.to_host_async(grad).wait()
                mirror.from_host_async(flat.params).wait()
                t2 = time.perf_counter()
                if i >= COPY_WARMUP:
                    steps.append(t1 - t0)
                    copies.append(t2 - t1)
            stats = mirror.stats()
    finally:
        path.unlink(missing_ok=True)
    step, copy = statistics.median(steps), statistics.median(copies)
    return {"device": torch.cuda.get_device_name(device), "parameters": numel,
            "bytes_each_way": numel * 4, "steps": COPY_STEPS,
            "step_seconds": step, "copy_seconds": copy, "copy_over_step": copy / step,
            # the copies' own time on the device (CUDA events), both ways, per step
            "device_copy_seconds": 2 * stats["copy_seconds"] / stats["copies"]}


def summarise(runs: list[dict], plan: Plan) -> dict:
    peers = {}
    for name in plan.peers:
        ok = [r for r in runs if r["peer"] == name and "error" not in r]
        peers[name] = {
            "errors": sum(r["peer"] == name for r in runs) - len(ok),
            **{key: (_median([r[key] for r in ok]) if ok else None)
               for key in ("steady_samples_per_second", "time_to_target_seconds",
                           "time_to_target_training_seconds")},
            "reached_target": sum(r["time_to_target_seconds"] is not None for r in ok),
            "final_test_accuracy": statistics.mean(r["final_test_accuracy"] for r in ok)
            if ok else None}
    for name, peer in peers.items():
        for key, ratio in (("steady_samples_per_second", "samples_per_second_vs_ddp"),
                           ("time_to_target_seconds", "time_to_target_vs_ddp")):
            mine, ddp = peer[key], peers.get("ddp", {}).get(key)
            peer[ratio] = mine / ddp if mine is not None and ddp else None
    return peers


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="ddp and downpour_gpu on 4,000 samples, one round: a smoke test")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 3)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu", "skipped": "no CUDA device"}))
        return 0
    plan = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error("--repeats must be >= 1")
        plan = replace(plan, repeats=args.repeats)
    gpus = torch.cuda.device_count()
    backend = "nccl" if gpus >= 2 else "gloo"  # NCCL refuses two ranks on one GPU
    began = time.perf_counter()
    log("preparing the datasets")
    prepare(plan)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for r in range(plan.repeats):
            shift = r % len(plan.peers)
            for name in plan.peers[shift:] + plan.peers[:shift]:
                root = Path(tmp) / f"{name}-{r}"
                root.mkdir()
                try:
                    runs.append(measure(PEERS[name], plan, r, root, backend))
                except Exception as exc:  # a failed run is a result too
                    log(f"{name} seed {r} failed: {type(exc).__name__}: {exc}")
                    runs.append({"peer": name, "seed": r,
                                 "error": f"{type(exc).__name__}: {exc}"[-2000:]})
    log("timing the copies of one step")
    copies = copy_costs(plan)
    print(json.dumps({
        "benchmark": "gpu", "quick": args.quick, "repeats": plan.repeats,
        "settings": {**asdict(plan), "target_accuracy": TARGET_ACCURACY, "workers": 2},
        "gpus": gpus, "gpu": torch.cuda.get_device_name(0), "ddp_backend": backend,
        "peers": summarise(runs, plan), "runs": runs, "copies": copies,
        "machine": {"cpus": os.cpu_count()}, "seconds": time.perf_counter() - began},
        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
