"""Model parallelism: does splitting the speech model over two single-threaded processes pay?

Measures, in one run, the training throughput (samples/s) of DistBelief's
speech model (``--model speech``: 440 inputs, 4 x 2560 sigmoid units, 8192
classes, 41.8M parameters) trained with Downpour by one replica that is

* K = 1: one process, or
* K = 2: two partitions (``--split layers``, the automatic balance [9, 1]: the
  2560 x 8192 output layer alone on partition 1), pipelined with M
  micro-batches per batch, for every M of ``--micro-batches``,

every replica or partition process limited to one torch thread
(``--threads 1``, the paper's fixed cores per machine), against 2 Adagrad
shards. The jobs are interleaved (K1, K2 M=2, K2 M=4, ..., K1, ...) for
``--repeats`` rounds and summarised by medians; ``speedup`` is the median K=2
throughput at the best M over the median K=1 throughput (target >= 1.6).

A job's throughput is the median of its "train" events' samples/s after the
first (which includes start-up); the wall-clock figure of the job summary
(start-up included) is reported too. Also reported, per job, the cores its
shard and replica processes kept busy while training (CPU time read from
/proc), so the share of the two cores the parameter server takes is visible.

The bytes that crossed the partition boundary per trained sample are set
against the activations of the whole model (sum over the 10 layers' outputs
of one sample, float32) and the activation at the cut: only the cut's
activation (forward) and its gradient (backward) travel, 2 x 2560 x 4 bytes.

``compute`` times, in this process with one thread and no parameter server,
one batch of the whole model and each stage's forward and backward over M
micro-batches, and predicts the speedup a 1F1B pipeline of those costs could
reach (`pipeline_schedule.simulate` with the slower stage's per micro-batch
times): it separates what the split costs in compute from what the job
adds (link, parameter server, scheduling).

Prints ONE JSON document on stdout; progress goes to stderr. Every job's
processes are gone and its run directory removed when the command returns.

Example::

    python benchmarks/model_parallel.py            # ~4.5 minutes on 2 cores
    python benchmarks/model_parallel.py --quick    # smoke test, ~10 s
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import distbelief
from distbelief.errors import JobFailed
from distbelief.metrics.log import read_metrics
from distbelief.model.pipeline_schedule import simulate
from distbelief.model.zoo import build_model

TARGET = 1.6
ATTEMPTS = 3  # a job that fails (JobFailed) is run again, and the failure reported
INPUT_SHAPE, CLASSES = (440,), 8192
FLOAT_BYTES = 4


@dataclass(frozen=True)
class Plan:
    """What each job runs."""

    batch_size: int
    steps: int
    log_every: int
    n_fetch: int
    n_push: int
    num_samples: int | None
    lr: float = 0.001  # the default 0.02 makes the sigmoids saturate: denormals, 10x slower steps
    rule: str = "adagrad"
    shards: int = 2
    threads: int = 1


FULL = Plan(batch_size=512, steps=24, log_every=4, n_fetch=8, n_push=8, num_samples=None)
# one push, two train events (the first, start-up included, is left out of the rate), and
# a batch that splits into the M = 2 micro-batches --quick tries
QUICK = Plan(batch_size=8, steps=2, log_every=1, n_fetch=2, n_push=2, num_samples=256)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class RoleCpu:
    """Samples the CPU seconds of this process's role children from /proc while a job runs.

    A context manager: a daemon thread polls every `interval` seconds and is
    stopped and joined on exit. It also counts the "train" events in the job's
    metrics file, so `busy()` can give each role's cores busy between the first
    and the last train event (start-up and the final evaluation left out).
    Role names are "shard<s>" and "replica<r>[.part<k>]". Linux only: empty
    elsewhere.
    """

    def __init__(self, metrics: Path, interval: float = 0.25):
        self.metrics, self.interval = metrics, interval
        self.total: dict[str, float] = {}  # the last CPU seconds seen per role
        self._first: tuple[float, dict[str, float]] | None = None  # at the first train event
        self._last: tuple[float, dict[str, float]] | None = None   # at the latest one
        self._events = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="role-cpu", daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> RoleCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self) -> dict[str, float]:
        """Cores each role kept busy between the first and the last train event ({} if unknown)."""
        if self._first is None or self._last is None or self._last[0] <= self._first[0]:
            return {}
        (t0, cpu0), (t1, cpu1) = self._first, self._last
        return {k: (cpu1[k] - cpu0.get(k, 0.0)) / (t1 - t0) for k in sorted(cpu1)}

    def _poll(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            self._sample()
            try:
                events = self.metrics.read_text().count('"event": "train"')
            except OSError:
                events = 0
            if events > self._events:
                self._events = events
                self._last = (now, dict(self.total))
                if self._first is None:
                    self._first = self._last
            self._stop.wait(self.interval)

    def _sample(self) -> None:
        try:
            me = Path(f"/proc/{os.getpid()}")
            pids = {p for f in me.glob("task/*/children") for p in f.read_text().split()}
        except OSError:
            return
        for pid in pids:
            try:
                env = dict(kv.split("=", 1) for kv in
                           Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the child just exited
                continue
            role = env.get("DISTBELIEF_ROLE")
            if role not in ("shard", "replica"):
                continue
            name = role + env.get("DISTBELIEF_ID", "?")
            if "DISTBELIEF_PART" in env:
                name += ".part" + env["DISTBELIEF_PART"]
            # utime and stime: fields 14 and 15 of stat, 12 and 13 after the state field
            self.total[name] = (int(fields[11]) + int(fields[12])) / self._tick


def run_job(root: Path, name: str, plan: Plan, partitions: int,
            micro_batches: int | None) -> dict:
    run_dir = root / name
    options = dict(dataset="speech", model="speech", replicas=1, shards=plan.shards,
                   threads=plan.threads, batch_size=plan.batch_size, steps=plan.steps,
                   log_every=plan.log_every, n_fetch=plan.n_fetch, n_push=plan.n_push,
                   lr=plan.lr, rule=plan.rule, partitions=partitions, run_dir=str(run_dir))
    if plan.num_samples is not None:
        options["num_samples"] = plan.num_samples
    if partitions > 1:
        options.update(split="layers", micro_batches=micro_batches)
    load_before = os.getloadavg()[0]
    with RoleCpu(run_dir / "metrics.jsonl") as cpu:
        summary = distbelief.train(**options)
    train = [e for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"]
    intervals = [e["samples_per_second"] for e in train]
    steady = intervals[1:] or intervals  # the first interval includes start-up
    samples = summary["total_steps"] * plan.batch_size
    result = {"partitions": partitions, "micro_batches": micro_batches,
              "samples_per_second": statistics.median(steady),
              "interval_samples_per_second": intervals,
              "wall_samples_per_second": summary["samples_per_second"],
              "wall_seconds": summary["wall_seconds"], "samples": samples,
              "final_loss": summary["final_loss"],
              "cpu_seconds": {k: round(v, 2) for k, v in sorted(cpu.total.items())},
              "cores_busy": {k: round(v, 3) for k, v in cpu.busy().items()},
              "load_average": [load_before, os.getloadavg()[0]]}
    if partitions > 1:
        part = summary["partition"]
        result.update(balance=part["balance"], boundary_bytes=part["boundary_bytes"],
                      boundary_bytes_per_sample=part["boundary_bytes"] / samples,
                      shard_clients=part["shard_clients"])
    log(f"{name}: {result['samples_per_second']:.0f} samples/s "
        f"(wall {result['wall_samples_per_second']:.0f}, load {load_before:.1f})")
    return result


def run_job_retrying(root: Path, name: str, plan: Plan, partitions: int,
                     micro_batches: int | None) -> dict:
    """`run_job`, run again (up to ATTEMPTS in all) when the job fails; failures are kept."""
    failures = []
    for attempt in range(ATTEMPTS):
        try:
            result = run_job(root, f"{name}-a{attempt}", plan, partitions, micro_batches)
        except JobFailed as exc:
            log(f"{name}: attempt {attempt + 1} failed: {exc}")
            failures.append(str(exc))
            continue
        return {**result, "failed_attempts": failures}
    raise JobFailed(f"{name} failed {ATTEMPTS} times; the last time: {failures[-1]}")


def activation_bytes(cut_after: int) -> dict:
    """Per-sample float32 bytes of every layer's output, and of the output of layer `cut_after`."""
    model = build_model("speech", INPUT_SHAPE, CLASSES)
    sizes: list[int] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel()))
             for layer in model]
    with torch.no_grad():
        model(torch.zeros(1, *INPUT_SHAPE))
    for hook in hooks:
        hook.remove()
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "layer_outputs_floats": sizes,
            "whole_model_bytes_per_sample": sum(sizes) * FLOAT_BYTES,
            "cut_layer": cut_after, "cut_bytes_per_sample": sizes[cut_after] * FLOAT_BYTES}


