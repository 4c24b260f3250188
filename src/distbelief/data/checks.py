"""Checks of user data (inputs and labels) with one clear line for each problem.

`check_inputs` / `check_labels` read the values of arrays held in memory;
`check_input_layout` / `check_label_layout` look only at shape and dtype, for
arrays too large to read up front (memory maps). Example::

    x = check_inputs(np.asarray(user_x), "x", "dataset 'd.npz'")   # float32, or UserError
"""

from __future__ import annotations

import numpy as np

from distbelief.errors import UserError


def check_label_layout(y: np.ndarray, key: str, source: str) -> None:
    """``y`` is 1-D with a dtype that can hold class ids (integers, bools, or floats
    holding integers: those values are checked by `check_labels`).

    Raises:
        UserError: not 1-D, or of a dtype that cannot hold class ids.
    """
    if y.ndim != 1:
        raise UserError(f"{source}: {key!r} has shape {y.shape}: give 1-D integer class labels, not one-hot")
    if y.dtype.kind not in "iubf":
        raise UserError(f"{source}: {key!r} has dtype {y.dtype}: labels must be integer class ids 0..C-1")


def check_labels(y: np.ndarray, key: str, source: str) -> np.ndarray:
    """Check that ``y`` holds non-negative integer labels; return them as int64.

    Raises:
        UserError: not 1-D, not integer-valued, or negative.
    """
    if y.ndim != 1:
        raise UserError(f"{source}: {key!r} has shape {y.shape}: give 1-D integer class labels, not one-hot")
    if y.dtype.kind not in "iub":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise UserError(
                f"{source}: {key!r} has dtype {y.dtype} with non-integer values: labels must be class ids 0..C-1"
            )
    if len(y) and y.min() < 0:
        raise UserError(f"{source}: {key!r} has label {int(y.min())}: labels must be class ids 0..C-1")
    return y.astype(np.int64)


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
