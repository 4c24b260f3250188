"""How close does the parameter server come to memory-copy speed?

Measures, in one run:

* ``memcpy``: one thread copying a model-sized float32 tensor (``dst.copy_(src)``),
  best of N, as bytes copied per second. It is sampled right before every timed
  run of every cluster: the memory bandwidth of a shared (virtual) machine drifts
  by 2x within minutes, so a single early sample would make the ratios noise;
* for 1 and 2 shards and the ``shm`` and ``gloo`` transports: a real local
  cluster (a `JobStore`, the job description `run_job` publishes, shard
  processes from `LocalCluster`) and one in-process `PSClient` that per step
  pushes a whole-model gradient and pulls the whole model back
  (``push(0).wait(); pull(params).wait()``). The gradient is in the client's
  gradient buffer, where a Downpour replica's ``backward()`` writes it; on shm
  the shards read it there in place, so a push moves only a header and the
  shard's update reads the gradient straight from shared memory. Throughput is the bytes moved
  per step (2 x model) over the seconds per step. ``ratio_to_memcpy`` is the
  best run's throughput over the best memcpy sample of the whole benchmark;
  ``paired_ratio_to_memcpy`` is the median over runs of a run's throughput over
  the memcpy sample taken just before it (robust to drift). The shards apply
  ``sgd``, the cheapest rule, so the number is about the transport, not the
  optimizer. The client process runs one torch thread, like memcpy and the shards.

The peers (`transport_peers.py`) run the same step in plain PyTorch in the same
run: a raw gloo pair (send/recv, no protocol) and the `torch.distributed.rpc`
parameter-server pattern. ``peers`` gives their seconds per step, and every
distbelief result its ``step_time_over_<peer>`` (below 1: faster than the peer).
The targets: shm at least 0.8 of memcpy, gloo within 10% of the raw gloo pair
(``step_time_over_gloo_pair`` at most 1.1), one shard each.

With ``--layouts ranges,chunks`` every configuration is also measured with
Project Adam's chunk layout (``--chunk-bytes`` chunks hashed to the shards),
side by side, and ``chunks_over_ranges`` gives the chunk layout's seconds per
step over the range layout's for each (shards, transport).

After timing, each cluster also checks that the transport is exact: three
pushes of different constant gradients must move the pulled parameters by
exactly their sum (``"exact": true``).

Prints ONE JSON document on stdout; progress goes to stderr. Blocks until every
shard process is reaped and the job's /dev/shm files are removed.

Example::

    python benchmarks/ps_bandwidth.py                      # 40 MB model, ~1 minute
    python benchmarks/ps_bandwidth.py --quick --size-mb 4  # smoke test, seconds
    python benchmarks/ps_bandwidth.py --layouts ranges,chunks --chunk-bytes 1048576
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from transport_peers import PEERS, run_peer

from distbelief.runtime.launch import role_env
from distbelief.watch import wait_for_keys
from distbelief.config import ClusterConfig, OptimizerConfig, TrainConfig
from distbelief.job import JobConfig
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.runtime.shm import remove_job_files
from distbelief.runtime.launch import LocalCluster
from distbelief.runtime.store import JobStore, new_token

RULE = "sgd"
LR = 1.0  # integer-valued gradients then give exactly representable parameters (see _exact)
TARGET = {"shm_ratio_to_memcpy": 0.8, "gloo_step_time_over_gloo_pair": 1.1, "shards": 1}
SHARD_COUNTS = (1, 2)
TRANSPORTS = ("shm", "gloo")
TIMEOUT = 60.0


@dataclass(frozen=True)
class Timing:
    """How many steps to run, and how many copies make one memcpy sample."""

    warmup_steps: int
    runs: int
    steps_per_run: int
    memcpy_repeats: int

    def describe(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "runs": self.runs,
                "steps_per_run": self.steps_per_run, "memcpy_repeats": self.memcpy_repeats,
                "seconds_per_step": "mean over the fastest run (best of runs)",
                "memcpy": "fastest of memcpy_repeats copies, sampled before every timed run; "
                          "ratio_to_memcpy uses the best sample, paired_ratio_to_memcpy the "
                          "median over runs of (run throughput / sample just before it)"}


FULL = Timing(warmup_steps=3, runs=5, steps_per_run=10, memcpy_repeats=10)
# one step of each kind (warm-up, timed) and one memcpy sample per run: the smoke test's
QUICK = Timing(warmup_steps=1, runs=1, steps_per_run=1, memcpy_repeats=1)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Memcpy:
    """One thread's ``dst.copy_(src)`` bandwidth, sampled many times during the benchmark."""

    def __init__(self, numel: int, repeats: int):
        self.src, self.dst = torch.rand(numel), torch.empty(numel)
        self.dst.copy_(self.src)  # first touch: page faults are not memory bandwidth
        self.repeats = repeats
        self.samples: list[float] = []

    def sample(self) -> float:
        """Bytes per second of the fastest of `repeats` copies; recorded."""
        best = min(_seconds(lambda: self.dst.copy_(self.src)) for _ in range(self.repeats))
        self.samples.append(self.src.numel() * self.src.element_size() / best)
        return self.samples[-1]

    @property
    def best(self) -> float:
        return max(self.samples)


