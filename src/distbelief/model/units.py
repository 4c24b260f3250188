"""Splitting within layers: DistBelief's blocks of neurons, one block per partition.

With ``--split units`` every partition of a replica runs every layer of an
``nn.Sequential``, but holds only its block of each layer's parameters:

- an ``nn.Linear`` is cut by output units (partition k computes units
  ``[a_k, b_k)``); it needs its whole input, so a split input is gathered first;
- a locally connected layer (`LocallyConnected1d` / `2d`) is cut spatially along
  its first spatial axis (partition k computes output positions ``[a_k, b_k)``);
  it needs only the input positions under its receptive fields, so when the
  input is split the same way only the boundary fields travel between
  neighbouring partitions (a halo exchange), and when it is whole each
  partition takes its window locally;
- element-wise activations work on whatever piece a partition holds; any other
  layer without parameters (Flatten, pooling) runs on the whole tensor;
- a layer with parameters of any other kind cannot be split this way (UserError).

The output is gathered at the end, so every partition computes the same loss;
autograd then carries exactly the gradients that cross a boundary backwards:
the slice of a gathered tensor's gradient that belongs to this partition, the
sum over partitions of a whole input's gradient, the halo's gradients back to
their owners. Each partition's parameter gradients equal the unpartitioned
model's for its block (see tests/test_partition_oracle.py).

Example (in each of the K processes of a replica)::

    part = build_units_part(model, part=k, parts=K)   # this block's parameters
    part.attach(UnitComm(group))                      # group: runtime.channel.Group
    loss = task.loss(part(x), y); loss.backward()    # task: the job's `distbelief.task.Task`
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distbelief.errors import UserError
from distbelief.model.locally_connected import (LocallyConnected1d, LocallyConnected2d,
                                                locally_connected_1d, locally_connected_2d)
from distbelief.ps.layout import contiguous_ranges  # pure: the same cut as the shards'


ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.GELU, nn.ELU, nn.SiLU,
               nn.Softplus, nn.Identity, nn.Dropout)
Ranges = list[tuple[int, int]]


class UnitComm:
    """The collectives a units-split partition needs, over a `runtime.channel.Group`.

    Counts ``bytes_sent``: the bytes of this partition's own data that go to
    other partitions (a gathered piece once per other member, a halo once, an
    all-reduce as a ring would send it, 2(K-1)/K of the tensor). One thread.
    """

    def __init__(self, group):
        self.group, self.rank, self.size = group, group.rank, group.size
        self.bytes_sent = 0

    def gather(self, x: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
        """Concatenate every partition's piece along `dim` (piece k spans ranges[k])."""
        widest = max(b - a for a, b in ranges)
        own = ranges[self.rank][1] - ranges[self.rank][0]
        if own < widest:  # gloo's allgather wants equal shapes: pad, then trim
            pad = list(x.shape)
            pad[dim] = widest - own
            x = torch.cat([x, x.new_zeros(pad)], dim)
        pieces = self.group.all_gather(x.contiguous())
        self.bytes_sent += x.numel() * x.element_size() * (self.size - 1)
        return torch.cat([p.narrow(dim, 0, b - a) for p, (a, b) in zip(pieces, ranges)], dim)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out = x.contiguous().clone()
        self.group.all_reduce_sum(out)
        self.bytes_sent += out.numel() * out.element_size() * 2 * (self.size - 1) // self.size
        return out

    def exchange(self, sends: dict[int, torch.Tensor],
                 shapes: dict[int, torch.Size]) -> dict[int, torch.Tensor]:
        """Send sends[j] to each j and receive a tensor of shapes[j] from each j, at once."""
        pending = []
        for j, t in sends.items():
            t = t.contiguous()
            pending.append((self.group.send(t, j), t))
            self.bytes_sent += t.numel() * t.element_size()
        got = {j: torch.empty(shape) for j, shape in shapes.items()}
        pending += [(self.group.recv(t, j), t) for j, t in got.items()]
        for handle, _ in pending:  # the tensors stay referenced until their transfer is done
            handle.wait()
        return got


class _Gather(torch.autograd.Function):
    """Forward: the whole tensor from the pieces. Backward: this partition's piece of the
    gradient (everything downstream is computed identically on every partition)."""

    @staticmethod
    def forward(ctx, x, comm, dim, ranges):
        ctx.comm, ctx.dim, ctx.range = comm, dim, ranges[comm.rank]
        return comm.gather(x, dim, ranges)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.range
        return grad.narrow(ctx.dim, a, b - a).contiguous(), None, None, None


