"""Model parallelism: how one replica is cut into K partitions, and running a partition.

`plan_partitions` decides the cut once, in the coordinator, so that every
process of every replica agrees (a balance measured separately in each process
could differ): ``split = "layers"`` gives each partition contiguous layers of
an ``nn.Sequential`` (``--balance`` or balanced by measured compute time and
parameter bytes, see `balance.py`), run as a pipeline (`pipeline.py`);
``split = "units"`` gives each partition a block of every Linear and locally
connected layer (`units.py`).

The parameter server sees the concatenation of the partitions' parameters
(partition 0's first). `PartitionPlan.permutation` maps it to the unpartitioned
model's ``parameters()`` order (None when they are the same, as for layers),
so the coordinator can evaluate, checkpoint and initialise the whole model.

`open_partition` connects partition k of a replica to its peers over the
runtime's channels and returns a runner whose ``train_step(x, y)`` does forward
and backward of one batch under the job's task's loss (`distbelief.task`), and
whose ``predict(x)`` gives the model's output (on the partition that ends the
model). K = 1 gives a plain in-process runner.

Example (in partition k's process)::

    plan = PartitionPlan.from_json(job["partition"])
    part = plan.part_module(model, k)
    with open_partition(plan, part, k, store=store.raw, name="replica0", timeout=60,
                        task=task_of(cfg)) as run:
        loss = run.train_step(x, y)          # None on partitions that do not see the loss
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from distbelief.model.precision import autocast
from distbelief.errors import UserError
from distbelief.task import Task, make_task


@dataclass(frozen=True)
class PartitionPlan:
    split: str = "layers"
    partitions: int = 1
    balance: tuple[int, ...] | None = None   # layers per partition (split = "layers")
    micro_batches: int = 1

    def to_json(self) -> dict:
        return {"split": self.split, "partitions": self.partitions,
                "balance": list(self.balance) if self.balance else None,
                "micro_batches": self.micro_batches}

    @classmethod
    def from_json(cls, data: dict) -> PartitionPlan:
        balance = data.get("balance")
        return cls(data["split"], int(data["partitions"]),
                   tuple(int(b) for b in balance) if balance else None,
                   int(data.get("micro_batches", 1)))

    @property
    def loss_partition(self) -> int:
        """The partition that sees the loss (and reports it)."""
        return self.partitions - 1 if self.split == "layers" else 0

    def layer_range(self, part: int) -> tuple[int, int]:
        start = sum(self.balance[:part])
        return start, start + self.balance[part]

    def part_module(self, model: nn.Module, part: int) -> nn.Module:
        """Partition `part` of `model`. Layers: shares the model's parameters; units:
        copies of its blocks."""
        if self.partitions == 1:
            return model
        if self.split == "layers":
            start, end = self.layer_range(part)
            return nn.Sequential(*list(model)[start:end])
        from distbelief.model.units import build_units_part
        return build_units_part(model, part, self.partitions)

    def whole_name(self, part: int, name: str) -> str | None:
        """A state-dict name of partition `part`'s module as the whole model names it: the
        layers split shifts its first index by the partition's first layer; None for the
        units split (its blocks are copies that the whole model does not name)."""
        if self.partitions == 1:
            return name
        if self.split != "layers":
            return None
        head, dot, rest = name.partition(".")
        return f"{int(head) + self.layer_range(part)[0]}{dot}{rest}"

    def part_numels(self, model: nn.Module) -> list[int]:
        return [sum(p.numel() for p in self.part_module(model, k).parameters() if p.requires_grad)
                for k in range(self.partitions)]

    def permutation(self, model: nn.Module) -> torch.Tensor | None:
        """Index into the whole model's flat parameters for each position of the partitions'
        concatenated flat vector; None when the two orders are the same."""
        if self.partitions == 1 or self.split == "layers":
            return None
        indexed = copy.deepcopy(model).double()  # float64 holds indices exactly up to 2**53
        offset = 0
        with torch.no_grad():
            for p in indexed.parameters():
                if p.requires_grad:
                    p.copy_(torch.arange(offset, offset + p.numel(), dtype=torch.float64)
                            .view_as(p))
                    offset += p.numel()
        flat = torch.cat([torch.cat([p.detach().reshape(-1) for p in
                                     self.part_module(indexed, k).parameters() if p.requires_grad])
                          for k in range(self.partitions)])
        return flat.long()


def plan_partitions(model: nn.Module, *, partitions: int, split: str, balance: str | None,
                    micro_batches: int, sample: torch.Tensor) -> PartitionPlan:
    """Decide how to cut `model` (checks it can be cut so; UserError otherwise).

    `sample` is a batch of inputs, used to time each layer when no balance is given.
    """
    from distbelief.model.balance import (balance_by_cost, check_balance, layer_costs,
                                          parse_balance)

    if partitions == 1:
        return PartitionPlan()
    if not isinstance(model, nn.Sequential):
        raise UserError(f"--partitions {partitions} needs the model to be an nn.Sequential "
                        f"(it is a {type(model).__name__}): build it as nn.Sequential of layers")
    if split == "units":
        plan = PartitionPlan("units", partitions)
        plan.part_module(model, 0)  # raises UserError for a model that cannot be split so
        return plan
    layers = len(model)
    if balance is not None:
        counts = parse_balance(balance)
        check_balance(counts, layers, partitions)
    else:
        if partitions > layers:
            check_balance([1] * partitions, layers, partitions)  # the same clear error
        blocks = _blocks_with_parameters(model)
        if partitions > len(blocks):
            raise UserError(f"--partitions {partitions} is more than the model's {len(blocks)} "
                            f"layers with parameters: use at most {len(blocks)} partitions")
        costs = layer_costs(measure_layers(model, sample),
                            [sum(p.numel() * p.element_size() for p in layer.parameters())
                             for layer in model])
        # balance whole blocks, so that no partition is left without parameters
        groups = balance_by_cost([sum(costs[a:b]) for a, b in blocks], partitions)
        counts, first = [], 0
        for size in groups:
            counts.append(blocks[first + size - 1][1] - blocks[first][0])
            first += size
    plan = PartitionPlan("layers", partitions, tuple(counts), micro_batches)
    empty = [k for k, n in enumerate(plan.part_numels(model)) if n == 0]
    if empty:
        start, end = plan.layer_range(empty[0])
        raise UserError(f"partition {empty[0]} would hold layers {start}..{end - 1}, which have "
                        "no parameters: give it a layer with parameters with --balance")
    return plan


def _blocks_with_parameters(model: nn.Sequential) -> list[tuple[int, int]]:
    """Layer ranges that each start at a layer with parameters (the first range also holds
    any parameterless layers before it)."""
    starts = [i for i, layer in enumerate(model) if any(p.requires_grad for p in layer.parameters())]
    if not starts:
        raise UserError("the model has no parameters to train: give it at least one layer "
                        "with parameters")
    starts[0] = 0
    return list(zip(starts, starts[1:] + [len(model)]))


def measure_layers(model: nn.Sequential, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Seconds of forward + backward of each layer on `sample` (the fastest of `repeats`)."""
    times, x = [], sample
    for layer in model:
        best = float("inf")
        for _ in range(repeats):
            inp = x.detach().requires_grad_()
            start = time.perf_counter()
            out = layer(inp)
            out.backward(torch.ones_like(out))
            best = min(best, time.perf_counter() - start)
        layer.zero_grad(set_to_none=True)
        times.append(best)
        x = out.detach()
    return times


