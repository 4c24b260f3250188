"""The vector interface Sandblaster's L-BFGS is written against, and its in-process form.

`VectorSpace` is what `algorithms.lbfgs.LBFGS` needs: vectors held somewhere
else (the parameter shards, through `ps.vectors.RemoteVectors`), named by
integer handles, with the few operations L-BFGS does on them. `TensorSpace`
holds them as local torch tensors: the reference the distributed space is
tested against, and a way to run the same optimizer in one process.

Example::

    space = TensorSpace(3)
    v = space.new()
    space.tensor(v).copy_(torch.tensor([1.0, -2.0, 2.0]))
    assert space.dot(v, v) == 9.0
"""

from __future__ import annotations

from typing import Protocol

import torch


class VectorSpace(Protocol):
    """Vectors held elsewhere; handles are ints. All ops block until done."""

    def new(self) -> int: ...  # allocate a vector (contents unspecified), return its handle
    def free(self, v: int) -> None: ...
    def copy(self, dst: int, src: int) -> None: ...  # dst = src
    def scale(self, v: int, alpha: float) -> None: ...  # v *= alpha
    def axpy(self, alpha: float, x: int, y: int) -> None: ...  # y += alpha * x
    def dot(self, a: int, b: int) -> float: ...
    def norm_inf(self, v: int) -> float: ...  # max |v_i|
    def norm_1(self, v: int) -> float: ...  # sum |v_i|


class TensorSpace:
    """A `VectorSpace` of in-process torch tensors of length `n` (float32 by default).

    Each operation is the torch operation `torch.optim.LBFGS` uses for the same
    step, so `LBFGS` over this space follows torch's vector arithmetic.
    """

    def __init__(self, n: int, dtype: torch.dtype = torch.float32) -> None:
        self.n, self.dtype = n, dtype
        self._vectors: dict[int, torch.Tensor] = {}
        self._next = 0

    def tensor(self, v: int) -> torch.Tensor:
        """The tensor behind handle `v` (a live view: writes change the vector)."""
        return self._vectors[v]

    def new(self) -> int:
        v, self._next = self._next, self._next + 1
        self._vectors[v] = torch.empty(self.n, dtype=self.dtype)
        return v

    def free(self, v: int) -> None:
        del self._vectors[v]

    def copy(self, dst: int, src: int) -> None:
        self._vectors[dst].copy_(self._vectors[src])

    def scale(self, v: int, alpha: float) -> None:
        self._vectors[v].mul_(alpha)

    def axpy(self, alpha: float, x: int, y: int) -> None:
        self._vectors[y].add_(self._vectors[x], alpha=alpha)

    def dot(self, a: int, b: int) -> float:
        return float(torch.dot(self._vectors[a], self._vectors[b]))

    def norm_inf(self, v: int) -> float:
        return float(self._vectors[v].abs().max())

    def norm_1(self, v: int) -> float:
        # abs().sum() rather than vector_norm: the same summation as torch's first step
        return float(self._vectors[v].abs().sum())