def compute_profile(batch_size: int, micro_batches: list[int], cut: int, repeats: int) -> dict:
    """Single-thread compute of one batch: whole model, and each stage over M micro-batches.

    Gradients accumulate into existing ``.grad`` tensors, as a replica's do
    (they point into its push buffer). Times are the best of `repeats`, in seconds.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = build_model("speech", INPUT_SHAPE, CLASSES)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        stage0, stage1 = model[:cut + 1], model[cut + 1:]
        x = torch.randn(batch_size, *INPUT_SHAPE)
        y = torch.randint(0, CLASSES, (batch_size,))
        with torch.no_grad():
            h = stage0(x)

        def best(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        def whole() -> None:
            F.cross_entropy(model(x), y).backward()

        def stage_times(m: int) -> dict:
            xs, hs, ys = x.tensor_split(m), h.tensor_split(m), y.tensor_split(m)

            def run0(backward: bool) -> None:
                for xm in xs:
                    out = stage0(xm)
                    if backward:
                        out.backward(torch.ones_like(out))

            def run1(backward: bool) -> None:
                for hm, ym in zip(hs, ys):
                    loss = F.cross_entropy(stage1(hm.requires_grad_()), ym,
                                           reduction="sum") / batch_size
                    if backward:
                        loss.backward()

            f0, f1 = best(lambda: run0(False)), best(lambda: run1(False))
            t0, t1 = best(lambda: run0(True)), best(lambda: run1(True))
            f, b = max(f0, f1) / m, max(t0 - f0, t1 - f1) / m
            return {"stage0_forward": f0, "stage0_forward_backward": t0,
                    "stage1_forward": f1, "stage1_forward_backward": t1,
                    "predicted_pipeline_seconds": simulate(m, 2, "1f1b", f, b)["makespan"]}

        result = {"batch_size": batch_size, "whole_forward_backward": best(whole),
                  "stages": {str(m): stage_times(m) for m in micro_batches}}
        for entry in result["stages"].values():
            entry["predicted_speedup"] = (result["whole_forward_backward"]
                                          / entry["predicted_pipeline_seconds"])
        return result
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny jobs, one repeat, M=2 only: checks it works")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds of all jobs (default 3; 1 with --quick)")
    parser.add_argument("--micro-batches", default=None,
                        help="comma-separated M to try at K=2 (default 2,4,8; 2 with --quick)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)
    ms = [int(m) for m in (args.micro_batches or ("2" if args.quick else "2,4,8")).split(",")]
    if repeats < 1 or any(m < 1 or m > plan.batch_size for m in ms):
        parser.error(f"--repeats must be >= 1 and every micro-batch count in 1..{plan.batch_size}")
    began = time.perf_counter()
    load_start = os.getloadavg()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="model-parallel-") as tmp:
        root = Path(tmp)
        for r in range(repeats):
            runs.append({"repeat": r, **run_job_retrying(root, f"k1-r{r}", plan, 1, None)})
            for m in ms:
                runs.append({"repeat": r,
                             **run_job_retrying(root, f"k2-m{m}-r{r}", plan, 2, m)})
    k1 = [x for x in runs if x["partitions"] == 1]
    k1_sps = statistics.median(x["samples_per_second"] for x in k1)
    k1_wall = statistics.median(x["wall_samples_per_second"] for x in k1)
    by_m = {}
    for m in ms:
        jobs = [x for x in runs if x["partitions"] == 2 and x["micro_batches"] == m]
        sps = statistics.median(x["samples_per_second"] for x in jobs)
        wall = statistics.median(x["wall_samples_per_second"] for x in jobs)
        by_m[str(m)] = {"samples_per_second": sps, "speedup": sps / k1_sps,
                        "wall_samples_per_second": wall, "wall_speedup": wall / k1_wall,
                        "per_repeat": [x["samples_per_second"] for x in jobs]}
    best_m = max(by_m, key=lambda m: by_m[m]["samples_per_second"])
    k2_jobs = [x for x in runs if x["partitions"] == 2]
    balance = k2_jobs[0]["balance"]
    sizes = activation_bytes(cut_after=balance[0] - 1)
    per_sample = statistics.median(x["boundary_bytes_per_sample"] for x in k2_jobs)
    log("timing the compute alone (one process, one thread)")
    compute = compute_profile(plan.batch_size, ms, balance[0] - 1, 1 if args.quick else 3)

    def cpu_share(jobs: list[dict], prefix: str) -> float | None:
        """Median over jobs of the cores the roles named `prefix`... kept busy while training."""
        shares = [sum(v for k, v in x["cores_busy"].items() if k.startswith(prefix))
                  for x in jobs if x["cores_busy"]]
        return statistics.median(shares) if shares else None

    speedup = by_m[best_m]["speedup"]
    report = {
        "benchmark": "model_parallel", "quick": args.quick, "repeats": repeats,
        "model": {"name": "speech", "input_shape": list(INPUT_SHAPE), "classes": CLASSES,
                  "parameters": sizes["parameters"]},
        "settings": {**asdict(plan), "replicas": 1, "split": "layers", "micro_batches": ms},
        "k1": {"samples_per_second": k1_sps, "wall_samples_per_second": k1_wall,
               "per_repeat": [x["samples_per_second"] for x in k1]},
        "k2": {"balance": balance, "by_micro_batches": by_m, "best_micro_batches": int(best_m),
               "samples_per_second": by_m[best_m]["samples_per_second"]},
        "speedup": speedup, "wall_speedup": by_m[best_m]["wall_speedup"],
        "target": TARGET, "target_met": speedup >= TARGET,
        "boundary": {"bytes_per_sample": per_sample,
                     "expected_bytes_per_sample": 2 * sizes["cut_bytes_per_sample"],
                     "cut_activation_bytes_per_sample": sizes["cut_bytes_per_sample"],
                     "cut_layer": sizes["cut_layer"],
                     "whole_model_activation_bytes_per_sample":
                         sizes["whole_model_bytes_per_sample"],
                     "fraction_of_whole_model_activations":
                         per_sample / sizes["whole_model_bytes_per_sample"],
                     "layer_outputs_floats": sizes["layer_outputs_floats"]},
        "cores_busy": {"k1_replica": cpu_share(k1, "replica"), "k1_shards": cpu_share(k1, "shard"),
                       "k2_partitions": cpu_share(k2_jobs, "replica"),
                       "k2_shards": cpu_share(k2_jobs, "shard")},
        "compute": compute,
        "machine": {"cpus": os.cpu_count(), "load_average_start": list(load_start),
                    "load_average_end": list(os.getloadavg()), "torch": torch.__version__},
        "seconds": time.perf_counter() - began,
        "failed_attempts": sum(len(x["failed_attempts"]) for x in runs),
        "runs": runs,
        "notes": [
            "Two cores are shared by the replica (K=1: one process, one thread) or its two "
            "partitions (K=2: two processes, one thread each), the 2 shard processes (each "
            "applies Adagrad to about 21M parameters per push and serves the pulls), the "
            "coordinator (mostly idle) and whatever else runs on the machine (load_average). "
            "K=1 leaves one core to the shards; K=2 has none to spare. n_fetch = n_push = "
            f"{plan.n_push} keeps the shards' share small (cores_busy: cores each kind of "
            "process kept busy between a job's first and last train event, from /proc).",
            "throughput is the median of a job's train-event samples/s after the first "
            "interval; wall_* figures divide the samples by the job's whole wall time "
            "(process start-up, data, shard initialisation and final evaluation included).",
            "failed_attempts counts jobs that failed and were run again (each run's "
            "failed_attempts holds the messages).",
            "speedup uses the best M of those tried (best_micro_batches); every M's own "
            "speedup is in k2.by_micro_batches.",
            "Only the cut's activation (forward) and its gradient (backward) cross the "
            "boundary: expected_bytes_per_sample = 2 x cut_activation_bytes_per_sample.",
            "compute.stages[M].predicted_speedup: whole-model step time over the 1F1B "
            "makespan of the slower stage's per micro-batch forward and backward, timed "
            "alone with one thread; when it is as low as the measured speedup, the split's "
            "compute (not the link or the parameter server) is what limits K=2.",
        ],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
