"""How consensus ADMM's penalty rho changes between rounds, as pure functions (table tests).

- ``fixed``: rho never changes.
- ``balance``: residual balancing (Boyd et al. 2011, section 3.4.1): rho is
  multiplied by `tau` when the primal residual exceeds `mu` times the dual one,
  divided by `tau` when the dual residual exceeds `mu` times the primal one,
  and kept otherwise.
- ``grow``: the source notes' beta <- 10 * beta after every round.

Every schedule keeps rho within [`RHO_MIN`, `rho_max`]. Whenever rho changes,
the scaled duals u = lambda / rho must be rescaled by rho_old / rho_new so
that the unscaled duals lambda, and with them the iterates, stay the same
(`rescale`).

Example::

    >>> next_rho("balance", 1.0, primal=5.0, dual=0.1, rho_max=100.0)
    2.0
    >>> next_rho("grow", 50.0, primal=None, dual=None, rho_max=100.0)
    100.0
"""

from __future__ import annotations

SCHEDULES = ("fixed", "balance", "grow")
GROWTH = 10.0  # the source notes' beta <- 10 * beta
RHO_MIN = 1e-6


def next_rho(schedule: str, rho: float, *, primal: float | None, dual: float | None,
             rho_max: float, mu: float = 10.0, tau: float = 2.0) -> float:
    """The rho of the next round, given this round's rho and residuals.

    `primal` and `dual` may be None (not measured yet): balance then keeps rho.
    """
    if schedule == "fixed":
        return rho
    if schedule == "grow":
        return min(rho * GROWTH, rho_max)
    if schedule != "balance":
        raise ValueError(f"unknown rho schedule {schedule!r}; one of {', '.join(SCHEDULES)}")
    if primal is None or dual is None:
        return rho
    if primal > mu * dual:
        return min(rho * tau, rho_max)
    if dual > mu * primal:
        return max(rho / tau, RHO_MIN)
    return rho


def rescale(rho_old: float, rho_new: float) -> float:
    """The factor the scaled duals are multiplied by when rho changes (lambda = rho * u
    stays the same)."""
    return rho_old / rho_new
