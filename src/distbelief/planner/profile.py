"""What the planner measures on this host: the model's compute, sizes and the data's cost.

`profile_job(cfg)` builds the job's model, data and task (its loss) as every
role would, then times forward + backward of each layer at the configured batch
size (at one thread, and the whole model at each thread count a process might
get), counts parameter bytes per layer and activation bytes at every cut, and
times one batch of the configured augmentation and one update of each rule. The numbers
feed the pure functions of `distbelief.planner.cost`; each can be replaced by a
given one (a profile is a plain dataclass, saved in ``plan.json``).

Blocks for about a second on small models, a few on DistBelief's speech model.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from distbelief.config import RULES
from distbelief.task import Task, task_of


@dataclass
class Profile:
    """The measured costs of one job's model and data on this host (seconds, bytes)."""

    batch_size: int
    parameters: int
    """Trainable parameters (float32)."""
    layer_seconds: list[float]
    """Forward + backward of each layer of an nn.Sequential at the batch size, one thread."""
    layer_param_bytes: list[int]
    activation_bytes: list[int]
    """Bytes of one batch's activations after each layer (a cut after layer i sends these)."""
    step_seconds: dict[int, float]
    """Forward + backward of the whole model at the batch size, by thread count."""
    units_split: bool
    """Whether the model can be cut by units (has Linear or locally connected layers)."""
    sequential: bool
    augment_seconds: float
    """Augmenting one batch (0: no augmentation configured)."""
    batch_bytes: int
    """One batch of inputs and targets, as sent by a data server."""
    train_samples: int
    dataset_bytes: int
    """The dataset held in memory by every process that loads it (0 when read by batch)."""
    rule_seconds: dict[str, float] = field(default_factory=dict)
    """Applying each update rule to one parameter (seconds per element)."""
    initial_loss: float | None = None
    """The job's task's loss (`distbelief.task`) of the untrained model on the profiled
    batch: where every candidate's training loss starts (they all start from the same
    seeded weights)."""
    base_memory: int = 0
    """Resident bytes of a process that has imported torch and nothing else of the job."""

    @property
    def param_bytes(self) -> int:
        return 4 * self.parameters

    @property
    def layers_with_parameters(self) -> int:
        return sum(1 for b in self.layer_param_bytes if b)

    def compute_seconds(self, threads: int) -> float:
        """Forward + backward of one batch with `threads` threads (nearest measured count below)."""
        known = sorted(self.step_seconds)
        usable = [t for t in known if t <= threads] or known[:1]
        return self.step_seconds[usable[-1]]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["step_seconds"] = {str(k): v for k, v in self.step_seconds.items()}
        return data


def profile_job(cfg, cores: int, repeats: int = 3) -> Profile:
    """Measure `cfg`'s (a JobConfig) model and data on this host; `cores`: the most threads
    one process could be given."""
    from distbelief.data.augment import Augmenter, augment_generator
    from distbelief.data.feed import load_data_and_model
    from distbelief.model.partition import measure_layers

    data, model = load_data_and_model(cfg)
    task = task_of(cfg)
    batch = cfg.data.batch_size
    x, y = data.train.head(batch)  # read only a batch, whatever the source
    if len(x) < batch:  # a tiny dataset: repeat samples to reach the batch size
        reps = math.ceil(batch / len(x))
        x, y = (t.repeat(reps, *([1] * (t.dim() - 1)))[:batch] for t in (x, y))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = isinstance(model, nn.Sequential)
        if sequential:
            # timed as the pipeline's balance times them (`plan_partitions`)
            layer_seconds = measure_layers(model, x, repeats)
            activations = _activation_bytes(model, x)
            layer_params = [4 * sum(p.numel() for p in layer.parameters() if p.requires_grad)
                            for layer in model]
        else:
            layer_seconds, activations, layer_params = [], [], []
        with torch.no_grad():
            initial_loss = task.loss(model(x), y).item()
        step_seconds = {}
        for t in _thread_counts(cores):
            torch.set_num_threads(t)
            step_seconds[t] = _whole_step(model, x, y, repeats, task)
        if not sequential:
            layer_seconds = [step_seconds[1]]
        torch.set_num_threads(1)
        augmenter = Augmenter(cfg.augment, data.input_shape)
        augment = 0.0
        if augmenter.enabled:
            augment = _best(lambda: augmenter(x.clone(), augment_generator(0, 0, 0)), repeats)
        rules = {rule: _rule_seconds(rule) for rule in RULES}
    finally:
        torch.set_num_threads(threads)
    return Profile(
        batch_size=batch, parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        layer_seconds=layer_seconds, layer_param_bytes=layer_params,
        activation_bytes=activations, step_seconds=step_seconds,
        units_split=_units_splittable(model), sequential=sequential, augment_seconds=augment,
        batch_bytes=x.numel() * x.element_size() + y.numel() * y.element_size(),
        train_samples=len(data.train), dataset_bytes=_resident_bytes(data),
        rule_seconds=rules, initial_loss=initial_loss, base_memory=resident_bytes())


def _resident_bytes(data) -> int:
    """What every process that loads the dataset holds of it: the arrays of data in memory;
    nothing for a memory-mapped directory or a torch Dataset, read a batch at a time."""
    from distbelief.data.samples import TensorSamples

    return sum(t.numel() * t.element_size() for split in (data.train, data.test)
               if isinstance(split, TensorSamples) for t in split.tensors())


def _units_splittable(model: nn.Module) -> bool:
    """Whether --split units can cut it: every layer with parameters is Linear or locally
    connected (`distbelief.model.units`)."""
    from distbelief.model.locally_connected import LocallyConnected1d, LocallyConnected2d

    if not isinstance(model, nn.Sequential):
        return False
    kinds = [isinstance(layer, (nn.Linear, LocallyConnected1d, LocallyConnected2d))
             for layer in model if any(p.requires_grad for p in layer.parameters())]
    return bool(kinds) and all(kinds)


def _thread_counts(cores: int) -> list[int]:
    counts, t = [], 1
    while t < cores:
        counts.append(t)
        t *= 2
    return counts + [max(1, cores)]


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: first calls allocate
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _activation_bytes(model: nn.Sequential, x: torch.Tensor) -> list[int]:
    """Bytes of each layer's output for the batch `x` (what a cut after it sends)."""
    sizes = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            sizes.append(x.numel() * x.element_size())
    return sizes


def _whole_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int,
                task: Task) -> float:
    """Seconds of forward + backward of the whole model under `task`'s loss."""
    def step():
        loss = task.loss(model(x), y)
        loss.backward()

    seconds = _best(step, repeats)
    model.zero_grad(set_to_none=True)
    return seconds


def _rule_seconds(rule: str, n: int = 1 << 20) -> float:
    """Seconds per element of one in-place update with `rule` (as a shard or replica runs it)."""
    w, g = torch.zeros(n), torch.full((n,), 1e-3)
    state = [torch.zeros(n) for _ in range(2)]

    def update():
        if rule == "sgd":
            w.add_(g, alpha=-0.01)
        elif rule in ("momentum", "adagrad"):
            state[0].mul_(0.9).add_(g) if rule == "momentum" else state[0].addcmul_(g, g)
            w.add_(state[0], alpha=-0.01)
        else:
            state[0].mul_(0.9).add_(g, alpha=0.1)
            state[1].mul_(0.999).addcmul_(g, g, value=0.001)
            w.addcdiv_(state[0], state[1].sqrt().add_(1e-8), value=-0.01)

    return _best(update, 2) / n


def resident_bytes() -> int:
    """This process's resident set (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
