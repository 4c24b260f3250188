"""Weight gradients of Linear layers computed once per batch, in place, when asked.

Autograd computes a Linear layer's weight gradient in every backward pass into a
fresh tensor and then adds it into ``.grad``. For a pipeline stage that runs M
micro-batches that is M matrix products of 1/M of the batch each, M fresh
tensors the size of the weight (84 MB for the speech model's output layer, each
one page-faulted in), and M additions — on this CPU it made a stage's backward
grow with M until the pipeline gained nothing. `DeferredWeights` instead
keeps each micro-batch's layer input and output gradient in the backward pass
(which then computes only the input gradient the previous layer needs), and
`flush()` adds ``gy^T x`` over all of them into ``.grad`` with one ``addmm_``
per layer (`flush_one()` does one layer). That also takes the weight gradients
off the pipeline's critical path: a stage computes them while it would
otherwise wait for its neighbour (zero-bubble pipelines use the same freedom).

The gradients are those of plain autograd up to the order of summation (see
tests/test_partition_oracle.py). Layers other than nn.Linear use autograd as usual.

Example::

    weights = DeferredWeights(model)            # model: an nn.Sequential
    loss = task.loss(weights.forward(x), y)     # task: the job's `distbelief.task.Task`
    loss.backward()                             # input gradients only, for the Linears
    weights.flush()                             # now every .grad is complete
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Linear(torch.autograd.Function):
    """F.linear whose backward returns the input gradient only and keeps (x, gy)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stash):
        ctx.save_for_backward(x, weight)
        ctx.stash = stash
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        ctx.stash.append((x, grad))
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class DeferredWeights:
    """Runs an nn.Sequential with deferred Linear weight gradients. One thread."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.layers = list(module) if isinstance(module, nn.Sequential) else [module]
        self.stashes = {id(layer): [] for layer in self.layers if _deferrable(layer)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.module(x)
        for layer in self.layers:
            if id(layer) in self.stashes:
                x = _Linear.apply(x, layer.weight, layer.bias, self.stashes[id(layer)])
            else:
                x = layer(x)
        return x

    @property
    def pending(self) -> bool:
        return any(self.stashes.values())

    @torch.no_grad()
    def flush(self) -> None:
        """Add every kept micro-batch's weight and bias gradients into ``.grad``."""
        for layer in self.layers:
            self._flush_layer(layer)

    @torch.no_grad()
    def flush_one(self) -> bool:
        """Flush the layer with the most kept rows (one matrix product); False if none."""
        waiting = [(sum(g.numel() for _, g in self.stashes[id(layer)]), i)
                   for i, layer in enumerate(self.layers)
                   if self.stashes.get(id(layer))]
        if not waiting:
            return False
        self._flush_layer(self.layers[max(waiting)[1]])
        return True

    def _flush_layer(self, layer: nn.Module) -> None:
        items = self.stashes.get(id(layer))
        if items:
            x = torch.cat([a.reshape(-1, layer.in_features) for a, _ in items])
            gy = torch.cat([g.reshape(-1, layer.out_features) for _, g in items])
            items.clear()
            if layer.weight.grad is None:
                layer.weight.grad = torch.zeros_like(layer.weight)
            layer.weight.grad.addmm_(gy.t(), x)
            if layer.bias is not None:
                if layer.bias.grad is None:
                    layer.bias.grad = torch.zeros_like(layer.bias)
                layer.bias.grad.add_(gy.sum(0))


def _deferrable(layer: nn.Module) -> bool:
    return (type(layer) is nn.Linear and layer.weight.requires_grad
            and (layer.bias is None or layer.bias.requires_grad))
