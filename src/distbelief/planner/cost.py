"""The planner's cost model: samples per second and memory per process of a layout.

Pure functions of numbers (no torch, no clock), each checked against a table in
tests/test_planner_cost.py. `predict` composes them for one `Layout` from a
`Profile`'s measurements and the `Hardware`'s links:

- a replica's step = its compute (the slowest pipeline stage, or a block of
  units) on its share of the cores, plus its transfers: all-reduce
  ``2(n-1)/n * P / B``, or parameter-server traffic ``(P/n_fetch + P/n_push)``
  per step, which the S shards serve in parallel, plus one round trip per shard
  for each pull and push;
- the job's rate = the sum of the replicas' rates when they run independently,
  or, when every step waits for the fastest ceil(F*R), that replica's rate times
  ceil(F*R); capped by what the shards can apply and the data servers can serve.

Memory per process counts the parameters (and gradients, buffers and update-rule
state where the process keeps them), a batch's activations twice (forward kept
for backward, and their gradients), the dataset where a process loads it, and a
process's base (torch imported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from distbelief.algorithms.base import Exchange
from distbelief.algorithms.schedule import quorum_size

GATHERS_PER_LINEAR = 2
"""--split units: a Linear's output is gathered forwards and its input's gradient summed
backwards, once each per step."""


def allreduce_seconds(replicas: int, nbytes: float, bandwidth: float) -> float:
    """A ring all-reduce of `nbytes` among `replicas`: 2(n-1)/n * nbytes / bandwidth."""
    if replicas <= 1:
        return 0.0
    return 2 * (replicas - 1) / replicas * nbytes / bandwidth


def ps_transfer_seconds(pull: float, push: float, nbytes: float, bandwidth: float,
                        shards: int, latency: float) -> float:
    """One replica step's parameter-server traffic: a fraction `pull` of the `nbytes`
    fetched and `push` sent, at the replica's `bandwidth`; each pull and each push is one
    round trip of a header to each of the `shards`, one after another."""
    return (pull + push) * (nbytes / bandwidth + shards * latency)


def shard_seconds_per_step(pull: float, push: float, elements: float, shards: int,
                           rule_seconds: float, copy_bandwidth: float) -> float:
    """One shard's work for one replica step: apply the rule to its 1/S of the pushed
    elements, and copy its slice in and out (4 bytes an element)."""
    per_shard = elements / shards
    return push * per_shard * rule_seconds + (pull + push) * 4 * per_shard / copy_bandwidth


def pipeline_step_seconds(stage_seconds: list[float], micro_batches: int,
                          boundary_seconds: float) -> float:
    """A pipelined step of K stages and M micro-batches (1F1B or GPipe fill and drain):
    (M + K - 1) ticks of the slowest stage's micro-batch, each plus one boundary transfer
    (a micro-batch's activations forwards and their gradient backwards)."""
    k, m = len(stage_seconds), micro_batches
    if k == 1:
        return stage_seconds[0]
    return (m + k - 1) * (max(stage_seconds) / m + boundary_seconds / m)


def units_step_seconds(compute_seconds: float, parts: int, gathered_bytes: float,
                       bandwidth: float, linears: int, latency: float) -> float:
    """A step cut by units into `parts`: the compute divided among them, plus for every
    Linear a gather forwards and a sum backwards of its activations (each partition
    receives the other (K-1)/K of `gathered_bytes`, the step's activations of all its
    Linears), one round trip each."""
    if parts <= 1:
        return compute_seconds
    exchange = GATHERS_PER_LINEAR * (parts - 1) / parts * gathered_bytes / bandwidth
    return compute_seconds / parts + exchange + GATHERS_PER_LINEAR * linears * latency


def cpu_share(busy_threads: float, cores: int) -> float:
    """The fraction of a core each busy thread gets when `busy_threads` share `cores`."""
    return 1.0 if busy_threads <= cores else cores / busy_threads


def job_steps_per_second(step_seconds: list[float], quorum: int | None) -> float:
    """Replica steps per second of the job: independent replicas add up; with a quorum q,
    every step waits for the q-th fastest replica, and q steps count per step."""
    if quorum is None:
        return sum(1 / s for s in step_seconds)
    return quorum / sorted(step_seconds)[quorum - 1]


def replica_memory(param_bytes: float, rule_state: int, local_rule: bool, buffers: int,
                   activation_bytes: float, data_bytes: float, base: float) -> float:
    """One replica (or partition) process: its parameters and their gradients, its update
    rule's state when it applies the rule itself, `buffers` transfer copies of the
    parameters, a batch's activations twice, its data and the process's base."""
    copies = 2 + (rule_state if local_rule else 0) + buffers
    return copies * param_bytes + 2 * activation_bytes + data_bytes + base


def shard_memory(param_bytes: float, shards: int, state: int, base: float) -> float:
    """One shard: its 1/S of the parameters and `state` tensors of the same size."""
    return (1 + state) * param_bytes / shards + base


@dataclass(frozen=True)
class Layout:
    """One candidate's shape, in numbers (`distbelief.planner.candidates` makes them)."""

    replicas: int
    shards: int = 0
    partitions: int = 1
    split: str = "layers"
    micro_batches: int = 1
    stages: tuple[tuple[int, int], ...] = ()
    """--split layers: each stage's layer range [start, end)."""
    data_servers: int = 0
    slow_factor: float = 1.0
    """One replica runs this many times slower (--slow-worker)."""
    sync_fraction: float = 1.0
    exchange: Exchange = Exchange()
    """How a replica step moves parameters (the algorithm's `Algorithm.exchange`)."""
    rule: str | None = None
    extra_shard_vectors: int = 0
    """Vectors a shard keeps besides the parameters and rule state (ADMM's members)."""


@dataclass
class Prediction:
    samples_per_second: float
    step_seconds: float
    """A typical (not slowed) replica's step."""
    memory_per_process: float
    """The largest process's bytes."""
    memory_per_host: float
    bottleneck: str
    """compute, transfer, all-reduce, shards, data or pipeline: what bounds the rate."""
    parts: dict = field(default_factory=dict)
    """The step's components, seconds."""


def predict(layout: Layout, profile, hardware) -> Prediction:
    """Samples per second and memory of `layout` for a `Profile` on `Hardware` (see the module
    docstring). Pure: every number comes from the arguments."""
    r, k, s = layout.replicas, layout.partitions, layout.shards
    hosts, cores = hardware.hosts, hardware.cores_per_host
    compute_procs = max(1, math.ceil(r * k / hosts))
    threads = max(1, cores // compute_procs)
    serving = layout.data_servers if profile.augment_seconds else 0
    aux = AUX_BUSY * (1 + s + layout.data_servers - serving)  # coordinator, shards, idle servers
    shard_busy, result = 0.0, None
    for _ in range(ITERATIONS):  # the shards' cores depend on the rate, the rate on the cores
        busy = compute_procs * threads + (serving + shard_busy + aux) / hosts
        result = _rate(layout, profile, hardware, compute_threads=threads,
                       share=oversubscribed_share(busy, cores, threads))
        shard_busy = max(0.0, min(float(s), result.parts.pop("shard_busy", 0.0)) - AUX_BUSY * s)
    return result


ITERATIONS = 4
AUX_BUSY = 0.25
"""Cores a process that is not computing (the coordinator, an idle shard) keeps busy
between messages: heartbeats, polling, Python. Calibrated on a 2-core host, where one
replica of 2 threads ran 40% slower beside them than alone; what it costs matters most to
a process of several threads, which waits for its slowest one."""


def oversubscribed_share(busy_threads: float, cores: int, threads: int) -> float:
    """The speed of a process of `threads` threads when `busy_threads` share `cores`: each
    thread's `cpu_share`, and a process of several threads waits at every parallel region
    for the slowest one, so it pays the share once per thread."""
    return cpu_share(busy_threads, cores) ** threads


def _rate(layout: Layout, profile, hardware, *, compute_threads: int, share: float
          ) -> Prediction:
    r, k, s, d = layout.replicas, layout.partitions, layout.shards, layout.data_servers
    ex = layout.exchange
    hosts = hardware.hosts
    whole = profile.compute_seconds(compute_threads) / share
    scale = whole / max(sum(profile.layer_seconds), 1e-12)  # per-layer times at this share
    link = hardware.link_bandwidth if hosts > 1 else hardware.shm_bandwidth / 2  # two copies
    tcp = hardware.link_bandwidth
    latency = hardware.latency
    nbytes = profile.param_bytes
    parts: dict[str, float] = {}
    bottleneck = "compute"
    if k > 1 and layout.split == "layers":
        stage = [sum(profile.layer_seconds[a:b]) * scale for a, b in layout.stages]
        cut = [profile.activation_bytes[b - 1] for _, b in layout.stages[:-1]]
        boundary = 2 * max(cut) / tcp + 2 * latency if cut else 0.0
        compute = pipeline_step_seconds(stage, layout.micro_batches, boundary)
        parts["pipeline_idle"] = compute - sum(stage) / k
        bottleneck = "pipeline" if parts["pipeline_idle"] > compute / 2 else "compute"
        part_bytes = max(sum(profile.layer_param_bytes[a:b]) for a, b in layout.stages)
    elif k > 1:
        linears = max(1, len([b for b in profile.layer_param_bytes if b]))
        gathered = sum(a for a, b in zip(profile.activation_bytes, profile.layer_param_bytes) if b)
        compute = units_step_seconds(whole, k, gathered, tcp, linears, latency)
        part_bytes = nbytes / k
    else:
        compute = whole
        part_bytes = nbytes
    parts["compute"] = compute
    transfer = 0.0
    if ex.allreduce:
        reduce_bandwidth = (hardware.allreduce_bandwidth or tcp) if hosts == 1 else tcp
        transfer = (allreduce_seconds(r, nbytes, reduce_bandwidth)
                    + hardware.allreduce_latency * (r - 1))
        parts["all-reduce"] = transfer
    elif ex.pull or ex.push:
        transfer = ps_transfer_seconds(ex.pull, ex.push, part_bytes, link,
                                       max(1, math.ceil(s / k)), latency)
        parts["transfer"] = transfer
    if ex.store_ops or ex.poll_seconds:
        parts["store"] = ex.store_ops * hardware.store_latency + ex.poll_seconds / 2
        transfer += parts["store"]
    update = (profile.rule_seconds.get(layout.rule or "sgd", 0.0) * part_bytes / 4 / share
              if ex.local_rule else 0.0)
    update += ex.local_passes * profile.rule_seconds.get("sgd", 0.0) * part_bytes / 4 / share
    if update:
        parts["update"] = update
    data = 0.0
    if profile.augment_seconds and not d:
        data = profile.augment_seconds / share
        parts["augment"] = data
    elif d:
        data = profile.batch_bytes / link + latency
        parts["data"] = data
    step = compute + transfer + update + data
    steps = [step] * r
    if layout.slow_factor > 1 and r:
        steps[0] = step + (layout.slow_factor - 1) * (compute + update)
    quorum = quorum_size(layout.sync_fraction, r) if ex.quorum else None
    if ex.quorum and ex.rounds_every > 1:
        # rounds every few steps: a replica waits only at a round, for the quorum's slowest
        quorum_rate = job_steps_per_second(steps, quorum)
        free_rate = job_steps_per_second(steps, None)
        rate = min(free_rate, quorum_rate * r / quorum)
    else:
        rate = job_steps_per_second(steps, quorum)
    if max(transfer, parts.get("all-reduce", 0.0)) > compute:
        bottleneck = "all-reduce" if ex.allreduce else "transfer"
    if data > compute:
        bottleneck = "data"
    if s and (ex.pull or ex.push):
        # each shard: the rule and copies of its slice, and a message's handling per request
        per_step = shard_seconds_per_step(
            ex.pull, ex.push, profile.parameters, s,
            profile.rule_seconds.get(layout.rule or "sgd", 0.0) if ex.shard_rule else 0.0,
            hardware.shm_bandwidth) + (ex.pull + ex.push) * latency / 2
        parts["shard_busy"] = rate * k * per_step  # cores the shards keep busy
        shard_cap = 1 / (per_step * k / s) if per_step else math.inf
        if rate > shard_cap * s:
            rate, bottleneck = shard_cap * s, "shards"
    samples = rate * profile.batch_size
    if d and profile.augment_seconds:
        server_cap = d / profile.augment_seconds * profile.batch_size
        if samples > server_cap:
            samples, bottleneck = server_cap, "data"
    memory, per_host = _memory(layout, profile, part_bytes, hosts)
    return Prediction(samples_per_second=samples, step_seconds=step,
                      memory_per_process=memory, memory_per_host=per_host,
                      bottleneck=bottleneck, parts=parts)


def _memory(layout: Layout, profile, part_bytes: float, hosts: int) -> tuple[float, float]:
    r, k, s, d = layout.replicas, layout.partitions, layout.shards, layout.data_servers
    ex = layout.exchange
    data_bytes = 0 if d else profile.dataset_bytes
    activations = (max(sum(profile.activation_bytes[a:b]) for a, b in layout.stages)
                   if layout.stages else sum(profile.activation_bytes) / max(1, k))
    buffers = 0 if ex.shared else 2
    replica = replica_memory(part_bytes, ex.rule_state, ex.local_rule, buffers,
                             activations, data_bytes, profile.base_memory)
    processes = [replica] * (r * k)
    if ex.shared:
        processes.append(profile.param_bytes)  # the one shared tensor, in /dev/shm
    if s:
        state = (ex.rule_state if ex.shard_rule or not ex.local_rule else 0)
        processes += [shard_memory(profile.param_bytes, s, state + layout.extra_shard_vectors,
                                   profile.base_memory)] * s
    processes += [profile.dataset_bytes + profile.base_memory] * d
    coordinator = profile.dataset_bytes + 2 * profile.param_bytes + profile.base_memory
    processes.append(coordinator)
    per_host = sum(processes) / hosts if hosts > 1 else sum(processes)
    return max(processes), per_host