class WholeRunner:
    """An unpartitioned replica: forward and backward in this process. `task`: whose loss
    (None: classify's cross-entropy)."""

    reports_loss = True
    bytes_sent = 0

    def __init__(self, module: nn.Module, *, task: Task | None = None,
                 precision: str = "fp32", device: str = "cpu"):
        from distbelief.model.deferred import DeferredWeights

        self.module, self.task = module, task or make_task()
        self.weights = DeferredWeights(module)
        self.autocast = autocast(precision, device)
        self.mixed = precision != "fp32"

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward of one batch; its mean loss."""
        if self.mixed:  # autograd's own Linear backward, in the dtypes autocast chose
            with self.autocast:
                loss = self.task.loss(self.module(x), y)
            loss.backward()
            return loss.item()
        loss = self.task.loss(self.weights.forward(x), y)
        loss.backward()
        self.weights.flush()  # one addmm_ per Linear, straight into .grad
        return loss.item()

    def flush(self) -> None:
        """The gradients are complete after `train_step`: nothing to do."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class UnitsRunner(WholeRunner):
    """A units-split partition: every partition computes the (gathered) loss; partition 0
    reports it."""

    def __init__(self, module: nn.Module, comm, part: int, *, task: Task | None = None):
        super().__init__(module, task=task)
        self.comm, self.reports_loss = comm, part == 0

    @property
    def bytes_sent(self) -> int:  # type: ignore[override]
        return self.comm.bytes_sent


