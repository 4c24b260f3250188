"""A model's buffers (BatchNorm's running statistics and the like) as part of what a job trains.

The parameter server serves parameters, which gradients update; buffers are not
learned by gradient. Each replica (each partition of one) keeps its own copy and
updates it on its own batches, as a single process would; it publishes them
with its progress reports (`distbelief.metrics.report`, the store key
``buffers/<member>``), and the coordinator evaluates, checkpoints and saves the
model with their mean over the replicas: every floating-point buffer averaged
(each replica's running mean and variance estimate the same population's over
its own batches; their mean is the same estimate from more of them), every
integer one (``num_batches_tracked``) the largest. DDP instead broadcasts rank
0's buffers before every forward pass; averaging uses every replica's batches.

Example::

    state = buffer_state(model)                   # {"1.running_mean": tensor, ...}
    store.set_json("buffers/0", encode(state))
    load_buffers(model, average([decode(store.get_json("buffers/0")), ...]))
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["has_buffers", "buffer_state", "encode", "decode", "average", "load_buffers"]


def _persistent(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that belong to the module's state dict (not the non-persistent ones)."""
    saved = set(module.state_dict(keep_vars=True))
    return {name: buf for name, buf in module.named_buffers() if name in saved}


def has_buffers(module: nn.Module) -> bool:
    """Whether the module has buffers worth publishing."""
    return bool(_persistent(module))


def buffer_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of each of the module's persistent buffers, by state-dict name."""
    return {name: buf.detach().to("cpu", copy=True) for name, buf in _persistent(module).items()}


def encode(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Buffers as JSON: dtype, shape and the values (float32 values are exact as JSON
    numbers, which are doubles)."""
    return {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                   "values": t.reshape(-1).tolist()} for name, t in state.items()}


def decode(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of `encode`."""
    return {name: torch.tensor(entry["values"], dtype=getattr(torch, entry["dtype"])
                               ).reshape(entry["shape"]) for name, entry in data.items()}


def average(states: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each buffer's mean over the states that hold it (integer buffers: the largest).

    Raises:
        ValueError: a buffer whose shape differs between two states.
    """
    grouped: dict[str, list[torch.Tensor]] = {}
    for state in states:
        for name, value in state.items():
            grouped.setdefault(name, []).append(value)
    out = {}
    for name, values in grouped.items():
        if any(v.shape != values[0].shape for v in values):
            raise ValueError(f"buffer {name!r} has shapes {[tuple(v.shape) for v in values]}")
        stacked = torch.stack(values)
        out[name] = (stacked.double().mean(dim=0).to(values[0].dtype)
                     if values[0].is_floating_point() else stacked.max(dim=0).values)
    return out


@torch.no_grad()
def load_buffers(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy buffers (by state-dict name) into the model's own.

    Raises:
        ValueError: a name that is not a buffer of the model, or a shape that differs.
    """
    own = _persistent(model)
    for name, value in state.items():
        if name not in own:
            raise ValueError(f"{name!r} is not a buffer of the model (it has "
                             f"{', '.join(own) or 'none'})")
        if own[name].shape != value.shape:
            raise ValueError(f"buffer {name!r} is {tuple(value.shape)}, the model's "
                             f"{tuple(own[name].shape)}")
        own[name].copy_(value)
