"""The layouts worth considering for one job, from the algorithm registry.

`enumerate_candidates` crosses, for every registered algorithm (or the one the
user chose), the replica counts, shard counts, partitions and split, data
servers and the algorithm's own `plan_variants` that fit the hardware's cores,
and keeps the configs the algorithm accepts (`JobConfig.validate`: an option an
algorithm does not use is refused, so a candidate never carries one). Options
the user fixed are never varied. Each candidate carries its `Layout`, the
numbers the cost model reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distbelief.algorithms.base import PARTITIONS, Algorithm
from distbelief.algorithms.registry import ALGORITHMS
from distbelief.errors import UserError
from distbelief.job import OPTION_FIELDS, JobConfig, apply_options
from distbelief.model.balance import balance_by_cost, layer_costs, parse_balance
from distbelief.planner.cost import Layout

LAYOUT_OPTIONS = ("replicas", "shards", "partitions", "split", "data_servers")
"""The shared flat options a plan chooses (besides the algorithm and its own options)."""


@dataclass
class Candidate:
    """One way to run the job: an algorithm and the flat options that make its layout."""

    algorithm: str
    options: dict[str, Any]
    """Flat options the planner chose (the user's own ones are in `config` as well)."""
    config: JobConfig
    layout: Layout
    prediction: Any = None
    measured: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        parts = [self.algorithm]
        short = {"replicas": "R", "workers": "W", "shards": "S", "partitions": "K",
                 "data_servers": "D"}
        for key, value in self.options.items():
            if key == "split" and self.options.get("partitions", 1) == 1:
                continue
            parts.append(f"{short.get(key, key)}={value:g}" if isinstance(value, float)
                         else f"{short.get(key, key)}={value}")
        return " ".join(parts)


def enumerate_candidates(base: JobConfig, fixed: set[str], profile, hardware) -> list[Candidate]:
    """Every layout the registry's algorithms accept for `base` on `hardware` (see the module
    docstring). `fixed`: the config fields ("section.field", or "algorithm") the user set."""
    names = [base.algorithm] if "algorithm" in fixed else list(ALGORITHMS)
    cores = hardware.cores_per_host * hardware.hosts
    found: dict[str, Candidate] = {}
    for name in names:
        algorithm = ALGORITHMS[name]
        if algorithm.parameters == "shared" and hardware.hosts > 1:
            continue  # one tensor in one host's memory
        probe = _config(base, name, {})
        if probe is None:  # the user's own options rule this algorithm out
            continue
        for options in _layouts(algorithm, probe, fixed, profile, cores):
            cfg = _config(base, name, options)
            if cfg is None:
                continue
            resolved = cfg.resolved()
            key = resolved.to_toml()
            if key not in found:
                layout = make_layout(algorithm, resolved, profile)
                found[key] = Candidate(name, options, cfg, layout)
    return list(found.values())


def _config(base: JobConfig, algorithm: str, options: dict) -> JobConfig | None:
    """`base` with the algorithm and options, or None when it refuses them."""
    try:
        cfg = dataclasses.replace(base, algorithm=algorithm)
        return apply_options(cfg, options).validate()
    except UserError:
        return None


def _honoured(algorithm: Algorithm, option: str) -> bool:
    dotted = OPTION_FIELDS[option]
    return dotted.split(".")[0] == algorithm.name or dotted in algorithm.honours


def _layouts(algorithm: Algorithm, cfg: JobConfig, fixed: set[str], profile, cores: int):
    """Flat option dicts: replicas x partitions x shards x data servers x variants."""
    def free(option: str) -> bool:
        return _honoured(algorithm, option) and OPTION_FIELDS[option] not in fixed

    replicas_option = algorithm.replicas_option
    resolved = cfg.resolved()
    partitions = [cfg.model.partitions]
    if free("partitions") and PARTITIONS <= algorithm.honours and profile.sequential:
        partitions = [k for k in _powers(min(cores, profile.layers_with_parameters))]
    splits = ["layers", "units"] if profile.units_split else ["layers"]
    if not free("split"):
        splits = [cfg.model.split]
    augmenting = bool(profile.augment_seconds)
    servers = [0, 1] if free("data_servers") and augmenting else [cfg.cluster.data_servers]
    variants = algorithm.plan_variants(resolved)
    for k in partitions:
        per_replica = [algorithm.replicas(resolved)]
        if free(replicas_option):
            per_replica = [r for r in _powers(max(1, cores // k))]
        for r in per_replica:
            shard_counts = [cfg.cluster.shards]
            if free("shards") and algorithm.parameters == "served":
                shard_counts = sorted({k, min(2 * k, max(k, cores))})
            for s in shard_counts:
                for d in servers:
                    for split in (splits if k > 1 else [cfg.model.split]):
                        for variant in variants:
                            options: dict[str, Any] = {}
                            if free(replicas_option):
                                options[replicas_option] = r
                            if free("shards") and algorithm.parameters == "served":
                                options["shards"] = s
                            if free("partitions") and PARTITIONS <= algorithm.honours:
                                options["partitions"] = k
                                if k > 1 and free("split"):
                                    options["split"] = split
                            if free("data_servers") and augmenting:
                                options["data_servers"] = d
                            options.update({o: v for o, v in variant.items()
                                            if OPTION_FIELDS[o] not in fixed})
                            yield options


def _powers(limit: int) -> list[int]:
    values, v = [], 1
    while v <= limit:
        values.append(v)
        v *= 2
    return values or [1]


def make_layout(algorithm: Algorithm, cfg: JobConfig, profile) -> Layout:
    """The numbers of one resolved config, for `distbelief.planner.cost.predict`."""
    ex = algorithm.exchange(cfg)
    k = cfg.model.partitions
    stages: tuple[tuple[int, int], ...] = ()
    if k > 1 and cfg.model.split == "layers":
        stages = stage_ranges(profile, k, cfg.model.balance)
    slow = cfg.cluster.slowdown
    extra = algorithm.replicas(cfg) if ex.quorum and ex.rounds_every > 1 else 0
    return Layout(
        replicas=algorithm.replicas(cfg),
        shards=cfg.cluster.shards if algorithm.parameters == "served" else 0,
        partitions=k, split=cfg.model.split, micro_batches=cfg.model.micro_batches or 1,
        stages=stages, data_servers=cfg.cluster.data_servers,
        slow_factor=slow[1] if slow else 1.0, sync_fraction=cfg.cluster.sync_fraction,
        exchange=ex, rule=cfg.optimizer.rule, extra_shard_vectors=extra)


def stage_ranges(profile, partitions: int, balance: str | None) -> tuple[tuple[int, int], ...]:
    """The layer range of each pipeline stage, as the job will cut it (`plan_partitions`:
    whole blocks that start at a layer with parameters, balanced by time and bytes)."""
    if balance is not None:
        counts = parse_balance(balance)
    else:
        params = profile.layer_param_bytes
        starts = [i for i, b in enumerate(params) if b]
        starts[0] = 0
        blocks = list(zip(starts, starts[1:] + [len(params)]))
        costs = layer_costs(profile.layer_seconds, params)
        groups = balance_by_cost([sum(costs[a:b]) for a, b in blocks], partitions)
        counts, first = [], 0
        for size in groups:
            counts.append(blocks[first + size - 1][1] - blocks[first][0])
            first += size
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return tuple(ranges)