class PipelineRunner:
    """A layer-split partition (a pipeline stage) with its links."""

    def __init__(self, stage, links):
        self.stage, self.links = stage, links
        self.reports_loss = stage.reports_loss

    def train_step(self, x, y):
        return self.stage.train_step(x, y)

    def flush(self) -> None:
        """Complete the gradients of the last `train_step` (before a push)."""
        self.stage.flush()

    def predict(self, x):
        return self.stage.predict(x)

    @property
    def bytes_sent(self) -> int:
        return sum(link.bytes_sent for link in self.links)


@contextlib.contextmanager
def open_partition(plan: PartitionPlan, part_module: nn.Module, part: int, *, store, name: str,
                   timeout: float, task: Task | None = None, precision: str = "fp32",
                   device: str = "cpu") -> Iterator:
    """Connect partition `part` of replica `name` to its peers; yield its runner.

    `store` is a raw c10d store (`JobStore.raw`); channel names start with
    ``mp/<name>/``. `task`: the job's task, whose loss `train_step` computes (None:
    classify's; `predict` needs none). `precision`, `device`: a whole model's forward pass
    (--precision; partitions compute in float32). Blocks until the peers joined (or `timeout`).
    Every channel and thread is released on exit.
    """
    if plan.partitions == 1:
        yield WholeRunner(part_module, task=task, precision=precision, device=device)
        return
    from distbelief.runtime.channel import Channel, Group

    prefix = f"mp/{name}"
    if plan.split == "units":
        from distbelief.model.units import UnitComm

        group = Group(store, f"{prefix}/units", part, plan.partitions, timeout)
        try:
            comm = UnitComm(group)
            part_module.attach(comm)
            yield UnitsRunner(part_module, comm, part, task=task)
        finally:
            group.close()
        return
    from distbelief.model.pipeline import Link, PipelineStage

    with contextlib.ExitStack() as stack:
        prev = nxt = None
        if part > 0:  # boundary part-1: activations come in, gradients go back
            fwd = Channel(store, f"{prefix}/b{part - 1}/fwd", 1, timeout)
            bwd = Channel(store, f"{prefix}/b{part - 1}/bwd", 0, timeout)
            prev = stack.enter_context(Link(recv=fwd, send=bwd, name=f"{name}/b{part - 1}",
                                            timeout=timeout))
        if part < plan.partitions - 1:
            fwd = Channel(store, f"{prefix}/b{part}/fwd", 0, timeout)
            bwd = Channel(store, f"{prefix}/b{part}/bwd", 1, timeout)
            nxt = stack.enter_context(Link(recv=bwd, send=fwd, name=f"{name}/b{part}",
                                           timeout=timeout))
        stage = PipelineStage(part_module, part, plan.partitions,
                              micro_batches=plan.micro_batches, prev=prev, next=nxt, task=task)
        yield PipelineRunner(stage, [link for link in (prev, nxt) if link is not None])