class _SumGrad(torch.autograd.Function):
    """Forward: identity on a whole (replicated) tensor. Backward: the sum over partitions
    of their gradients, since each used the tensor for its own block only."""

    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad), None


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


class _Halo(torch.autograd.Function):
    """Forward: the input positions `need[rank]` along `dim`, from this partition's own
    piece (`owned[rank]`) and the neighbours' boundary pieces. Backward: the gradients of
    the borrowed pieces go back to their owners and are added into theirs."""

    @staticmethod
    def forward(ctx, x, comm, dim, owned, need):
        k = comm.rank
        mine = owned[k]
        sends, shapes, spans = {}, {}, {}
        for j in range(comm.size):
            if j == k:
                continue
            out = _overlap(mine, need[j])
            if out is not None:
                sends[j] = x.narrow(dim, out[0] - mine[0], out[1] - out[0])
            into = _overlap(owned[j], need[k])
            if into is not None:
                shape = list(x.shape)
                shape[dim] = into[1] - into[0]
                shapes[j], spans[j] = torch.Size(shape), into
        got = comm.exchange(sends, shapes)
        pieces = [(spans[j][0], got[j]) for j in got]
        own = _overlap(mine, need[k])
        if own is not None:
            pieces.append((own[0], x.narrow(dim, own[0] - mine[0], own[1] - own[0])))
        pieces.sort(key=lambda p: p[0])
        ctx.comm, ctx.dim, ctx.owned, ctx.need, ctx.shape = comm, dim, owned, need, x.shape
        return torch.cat([p for _, p in pieces], dim)

    @staticmethod
    def backward(ctx, grad):
        comm, dim, owned, need = ctx.comm, ctx.dim, ctx.owned, ctx.need
        k = comm.rank
        mine, window = owned[k], need[k]
        sends, shapes, spans = {}, {}, {}
        for j in range(comm.size):
            if j == k:
                continue
            into = _overlap(owned[j], window)  # what j lent us: its gradient goes back
            if into is not None:
                sends[j] = grad.narrow(dim, into[0] - window[0], into[1] - into[0])
            out = _overlap(mine, need[j])  # what we lent j: its gradient comes back
            if out is not None:
                shape = list(ctx.shape)
                shape[dim] = out[1] - out[0]
                shapes[j], spans[j] = torch.Size(shape), out
        got = comm.exchange(sends, shapes)
        result = grad.new_zeros(ctx.shape)
        own = _overlap(mine, window)
        if own is not None:
            result.narrow(dim, own[0] - mine[0], own[1] - own[0]).add_(
                grad.narrow(dim, own[0] - window[0], own[1] - own[0]))
        for j, g in got.items():
            a, b = spans[j]
            result.narrow(dim, a - mine[0], b - a).add_(g)
        return result, None, None, None, None