def time_runs(step: Callable[[], None], timing: Timing,
              memcpy: Memcpy) -> list[tuple[float, float]]:
    """After the warm-up steps, per timed run: (memcpy sample just before it, seconds per step)."""
    for _ in range(timing.warmup_steps):
        step()
    runs = []
    for _ in range(timing.runs):
        bandwidth = memcpy.sample()
        start = time.perf_counter()
        for _ in range(timing.steps_per_run):
            step()
        runs.append((bandwidth, (time.perf_counter() - start) / timing.steps_per_run))
    return runs


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- a local cluster of shards ---------------------------------------------


def job_config(shards: int, transport: str, layout: str = "ranges",
               chunk_bytes: int = 1 << 20) -> JobConfig:
    chunks = {"shard_layout": layout, "chunk_bytes": chunk_bytes} if layout == "chunks" else {}
    return JobConfig(cluster=ClusterConfig(replicas=1, shards=shards, transport=transport,
                                           timeout=TIMEOUT, **chunks),
                     optimizer=OptimizerConfig(rule=RULE, lr=LR),
                     train=TrainConfig(steps=1)).validate()


@contextlib.contextmanager
def local_shards(cfg: JobConfig, layout: Layout, steps: int) -> Iterator[JobStore]:
    """Host a store, publish the job, start the shards and wait until they are up.

    Yields the store. On exit — normal or not — sets ``job/stop``, waits for the
    shards to finish, reaps every child and removes the job's /dev/shm files.
    Like `run_job`, sets gloo's interface variable (loopback) in this process too,
    so the client's channels take the same route as the shards'.
    """
    store = JobStore.host(cfg.cluster.host, cfg.cluster.port, new_token(),
                          timeout=cfg.cluster.timeout)
    # The same keys as coordinator.run_job's job description; a shard reads only
    # config and layout, and there is no dataset (input_shape/num_classes describe none).
    store.set_json("job", {"config": cfg.to_dict(), "layout": layout.to_json(),
                           "start_time": time.time(), "steps": steps,
                           "input_shape": [layout.numel], "num_classes": 0})
    env = role_env(store, cfg)  # the same environment run_job gives its roles
    os.environ.update({k: v for k, v in env.items() if k.startswith("GLOO_")})
    try:
        with tempfile.TemporaryDirectory(prefix="ps_bandwidth-") as logs, \
                LocalCluster(Path(logs), env) as cluster:
            try:
                for s in range(cfg.cluster.shards):
                    cluster.spawn("shard", s)
                wait_for_keys(store, [f"shard{s}/up" for s in range(cfg.cluster.shards)],
                              cluster, cfg.cluster.timeout, "the shards to start")
                yield store
            finally:
                store.set_json("job/stop", True)
                cluster.wait_exit("shard", 10)
    finally:
        remove_job_files(store.token)


# ---- one measurement -------------------------------------------------------


