"""Vector operations a shard runs on its own slices (Sandblaster L-BFGS, consensus ADMM).

A shard holds numbered vectors, all of its slice's length: vector 0 is the
parameters (what replicas pull), the others are made on demand by whoever
drives the optimizer (the L-BFGS history, a search direction, the gradient
that workers accumulate into). The driver sends one small command per
operation and gets back at most one scalar per shard; reductions (dot, norms)
are combined across shards on the driver's side, so no full vector ever moves
through the driver.

    ZERO  v            v = 0            (creates v)
    COPY  v, src       v = src          (creates v)
    SCALE v, alpha     v *= alpha
    AXPY  v, src, a    v += a * src
    DOT   v, src       -> sum(v * src)
    NORM_INF v         -> max |v|
    NORM_1 v           -> sum |v|
    FREE  v
    MEAN  v, mask, base     v = mean of vectors base + i for each bit i of mask
                            -> ||v_new - v_old||^2     (consensus ADMM)

Scalars travel in the int64 header as the bit pattern of a float64.

`ShardVectors` is the shard side (not thread-safe: the shard calls it under its
lock). `RemoteVectors` is the driver side: an `algorithms.lbfgs.VectorSpace`
over every shard of a `PSClient`.

Example (driver)::

    space = RemoteVectors(ps)
    d = space.new(); space.copy(d, PARAMS); space.scale(d, -1.0)   # d = -x on every shard
    norm = space.dot(d, d) ** 0.5                                   # one scalar per shard back
"""

from __future__ import annotations

import math
import struct

import torch

ZERO, COPY, SCALE, AXPY, DOT, NORM_INF, NORM_1, FREE, MEAN = range(1, 10)
NAMES = {ZERO: "zero", COPY: "copy", SCALE: "scale", AXPY: "axpy", DOT: "dot",
         NORM_INF: "norm_inf", NORM_1: "norm_1", FREE: "free", MEAN: "mean"}
PARAMS = 0  # vector 0 is the parameters, what replicas pull
MAX_VECTORS = 4096
MAX_MEMBERS = 63  # the members of a MEAN travel as the bits of one int64


def member_mask(members) -> int:
    """The int64 bit set of MEAN's members (numbers 0..62).

    >>> member_mask([0, 2])
    5
    """
    mask = 0
    for i in members:
        if not 0 <= i < MAX_MEMBERS:
            raise ValueError(f"a MEAN member must be in 0..{MAX_MEMBERS - 1}, got {i}")
        mask |= 1 << i
    return mask


def float_bits(value: float) -> int:
    """A float64 as the int64 with the same bits (to ride in a header)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", bits))[0]


class VectorError(ValueError):
    """A command named a vector that does not exist, or an unknown operation."""


class ShardVectors:
    """The numbered vectors of one shard; vector 0 is the shard's parameters."""

    def __init__(self, params: torch.Tensor):
        self.vectors: dict[int, torch.Tensor] = {PARAMS: params}

    def get(self, v: int) -> torch.Tensor:
        try:
            return self.vectors[v]
        except KeyError:
            raise VectorError(f"vector {v} does not exist on this shard") from None

    def _target(self, v: int) -> torch.Tensor:
        """Vector v, made (uninitialised) if it does not exist yet."""
        if v not in self.vectors:
            if not 0 <= v < MAX_VECTORS:
                raise VectorError(f"vector number {v} is outside 0..{MAX_VECTORS - 1}")
            self.vectors[v] = torch.empty_like(self.vectors[PARAMS])
        return self.vectors[v]

    def run(self, op: int, v: int, src: int, alpha: float) -> float:
        """Run one operation; returns its scalar (0.0 for operations that return none)."""
        if op == ZERO:
            self._target(v).zero_()
        elif op == COPY:
            source = self.get(src)
            self._target(v).copy_(source)
        elif op == SCALE:
            self.get(v).mul_(alpha)
        elif op == AXPY:
            self.get(v).add_(self.get(src), alpha=alpha)
        elif op == DOT:
            return float(torch.dot(self.get(v), self.get(src)))
        elif op == NORM_INF:
            vec = self.get(v)
            return float(vec.abs().max()) if vec.numel() else 0.0
        elif op == NORM_1:
            return float(self.get(v).abs().sum())
        elif op == FREE:
            if v == PARAMS:
                raise VectorError("vector 0 holds the parameters and cannot be freed")
            self.vectors.pop(v, None)
        elif op == MEAN:
            return self._mean(v, src, alpha)
        else:
            raise VectorError(f"unknown vector operation {op}")
        return 0.0

    def _mean(self, v: int, mask: int, base: float) -> float:
        """v = the mean of the member vectors; returns ||v_new - v_old||^2."""
        members = [int(base) + i for i in range(MAX_MEMBERS) if mask >> i & 1]
        if not members or base != int(base):
            raise VectorError(f"MEAN needs at least one member and a whole base, got mask "
                              f"{mask} and base {base}")
        target = self.get(v)
        sources = [self.get(m) for m in members]
        old = target.clone()
        target.copy_(sources[0] if len(sources) == 1 else torch.stack(sources).mean(0))
        return float(torch.dot(target - old, target - old))

    def accumulate(self, v: int, grad: torch.Tensor, replace: bool = False) -> None:
        """v += grad (a worker's gradient for this slice), making v as zeros if new; with
        `replace`, v = grad."""
        if replace:
            self._target(v).copy_(grad)
            return
        if v not in self.vectors:
            self._target(v).zero_()
        self.vectors[v].add_(grad)


class RemoteVectors:
    """`VectorSpace` over every shard of a PSClient: one command per op, scalars back.

    Blocks for each operation (all shards work in parallel). Handles are vector
    numbers; `new` hands out numbers from 1 up and reuses freed ones.
    """

    def __init__(self, ps, timeout: float | None = None):
        self.ps = ps
        self.timeout = timeout if timeout is not None else ps.timeout
        self._free: list[int] = []
        self._live: set[int] = set()
        self._next = PARAMS + 1
        self.ops = 0

    def _run(self, op: int, v: int, src: int = 0, alpha: float = 0.0) -> list[float]:
        self.ops += 1
        return self.ps.vector(op, v, src, alpha).wait(self.timeout)

    def new(self) -> int:
        v = self._free.pop() if self._free else self._next
        if v == self._next:
            self._next += 1
        self._run(ZERO, v)
        self._live.add(v)
        return v

    def free(self, v: int) -> None:
        if v not in self._live:  # a double free would hand one number to two vectors
            raise ValueError(f"vector {v} was not made by new() or is already freed")
        self._run(FREE, v)
        self._live.discard(v)
        self._free.append(v)

    def zero(self, v: int) -> None:
        self._run(ZERO, v)

    def copy(self, dst: int, src: int) -> None:
        self._run(COPY, dst, src)

    def scale(self, v: int, alpha: float) -> None:
        self._run(SCALE, v, 0, alpha)

    def axpy(self, alpha: float, x: int, y: int) -> None:
        self._run(AXPY, y, x, alpha)

    def dot(self, a: int, b: int) -> float:
        return sum(self._run(DOT, a, b))

    def norm_inf(self, v: int) -> float:
        maxima = self._run(NORM_INF, v)
        return math.nan if any(math.isnan(m) for m in maxima) else max(maxima)

    def norm_1(self, v: int) -> float:
        return sum(self._run(NORM_1, v))
