"""Batch L-BFGS over vectors held elsewhere: the optimizer core of Sandblaster L-BFGS.

In Sandblaster (DistBelief, Dean et al. 2012, section 4.2) the parameters, the
gradient and the L-BFGS history (s, y pairs) live in the parameter shards; the
coordinator keeps only scalars and asks the shards for vector arithmetic. So
`LBFGS` sees vectors only as integer handles of a `VectorSpace`, one call per
vector operation. `vector_space.TensorSpace` is the in-process space (the local reference).

One `LBFGS.step()` is one iteration of ``torch.optim.LBFGS(max_iter=1)``: the
same two-loop recursion, curvature check, H_diag, first step ``min(1, 1/|g|_1)
* lr`` and strong-Wolfe search (bracketing, cubic interpolation, zoom, the 0.1
insufficient-progress rule), with the same arithmetic, so over a `TensorSpace`
it takes torch's decisions and steps bit for bit. That needs torch's rounding
of the scalars too: torch keeps each scalar derived from a vector as a 0-dim
tensor of the parameters' dtype, and at float32 an ill-conditioned run turns a
last-bit difference into 1e-4 within twenty iterations. So scalars from the
space become 0-dim tensors of ``scalar_dtype``, combined in torch's order.
One difference: a point is never evaluated twice (torch re-evaluates the point
its search accepted at the start of its next ``step``), so with strong Wolfe an
iteration reports one evaluation fewer than torch's ``func_evals`` grows.

Blocking and threads: `step` blocks until its vector operations and evaluations
are done; an `LBFGS` must be used from one thread at a time.

Example::

    space = TensorSpace(n)
    x = space.new()
    space.tensor(x).copy_(x0)

    def evaluate(g: int) -> float:  # f and its gradient at the point in x
        loss, grad = objective(space.tensor(x))
        space.tensor(g).copy_(grad)
        return loss

    with LBFGS(space, x, evaluate, LBFGSSettings(line_search="strong_wolfe")) as opt:
        for _ in range(100):
            if opt.step().converged:
                break
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from distbelief.algorithms.sandblaster.vector_space import VectorSpace
from distbelief.errors import UserError

Scalar = float | torch.Tensor  # a step length: a float until derived from a vector

# Sufficient-decrease and curvature constants of torch's strong-Wolfe search.
_C1 = 1e-4
_C2 = 0.9
# torch.optim.LBFGS does not pass its tolerance_change to the line search, which
# therefore always stops narrowing a bracket at the function's default; so do we.
_BRACKET_TOLERANCE = 1e-9
# A pair with y.s at or below this would spoil the inverse-Hessian estimate, so
# it is not stored (torch's curvature check).
_MIN_CURVATURE = 1e-10


@dataclass(kw_only=True)
class LBFGSSettings:
    """Settings of one `LBFGS` run; the names follow `torch.optim.LBFGS`."""

    lr: float = 1.0
    """Step length tried first (the first iteration tries min(1, 1/|g|_1) * lr)."""
    history: int = 10
    """(s, y) pairs kept; the oldest is dropped when a new one arrives (torch: history_size)."""
    line_search: str = "none"
    """"none" (step lr along the direction) or "strong_wolfe"."""
    tolerance_grad: float = 1e-7
    """Stop, without moving, once max |g_i| is at or below this."""
    tolerance_change: float = 1e-9
    """Stop when g.d, the step |t| max |d_i|, or the change of f falls below this."""
    max_line_search: int = 25
    """Evaluations one strong-Wolfe search may use (torch's max_eval with max_iter=1)."""

    def __post_init__(self) -> None:
        if self.line_search not in ("none", "strong_wolfe"):
            raise UserError(f"line_search must be 'none' or 'strong_wolfe', got {self.line_search!r}")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}: give the step length to try first")
        if self.history < 1:
            raise UserError(f"history must be >= 1, got {self.history}: keep at least one (s, y) pair")
        if self.max_line_search < 1:
            raise UserError(f"max_line_search must be >= 1, got {self.max_line_search}: "
                            "a search needs at least one evaluation")
        for name in ("tolerance_grad", "tolerance_change"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class Iteration:
    """What one `LBFGS.step` did."""

    loss: float
    """f at the point after this iteration."""
    evaluations: int
    """Objective evaluations this call used (the first call also counts the initial one)."""
    step: float
    """The step length t taken (0.0 when it did not move)."""
    converged: str | None
    """None, or why to stop: "gradient", "direction" (both without moving), "step", "loss change"."""


class LBFGS:
    """L-BFGS that keeps scalars only; vectors stay in `space`.

    `x` is the handle of the current point, moved in place. `evaluate(g)`
    computes the objective at the point currently in `x`, writes its gradient
    into vector `g` and returns the loss. The optimizer allocates its own
    vectors from `space` (at most ``2 * history + 6``, reused from iteration to
    iteration) and frees them in `close`. `scalar_dtype` is the precision the
    space computes in, which scalars are rounded to: by default the space's
    ``dtype`` attribute if it has one (`TensorSpace` does), else float32.
    """

    def __init__(self, space: VectorSpace, x: int, evaluate: Callable[[int], float],
                 settings: LBFGSSettings, *, scalar_dtype: torch.dtype | None = None) -> None:
        self.space, self.x, self.settings = space, x, settings
        self._evaluate = evaluate
        self._dtype = scalar_dtype or getattr(space, "dtype", torch.float32)
        self._owned: set[int] = set()  # every vector allocated here, so close() frees all
        self._spare: list[int] = []  # allocated but unused: taken before allocating anew
        self._f: float | None = None
        self._g: int | None = None  # gradient at x
        # Left by the last iteration for the next history update. _g_prev is the
        # gradient where that iteration started: the same handle as _g if it did not move.
        self._d: int | None = None
        self._t: Scalar = 0.0
        self._g_prev: int | None = None
        self._pairs: deque[tuple[int, int, Scalar]] = deque()  # (s, y, 1 / y.s), oldest first
        self._h_diag: Scalar = 1.0
        self._iterations = 0
        self._closed = False

    @property
    def loss(self) -> float | None:
        """f at the current x (None before the first step)."""
        return self._f

    def step(self) -> Iteration:
        """Do one L-BFGS iteration (the first call also evaluates the starting point).

        If `evaluate` raises, the optimizer is left mid-iteration: close it.
        """
        if self._closed:
            raise RuntimeError("step() on a closed LBFGS: its vectors are freed")
        space, cfg = self.space, self.settings
        evaluations = 0
        if self._f is None:
            self._g = self._take()
            self._f = float(self._evaluate(self._g))
            evaluations = 1
        if self._norm_inf(self._g) <= cfg.tolerance_grad:
            return Iteration(self._f, evaluations, 0.0, "gradient")

        self._update_history()
        d = self._direction()
        self._iterations += 1
        if self._iterations == 1:
            t = min(1.0, 1.0 / self._scalar(space.norm_1(self._g))) * cfg.lr
        else:
            t = cfg.lr
        gtd = self._dot(self._g, d)
        f_old = self._f
        self._d, self._t, self._g_prev = d, t, self._g
        if gtd > -cfg.tolerance_change:
            return Iteration(self._f, evaluations, 0.0, "direction")

        d_norm = self._norm_inf(d)
        if cfg.line_search == "none":
            space.axpy(float(t), d, self.x)
            g = self._take()
            f, used = float(self._evaluate(g)), 1
        else:
            f, g, t, used = self._strong_wolfe(d, t, gtd, d_norm)
        self._f, self._g, self._t = f, g, t
        evaluations += used

        converged = None
        if abs(t) * d_norm <= cfg.tolerance_change:
            converged = "step"
        elif abs(f - f_old) < cfg.tolerance_change:
            converged = "loss change"
        return Iteration(f, evaluations, float(t), converged)

    def close(self) -> None:
        """Free every vector this optimizer allocated (x is the caller's and stays)."""
        self._closed = True
        for v in self._owned:
            self.space.free(v)
        self._owned.clear()
        self._spare.clear()
        self._pairs.clear()

    def __enter__(self) -> LBFGS:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- vectors -------------------------------------------------------------

    def _take(self) -> int:
        if self._spare:
            return self._spare.pop()
        v = self.space.new()
        self._owned.add(v)
        return v

    def _give(self, v: int) -> None:
        self._spare.append(v)

    def _scalar(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=self._dtype)

    def _dot(self, a: int, b: int) -> torch.Tensor:
        return self._scalar(self.space.dot(a, b))

    def _norm_inf(self, v: int) -> torch.Tensor:
        return self._scalar(self.space.norm_inf(v))

    # -- direction -----------------------------------------------------------

    def _update_history(self) -> None:
        """Turn the last iteration's direction and start gradient into s and y."""
        if self._d is None:
            return
        space, s, y = self.space, self._d, self._g_prev
        self._d = self._g_prev = None
        if y == self._g:  # x did not move, so y = 0 would fail the curvature check
            self._give(s)
            return
        # Both are computed in the slots they replace: nothing reads d or g_prev again.
        space.scale(s, float(self._t))
        space.scale(y, -1.0)
        space.axpy(1.0, self._g, y)
        ys = self._dot(y, s)
        if ys > _MIN_CURVATURE:
            if len(self._pairs) == self.settings.history:
                old_s, old_y, _ = self._pairs.popleft()
                self._give(old_s)
                self._give(old_y)
            self._pairs.append((s, y, 1.0 / ys))
            self._h_diag = ys / self._dot(y, y)
        else:
            self._give(s)
            self._give(y)

    def _direction(self) -> int:
        """Return a new vector d = -H g, H the L-BFGS inverse-Hessian estimate (two-loop recursion)."""
        space = self.space
        q = self._take()
        space.copy(q, self._g)
        # The recursion is linear in q, so it runs on +g instead of -g and the sign
        # is applied with H_diag: one operation fewer, and the same floats as torch
        # (negation is exact), with every alpha negated.
        alphas = []
        for s, y, rho in reversed(self._pairs):
            alpha = self._dot(s, q) * rho
            space.axpy(float(-alpha), y, q)
            alphas.append(alpha)
        space.scale(q, float(-self._h_diag))
        for (s, y, rho), alpha in zip(self._pairs, reversed(alphas)):
            beta = self._dot(y, q) * rho
            space.axpy(float(-alpha - beta), s, q)
        return q

    # -- strong-Wolfe line search --------------------------------------------

    def _strong_wolfe(self, d: int, t: Scalar, gtd: torch.Tensor,
                      d_norm: torch.Tensor) -> tuple[float, int, Scalar, int]:
        """Search t along d from x; return (f, gradient vector, t, evaluations).

        Leaves x at x_init + t d for the returned t. The returned gradient is the
        current one (self._g) when the search falls back to t = 0.
        """
        space, x, f0 = self.space, self.x, self._f
        # torch counts ls_iter from 0 after its first evaluation and stops at max_ls,
        # so a search evaluates at most max_ls + 1 times.
        max_ls = self.settings.max_line_search - 1
        x_init = self._take()
        space.copy(x_init, x)
        held: list[int] = []  # gradient vectors this search allocated and still holds
        evaluations = 0
        at: Scalar = 0  # x holds x_init + at * d

        def trial(t: Scalar, keep: tuple[int, ...]) -> _Point:
            nonlocal evaluations, at
            for v in [v for v in held if v not in keep]:
                held.remove(v)
                self._give(v)
            if at != 0:  # the first trial starts from x itself
                space.copy(x, x_init)
            space.axpy(float(t), d, x)
            g = self._take()
            held.append(g)
            f = float(self._evaluate(g))
            evaluations += 1
            at = t
            return _Point(t, f, g, self._dot(g, d))

        def too_high(p: _Point) -> bool:  # the sufficient-decrease (Armijo) test fails
            return p.f > f0 + _C1 * p.t * gtd

        def flat_enough(p: _Point) -> bool:  # the strong curvature test holds
            return abs(p.gtd) <= -_C2 * gtd

        # Bracketing: grow t until an interval is known to hold an acceptable point.
        start = _Point(0, f0, self._g, gtd)
        prev, new = start, trial(t, keep=())
        done = False
        ls_iter = 0
        while ls_iter < max_ls:
            if too_high(new) or (ls_iter > 1 and new.f >= prev.f):
                ends = [prev, new]
                break
            if flat_enough(new):  # checked before the slope's sign: such a point is accepted
                ends, done = [new], True
                break
            if new.gtd >= 0:  # past a minimum
                ends = [prev, new]
                break
            t = _cubic_minimum(prev.t, prev.f, prev.gtd, new.t, new.f, new.gtd,
                               bounds=(new.t + 0.01 * (new.t - prev.t), new.t * 10))
            prev, new = new, trial(t, keep=(new.g,))
            ls_iter += 1
        if ls_iter == max_ls:  # out of evaluations: the better of the start and the last trial
            ends = [start, new]

        # Zoom: shrink the bracket until its low end satisfies the strong Wolfe conditions.
        insufficient_progress = False
        low, high = (0, 1) if ends[0].f <= ends[-1].f else (1, 0)
        while not done and ls_iter < max_ls:
            if abs(ends[1].t - ends[0].t) * d_norm < _BRACKET_TOLERANCE:
                break
            t = _cubic_minimum(ends[0].t, ends[0].f, ends[0].gtd, ends[1].t, ends[1].f, ends[1].gtd)
            # A trial hugging an end of the bracket shrinks it slowly: the second time
            # in a row (or when it is at or past an end) move it 0.1 of the width inside.
            lo, hi = min(ends[0].t, ends[1].t), max(ends[0].t, ends[1].t)
            eps = 0.1 * (hi - lo)
            if min(hi - t, t - lo) < eps:
                if insufficient_progress or t >= hi or t <= lo:
                    t = hi - eps if abs(t - hi) < abs(t - lo) else lo + eps
                    insufficient_progress = False
                else:
                    insufficient_progress = True
            else:
                insufficient_progress = False
            new = trial(t, keep=(ends[0].g, ends[1].g))
            ls_iter += 1
            if too_high(new) or new.f >= ends[low].f:
                ends[high] = new
                low, high = (0, 1) if ends[0].f <= ends[1].f else (1, 0)
            else:
                if flat_enough(new):
                    done = True
                elif new.gtd * (ends[high].t - ends[low].t) >= 0:
                    ends[high] = ends[low]  # keep the minimum between the ends
                ends[low] = new

        best = ends[low]
        for v in held:
            if v != best.g:
                self._give(v)
        if best.t != at:
            space.copy(x, x_init)
            if best.t != 0:
                space.axpy(float(best.t), d, x)
        self._give(x_init)
        return best.f, best.g, best.t, evaluations


class _Point(NamedTuple):
    """A point of the line search: step, f, gradient vector, slope g . d."""

    t: Scalar
    f: float
    g: int
    gtd: torch.Tensor


def _cubic_minimum(x1: Scalar, f1: float, g1: Scalar, x2: Scalar, f2: float, g2: Scalar,
                   bounds: tuple[Scalar, Scalar] | None = None) -> Scalar:
    """Minimiser of the cubic through (x1, f1, f1' = g1) and (x2, f2, g2), clamped to bounds.

    Bounds default to [min(x1, x2), max(x1, x2)]; without a real minimiser,
    return the middle of the bounds. The arguments mix floats and 0-dim tensors
    as torch's do, and the expressions keep torch's order, so the result rounds
    the same way.
    """
    lo, hi = bounds if bounds is not None else ((x1, x2) if x1 <= x2 else (x2, x1))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1**2 - g1 * g2
    if d2_square >= 0:
        d2 = d2_square.sqrt()
        if x1 <= x2:
            minimum = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            minimum = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(minimum, lo), hi)
    return (lo + hi) / 2.0

