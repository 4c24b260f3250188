"""A model's parameters and gradients as views into flat buffers.

The parameter server deals in one flat vector; a replica keeps its model's
parameters as views into `params` so that a pull writes straight into the
model, and points each parameter's `.grad` at a slice of one of two gradient
buffers so that `backward()` accumulates straight into what is pushed.

Example::

    flat = FlatModel(model, grads=2)
    loss.backward()              # gradients land in flat.grads[0]
    flat.bind_grads(1)           # next backward accumulates into flat.grads[1]
"""

from __future__ import annotations

import torch
from torch import nn


class FlatModel:
    def __init__(self, model: nn.Module, grads: int | list[torch.Tensor] = 2,
                 params: torch.Tensor | None = None):
        """`grads`: how many gradient buffers to allocate, or the buffers themselves
        (e.g. a `PSClient`'s, which the shards read in place). `params`: a flat tensor
        to keep the parameters in (e.g. one shared between processes), used as it is:
        its values replace the model's; default a copy of the model's."""
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if params is not None and params.numel() != sum(p.numel() for p in self.parameters):
            raise ValueError(f"the parameter buffer holds {params.numel()} values, the model "
                             f"{sum(p.numel() for p in self.parameters)}")
        self.params = flatten_parameters(model) if params is None else params
        self.numel = self.params.numel()
        if isinstance(grads, int):
            grads = [torch.zeros(self.numel, dtype=torch.float32) for _ in range(grads)]
        if any(g.numel() != self.numel for g in grads):
            raise ValueError(f"gradient buffers must hold {self.numel} values")
        self.grads = grads
        offset = 0
        self._slices = []
        for p in self.parameters:
            n = p.numel()
            p.data = self.params[offset: offset + n].view_as(p)
            self._slices.append((offset, n))
            offset += n
        self.bind_grads(0)

    def bind_grads(self, index: int) -> None:
        """Make backward() accumulate into grads[index] (which keeps its contents)."""
        for p, (offset, n) in zip(self.parameters, self._slices):
            p.grad = self.grads[index][offset: offset + n].view_as(p)


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """A copy of the model's trainable parameters as one float32 vector."""
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()
                      if p.requires_grad])


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector (as made by `flatten_parameters`) into the model's parameters."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, the model {offset}")
