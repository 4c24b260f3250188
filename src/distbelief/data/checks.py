"""Checks of user inputs with one clear line for each problem (targets are checked by
the job's task: `distbelief.task.Task.check_targets`).

`check_inputs` reads the values of arrays held in memory; `check_input_layout`
looks only at shape and dtype, for arrays too large to read up front (memory
maps). Example::

    x = check_inputs(np.asarray(user_x), "x", "dataset 'd.npz'")   # float32, or UserError
"""

from __future__ import annotations

import numpy as np

from distbelief.errors import UserError


def check_input_layout(x: np.ndarray, key: str, source: str) -> None:
    """``x`` is numeric of shape (N, features...), without reading its values.

    Raises:
        UserError: fewer than 2 dimensions, or not numeric.
    """
    if x.ndim < 2:
        raise UserError(f"{source}: {key!r} has shape {x.shape}: give inputs of shape (N, features...)")
    if x.dtype.kind not in "iubf":
        raise UserError(f"{source}: {key!r} has dtype {x.dtype}: give numeric inputs")


def check_inputs(x: np.ndarray, key: str, source: str) -> np.ndarray:
    """Check that ``x`` is a finite numeric (N, ...) array; return it as float32.

    Raises:
        UserError: 1-D, non-numeric, or containing NaN/inf.
    """
    check_input_layout(x, key, source)
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise UserError(f"{source}: {key!r} has {bad} non-finite values (NaN or inf): clean or impute them")
    return x
