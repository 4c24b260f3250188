"""Where a job's parameters live while it trains, as the coordinator sees them.

`Served`: in the parameter-server shards (one process each), laid out by
`ps.layout`, partitioned by `model.partition`; the coordinator writes the
initial parameters in and pulls them out to evaluate. `Shared`: in one tensor
in this host's shared memory, followed by the update rule's state, mapped by
every worker. An algorithm names its kind (`Algorithm.parameters`); the
coordinator builds the home with `home_for`. Coordinator thread only.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from distbelief.data.datasets import evaluate_split
from distbelief.data.samples import Samples
from distbelief.model.flat import flatten_parameters, load_flat
from distbelief.model.partition import plan_partitions
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.runtime.shm import SharedTensor, job_file
from distbelief.runtime.store import JobStore
from distbelief.task import task_of


class Served:
    """Parameters in S shard processes (DistBelief's parameter server)."""

    def __init__(self, cfg: Any, model: torch.nn.Module, data: Any):
        self.cfg, m, c = cfg, cfg.model, cfg.cluster
        self.plan = plan_partitions(model, partitions=m.partitions, split=m.split,
                                    balance=m.balance, micro_batches=m.micro_batches,
                                    sample=data.train.head(cfg.data.batch_size)[0])
        self.perm = self.plan.permutation(model)  # shard order -> the model's parameter order
        self.initial = flatten_parameters(model)
        if self.perm is not None:
            self.initial = self.initial[self.perm]
        chunk = c.chunk_bytes // 4 if c.shard_layout == "chunks" else None
        self.groups = None
        if self.plan.partitions > 1:
            self.layout, self.groups = Layout.by_partition(self.plan.part_numels(model), c.shards,
                                                           chunk_numel=chunk)
        elif chunk is not None:
            self.layout = Layout.chunked(self.initial.numel(), c.shards, chunk)
        else:
            self.layout = Layout.balanced(self.initial.numel(), c.shards)
        self.shards = c.shards
        self.ps: PSClient | None = None

    def job_fields(self, store: JobStore) -> dict:
        return {"layout": self.layout.to_json(),
                "partition": {**self.plan.to_json(), "shards": self.groups}}

    def start(self, store: JobStore, resumed: bool,
              wait_for: Callable[[list[str], str], None]) -> None:
        """Once the shards are up, write the initial parameters (a resumed job's shards
        loaded their checkpoint)."""
        wait_for([f"shard{s}/up" for s in range(self.shards)], "the parameter shards to start")
        cfg = self.cfg
        self.ps = PSClient(store, self.layout, "coordinator", transport=cfg.cluster.transport,
                           timeout=cfg.cluster.timeout, grad_buffers=0)
        if not resumed:
            self.ps.set(self.initial).wait(cfg.cluster.timeout)

    def evaluate(self, model: torch.nn.Module, samples: Samples) -> dict[str, float]:
        """Pull the shards' current parameters into `model`; the task's metrics over
        `samples` (a split)."""
        assert self.ps is not None
        current = torch.empty(self.ps.layout.numel)
        self.ps.pull(current).wait(self.cfg.cluster.timeout)
        if self.perm is not None:
            whole = torch.empty_like(current)
            whole[self.perm] = current
            current = whole
        load_flat(model, current)
        return evaluate_split(model, samples, task=task_of(self.cfg))

    def stop(self, store: JobStore) -> None:
        """After the job's last pull; `final_stats` next."""
        if self.ps is not None:
            self.ps.close()
            self.ps = None

    def close(self) -> None:
        """Whatever happened: no connection left behind."""
        if self.ps is not None:
            self.ps._shutdown()
            self.ps = None

    def final_stats(self, store: JobStore, timeout: float = 10.0) -> list[dict]:
        """Each shard's final counts (written as it stops); {} for a shard that did not answer."""
        deadline = time.monotonic() + timeout
        stats = []
        for s in range(self.shards):
            try:
                stats.append(store.get_json(f"stats/shard{s}",
                                            timeout=max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                stats.append({})
        return stats

    def summary(self, stats: list[dict], done: list[dict]) -> dict:
        fields = {"shards": self.shards,
                  "nonfinite_refused": [s.get("nonfinite") for s in stats],
                  "shard_versions": [s.get("version") for s in stats],
                  "shard_pushes": [s.get("pushes") for s in stats],
                  "layout": self.layout.describe()}
        if self.plan.partitions > 1:
            fields["partition"] = {**self.plan.to_json(), "shards": self.groups,
                                   "shard_clients": [s.get("clients") for s in stats],
                                   "boundary_bytes": sum(d.get("boundary_bytes", 0)
                                                         for d in done)}
        return fields

    @property
    def numel(self) -> int:
        return self.layout.numel


class Shared:
    """Parameters in one tensor in this host's shared memory, then the rule's state."""

    def __init__(self, cfg: Any, model: torch.nn.Module, data: Any):
        from distbelief.ps.rules import STATE_SLOTS

        self.cfg, self.initial = cfg, flatten_parameters(model)
        self.slots = STATE_SLOTS[cfg.optimizer.rule]
        self.shards, self.ps = 0, None
        self.shared: SharedTensor | None = None

    def job_fields(self, store: JobStore) -> dict:
        numel = self.initial.numel()
        self.shared = SharedTensor(job_file(store.token, "shared"), numel * (1 + self.slots),
                                   torch.float32, create=True)
        self.shared.tensor.zero_()
        self.shared.tensor[:numel].copy_(self.initial)
        return {"shared": {"file": str(self.shared.path), "numel": numel, "slots": self.slots}}

    def start(self, store: JobStore, resumed: bool,
              wait_for: Callable[[list[str], str], None]) -> None:
        """Nothing to wait for: the tensor holds the initial parameters already."""

    def evaluate(self, model: torch.nn.Module, samples: Samples) -> dict[str, float]:
        """The task's metrics over `samples` (a split) of a snapshot of the shared
        parameters, loaded into `model`."""
        assert self.shared is not None
        load_flat(model, self.shared.tensor[: self.initial.numel()].clone())
        return evaluate_split(model, samples, task=task_of(self.cfg))

    def stop(self, store: JobStore) -> None:
        pass

    def close(self) -> None:
        pass  # the launcher removes the job's files

    def final_stats(self, store: JobStore) -> list[dict]:
        return []

    def summary(self, stats: list[dict], done: list[dict]) -> dict:
        return {}

    @property
    def numel(self) -> int:
        return self.initial.numel()


HOMES = {"served": Served, "shared": Shared}


def home_for(kind: str, cfg: Any, model: torch.nn.Module, data: Any) -> Served | Shared:
    """The parameters' home of an algorithm whose `parameters` is `kind`."""
    return HOMES[kind](cfg, model, data)
