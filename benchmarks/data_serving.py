"""Data servers (Project Adam) vs augmenting inline: replica throughput.

One Downpour replica (``--threads 1``) trains a CNN on MNIST-1D with an
augmentation that costs about as much as its gradient: an elastic time warp
(``[augment] warp``) whose displacement field is smoothed by ``warp_smooth``
passes, the number of passes calibrated here, before the runs, so that
augmenting one batch takes as long as one forward and backward pass (both
measured in this process on one thread). Two peers, in the same run, repeats
interleaved (their order alternating):

* ``served``: ``--data-servers 1``: a data server process reads and augments,
  and streams ready batches (``--prefetch 4``), so the replica computes only;
* ``inline``: ``--data-servers 0``: the replica augments its own batches.

Throughput is the replica's samples/s between its first and last "train"
report (start-up is not counted), the ratio served / inline of the medians.
Target: >= 1.5x on 2 cores (1 replica + 1 data server). Other processes on the
machine depress it (the served peer needs both cores): the load average before
and after is reported, and for each run the cores the machine's other
processes kept busy meanwhile (busy CPU time from /proc/stat minus this
process's and its children's). Prints ONE
JSON document on stdout; progress goes to stderr.

Example::

    python benchmarks/data_serving.py            # ~2 minutes on 2 cores
    python benchmarks/data_serving.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F

import distbelief
from distbelief.config import AugmentConfig
from distbelief.data.augment import Augmenter, augment_generator
from distbelief.data.datasets import load_dataset
from distbelief.metrics.log import read_metrics
from distbelief.model.zoo import build_model

TARGET = 1.5
WARP = 2.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine, of this process and its reaped children)."""
    t = psutil.cpu_times()
    ours = sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))
    return t.user + t.nice + t.system + t.irq + t.softirq, ours


def seconds_per_call(fn, repeats: int) -> float:
    """The median time of one call of `fn` (after two warm-up calls)."""
    fn(0), fn(1)
    times = []
    for i in range(repeats):
        began = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def calibrate(num_samples: int, batch: int, repeats: int) -> dict:
    """Smoothing passes that make augmenting one batch cost one gradient (one thread)."""
    data = load_dataset("mnist1d", seed=0, num_samples=num_samples)
    model = build_model("cnn", data.input_shape, data.num_classes)
    xb, yb = data.x_train[:batch], data.y_train[:batch]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def gradient(_):
            model.zero_grad()
            F.cross_entropy(model(xb), yb).backward()

        def augment(passes: int):
            aug = Augmenter(AugmentConfig(warp=WARP, warp_smooth=passes), data.input_shape)
            return lambda step: aug(xb, augment_generator(0, 0, step))

        grad = seconds_per_call(gradient, repeats)
        low, high = seconds_per_call(augment(1), repeats), seconds_per_call(augment(101), repeats)
        per_pass = max((high - low) / 100, 1e-7)
        passes = max(1, round(1 + (grad - low) / per_pass))
        cost = seconds_per_call(augment(passes), repeats)
    finally:
        torch.set_num_threads(threads)
    log(f"calibration: gradient {grad * 1e3:.2f} ms, augmentation {cost * 1e3:.2f} ms "
        f"with warp_smooth = {passes}")
    return {"gradient_seconds": grad, "augment_seconds": cost, "warp": WARP,
            "warp_smooth": passes, "seconds_per_pass": per_pass, "batch_size": batch}


def throughput(run_root: Path, name: str, *, servers: int, passes: int, steps: int,
               log_every: int, batch: int, num_samples: int) -> dict:
    run_dir = run_root / name
    busy0, ours0 = cpu_seconds()
    began = time.monotonic()
    summary = distbelief.train(
        {"augment": {"warp": WARP, "warp_smooth": passes}}, dataset="mnist1d", model="cnn",
        num_samples=num_samples, replicas=1, shards=1, threads=1, batch_size=batch,
        rule="adagrad", lr=0.02, steps=steps, log_every=log_every, data_servers=servers,
        run_dir=str(run_dir))
    busy1, ours1 = cpu_seconds()
    others = max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (time.monotonic() - began)
    reports = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"]
    first, last = reports[0], reports[-1]
    samples = sum(e["samples"] for e in reports[1:])
    wait = summary["data"]["replica_wait_seconds"]["0"]
    result = {"samples_per_second": samples / (last["time"] - first["time"]),
              "steps_timed": last["step"] - first["step"],
              "replica_wait_seconds": wait, "wall_seconds": summary["wall_seconds"],
              "other_processes_cores": others}
    log(f"{name}: {result['samples_per_second']:.0f} samples/s, replica waited {wait:.2f} s, "
        f"other processes kept {others:.2f} cores busy")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny runs: checks it works")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each peer")
    parser.add_argument("--steps", type=int, default=300, help="steps per run")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="samples per step: larger batches make the fixed cost of a "
                             "step (pull, push) smaller next to gradient and augmentation")
    args = parser.parse_args(argv)
    # --quick: the fewest steps that leave one timed after the first report (start-up)
    repeats, steps, log_every = (1, 2, 1) if args.quick else (args.repeats, args.steps, 10)
    batch = 64 if args.quick else args.batch_size
    num_samples = 4000 if args.quick else 20000
    load_before = os.getloadavg()
    calibration = calibrate(num_samples, batch, 5 if args.quick else 50)
    runs: dict[str, list[dict]] = {"served": [], "inline": []}
    with tempfile.TemporaryDirectory(prefix="data-serving-") as tmp:
        for i in range(repeats):
            order = ("served", "inline") if i % 2 == 0 else ("inline", "served")
            for peer in order:
                runs[peer].append(throughput(Path(tmp), f"{peer}{i}",
                                             servers=1 if peer == "served" else 0,
                                             passes=calibration["warp_smooth"], steps=steps,
                                             log_every=log_every, batch=batch,
                                             num_samples=num_samples))
    medians = {peer: statistics.median(r["samples_per_second"] for r in rs)
               for peer, rs in runs.items()}
    ratio = medians["served"] / medians["inline"]
    report = {
        "benchmark": "data_serving", "quick": args.quick, "steps": steps, "repeats": repeats,
        "batch_size": batch,
        "machine": {"cpus": os.cpu_count(), "load_before": list(load_before),
                    "load_after": list(os.getloadavg())},
        "calibration": calibration,
        "served": {"runs": runs["served"], "median_samples_per_second": medians["served"]},
        "inline": {"runs": runs["inline"], "median_samples_per_second": medians["inline"]},
        "ratio_served_to_inline": ratio,
        "paired_ratios": [s["samples_per_second"] / n["samples_per_second"]
                          for s, n in zip(runs["served"], runs["inline"])],
        "target": {"ratio": TARGET, "cores": 2}, "met": ratio >= TARGET,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