class SplitLinear(nn.Module):
    """Output units [start, end) of an `nn.Linear` (the parameters are copies)."""

    def __init__(self, full: nn.Linear, start: int, end: int):
        super().__init__()
        self.weight = nn.Parameter(full.weight.detach()[start:end].clone())
        self.bias = (nn.Parameter(full.bias.detach()[start:end].clone())
                     if full.bias is not None else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SplitLocallyConnected(nn.Module):
    """Output positions [start, end) along the first spatial axis of a locally connected
    layer. `forward` takes the input positions `needed` (clipped to the input) along that
    axis and the whole of the other axis; the zero padding is added here."""

    def __init__(self, full: LocallyConnected1d | LocallyConnected2d, start: int, end: int):
        super().__init__()
        self.two_d = isinstance(full, LocallyConnected2d)
        self.weight = nn.Parameter(full.weight.detach()[start:end].clone())
        self.bias = (nn.Parameter(full.bias.detach()[:, start:end].clone())
                     if full.bias is not None else None)
        if self.two_d:
            self.kernel, self.stride, self.padding = full.kernel_size, full.stride, full.padding
            k, s, p, length = (self.kernel[0], self.stride[0], self.padding[0],
                               full.input_size[0])
        else:
            self.kernel, self.stride, self.padding = full.kernel_size, full.stride, full.padding
            k, s, p, length = self.kernel, self.stride, self.padding, full.input_length
        lo, hi = start * s - p, (end - 1) * s + k - p  # the receptive fields, unpadded
        self.needed = (max(lo, 0), min(hi, length))
        self.pad = (max(0, -lo), max(0, hi - length))

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        if self.two_d:
            pw = self.padding[1]
            x = F.pad(window, (pw, pw, *self.pad))
            return locally_connected_2d(x, self.weight, self.bias, self.kernel, self.stride)
        x = F.pad(window, self.pad)
        return locally_connected_1d(x, self.weight, self.bias, self.kernel, self.stride)


@dataclass(frozen=True)
class _Step:
    kind: str          # "linear", "local", "elementwise", "whole"
    ranges: Ranges     # the output blocks of a split layer, by partition
    index: int         # the layer's position in the model


class UnitsPart(nn.Module):
    """Partition `part` of `parts` of an nn.Sequential split by units (see module doc).

    Its parameters are its blocks of every Linear and locally connected layer, in
    layer order. Call `attach` with a `UnitComm` before the forward pass.
    """

    def __init__(self, layers: list[nn.Module], steps: list[_Step], part: int, parts: int,
                 needs: dict[tuple[int, int], tuple[int, int]]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.steps, self.part, self.parts = steps, part, parts
        self._needs = needs  # (layer index, partition) -> input positions its block reads
        self.comm: UnitComm | None = None

    def attach(self, comm: UnitComm) -> UnitsPart:
        self.comm = comm
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            raise RuntimeError("UnitsPart.attach(comm) must be called before forward")
        split: tuple[int, Ranges] | None = None  # (axis, blocks) while x is a block, else None
        for layer, step in zip(self.layers, self.steps):
            if step.kind == "elementwise":
                x = layer(x)
                continue
            if step.kind == "local" and split is not None and split[0] == 2:
                axis_ranges = split[1]
                need = [self._needed(step, k) for k in range(self.parts)]
                x = layer(_Halo.apply(x, self.comm, 2, axis_ranges, need))
                split = (2, step.ranges)
                continue
            if split is not None:
                x, split = _Gather.apply(x, self.comm, split[0], split[1]), None
            if step.kind == "whole":
                x = layer(x)
                continue
            if x.requires_grad:
                x = _SumGrad.apply(x, self.comm)
            if step.kind == "linear":
                x, split = layer(x), (x.dim() - 1, step.ranges)
            else:
                lo, hi = layer.needed
                x, split = layer(x.narrow(2, lo, hi - lo)), (2, step.ranges)
        if split is not None:
            x = _Gather.apply(x, self.comm, split[0], split[1])
        return x

    def _needed(self, step: _Step, part: int) -> tuple[int, int]:
        """Input positions partition `part` needs for its block of `step`'s layer."""
        return self._needs[(step.index, part)]


def build_units_part(model: nn.Module, part: int, parts: int) -> UnitsPart:
    """Partition `part` of `model` (an nn.Sequential) split by units; copies its blocks.

    Raises:
        UserError: the model is not an nn.Sequential, has a layer with parameters that
            is neither Linear nor locally connected, or a layer too narrow for `parts`.
    """
    if not isinstance(model, nn.Sequential):
        raise UserError(f"--split units needs the model to be an nn.Sequential (it is a "
                        f"{type(model).__name__}): build it as nn.Sequential of layers")
    layers, steps, needs = [], [], {}
    for i, layer in enumerate(model):
        name = f"layer {i} ({type(layer).__name__})"
        if isinstance(layer, nn.Linear):
            ranges = _blocks(layer.out_features, parts, name, "output units")
            layers.append(SplitLinear(layer, *ranges[part]))
            steps.append(_Step("linear", ranges, i))
        elif isinstance(layer, (LocallyConnected1d, LocallyConnected2d)):
            length = (layer.output_size[0] if isinstance(layer, LocallyConnected2d)
                      else layer.output_length)
            ranges = _blocks(length, parts, name, "output positions along its first axis")
            blocks = [SplitLocallyConnected(layer, *r) for r in ranges]
            for k, block in enumerate(blocks):
                needs[(i, k)] = block.needed
            layers.append(blocks[part])
            steps.append(_Step("local", ranges, i))
        elif any(p.requires_grad for p in layer.parameters()):
            raise UserError(f"{name} has parameters but cannot be split by units: --split "
                            "units cuts nn.Linear by output units and LocallyConnected1d/2d "
                            "spatially; use --split layers for this model")
        elif isinstance(layer, ELEMENTWISE):
            layers.append(layer)
            steps.append(_Step("elementwise", [], i))
        else:
            layers.append(layer)
            steps.append(_Step("whole", [], i))
    if not any(s.kind in ("linear", "local") for s in steps):
        raise UserError("the model has no nn.Linear or locally connected layer to split by "
                        "units: use --split layers")
    return UnitsPart(layers, steps, part, parts, needs)


def _blocks(n: int, parts: int, name: str, what: str) -> Ranges:
    if n < parts:
        raise UserError(f"{name} has {n} {what}, fewer than --partitions {parts}: use at "
                        f"most {n} partitions or --split layers")
    return contiguous_ranges(n, parts)