def measure(shards: int, transport: str, numel: int, timing: Timing, memcpy: Memcpy,
            kind: str = "ranges", chunk_bytes: int = 1 << 20) -> dict:
    """Time push+pull of the whole model through `shards` shards over `transport`, the
    parameters cut into ranges or chunks (`kind`).

    `ratio_to_memcpy` is left to the caller (it needs every memcpy sample).
    """
    cfg = job_config(shards, transport, kind, chunk_bytes)
    layout = (Layout.balanced(numel, shards) if kind == "ranges"
              else Layout.chunked(numel, shards, chunk_bytes // 4))
    steps = timing.warmup_steps + timing.runs * timing.steps_per_run
    params = torch.empty(numel)

    def step() -> None:
        ps.push(0).wait(TIMEOUT)
        ps.pull(params).wait(TIMEOUT)

    with local_shards(cfg, layout, steps) as store, \
            PSClient(store, layout, "bench", transport=transport, timeout=TIMEOUT,
                     grad_buffers=1) as ps:
        ps.grad_buffers[0].fill_(1.0)  # the gradient, where a replica's backward() writes it
        runs = time_runs(step, timing, memcpy)
        exact = _exact(ps, numel)
    moved = 2 * numel * 4  # one gradient pushed, one parameter vector pulled
    best = min(seconds for _, seconds in runs)
    return {"shards": shards, "transport": transport, "layout": layout.describe(),
            "seconds_per_step": best,
            "median_run_seconds_per_step": statistics.median(s for _, s in runs),
            "bytes_per_step": moved, "bytes_per_second": moved / best,
            "paired_ratio_to_memcpy": statistics.median(moved / s / bw for bw, s in runs),
            "exact": exact}


def _exact(ps: PSClient, numel: int) -> bool:
    """Do three pushes of different constant gradients move the parameters by their sum?

    With lr = 1 and small integer values every float here is exact, so any
    difference means a push applied a gradient other than the one sent.
    """
    before, after = torch.empty(numel), torch.empty(numel)
    ps.pull(before).wait(TIMEOUT)
    values = (2.0, 3.0, 4.0)
    for value in values:
        ps.grad_buffers[0].fill_(value)
        ps.push(0).wait(TIMEOUT)
    ps.pull(after).wait(TIMEOUT)
    wrong = int((after != before - LR * sum(values)).sum())
    if wrong:
        log(f"  WARNING: {wrong} of {numel} parameters differ from the expected update")
    return wrong == 0


def _chunks_over_ranges(results: list[dict]) -> list[dict]:
    """Per (shards, transport): the chunk layout's seconds per step over the ranges'."""
    by = {(r["shards"], r["transport"], r["layout"]["kind"]): r["seconds_per_step"]
          for r in results}
    return [{"shards": s, "transport": t, "ratio": by[s, t, "chunks"] / by[s, t, "ranges"]}
            for s in SHARD_COUNTS for t in TRANSPORTS]


# ---- command line ------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="few steps and repeats, for a smoke test (numbers are rough)")
    parser.add_argument("--size-mb", type=float, default=40.0,
                        help="model size in MB (10**6 bytes) of float32 (default: 40)")
    parser.add_argument("--layouts", default="ranges",
                        help="shard layouts to measure side by side: ranges, chunks or "
                             "ranges,chunks (default: ranges)")
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20,
                        help="bytes per chunk for the chunks layout (default: 1048576)")
    args = parser.parse_args(argv)
    if not args.size_mb > 0:
        parser.error(f"--size-mb must be > 0, got {args.size_mb}")
    args.layouts = args.layouts.split(",")
    if not args.layouts or not set(args.layouts) <= {"ranges", "chunks"}:
        parser.error(f"--layouts takes ranges, chunks or both, got {','.join(args.layouts)}")
    if args.chunk_bytes < 4 or args.chunk_bytes % 4:
        parser.error(f"--chunk-bytes must be a positive multiple of 4, got {args.chunk_bytes}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    timing = QUICK if args.quick else FULL
    numel = max(2, int(args.size_mb * 1e6) // 4)
    torch.set_num_threads(1)  # memcpy is one thread's; the shards also run one thread each
    load_before = os.getloadavg()[0]  # other work on a shared machine skews every number
    log(f"ps_bandwidth: {numel * 4 / 1e6:.1f} MB model, {os.cpu_count()} cpus, "
        f"load {load_before:.2f}")
    memcpy = Memcpy(numel, timing.memcpy_repeats)
    results = []
    for shards in SHARD_COUNTS:
        for transport in TRANSPORTS:
            for kind in args.layouts:
                result = measure(shards, transport, numel, timing, memcpy, kind,
                                 args.chunk_bytes)
                log(f"  {shards} shard(s), {transport}, {kind}: "
                    f"{result['seconds_per_step'] * 1e3:.1f} ms/step, "
                    f"{result['bytes_per_second'] / 1e9:.2f} GB/s, paired ratio "
                    f"{result['paired_ratio_to_memcpy']:.2f}, exact={result['exact']}")
                results.append(result)
    peers = {}
    for name in PEERS:
        memcpy.sample()
        times = run_peer(name, numel, timing.warmup_steps, timing.runs, timing.steps_per_run)
        peers[name] = {"seconds_per_step": min(times),
                       "median_run_seconds_per_step": statistics.median(times)}
        log(f"  peer {name}: {peers[name]['seconds_per_step'] * 1e3:.1f} ms/step")
    for result in results:
        for name, peer in peers.items():
            result[f"step_time_over_{name}"] = result["seconds_per_step"] / peer["seconds_per_step"]
    log(f"  memcpy: best {memcpy.best / 1e9:.2f} GB/s, "
        f"median {statistics.median(memcpy.samples) / 1e9:.2f} GB/s")
    for result in results:
        result["ratio_to_memcpy"] = result["bytes_per_second"] / memcpy.best
    one = {r["transport"]: r for r in results
           if r["shards"] == TARGET["shards"] and r["layout"]["kind"] == "ranges"}
    report = {
        "benchmark": "ps_bandwidth", "model_bytes": numel * 4, "quick": args.quick,
        "memcpy_bytes_per_second": memcpy.best,
        "memcpy_median_bytes_per_second": statistics.median(memcpy.samples),
        "rule": RULE, "lr": LR,
        "timing": timing.describe(), "results": results, "target": TARGET,
        **({"chunks_over_ranges": _chunks_over_ranges(results)}
           if set(args.layouts) == {"ranges", "chunks"} else {}),
        "peers": peers,
        "met": {"shm": one["shm"]["ratio_to_memcpy"] >= TARGET["shm_ratio_to_memcpy"],
                "gloo": (one["gloo"]["step_time_over_gloo_pair"]
                         <= TARGET["gloo_step_time_over_gloo_pair"])},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "client_threads": torch.get_num_threads(),
                    "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]}},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
