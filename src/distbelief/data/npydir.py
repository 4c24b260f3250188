"""A directory of ``.npy`` files, opened memory-mapped: data larger than memory.

``--dataset path/to/dir`` reads::

    dir/x.npy        inputs (N, features...), any numeric dtype (float32 avoids a conversion)
    dir/y.npy        targets in the job's task's form (`distbelief.task`): class ids
                     0..C-1 (N,) for classify, token ids (N, T) for sequence, numbers
                     (N, *S) for regress; any numeric dtype
    dir/x_test.npy   optional test set (both or neither); without it the seeded
    dir/y_test.npy   20% split of `distbelief.data.sampling.holdout_split` is taken

Every array is opened with ``np.load(path, mmap_mode="r", allow_pickle=False)``:
nothing is read until a batch asks for its rows (`ArraySamples.gather`), so a
replica touches only its own rows and the operating system keeps only the
pages in use. Opening reads the headers (shapes, dtypes) and, in the
coordinator, the targets, in chunks, to check them (integer ids, finite
numbers) and count the classes (1 M values at a time; targets are small next to
inputs). The inputs are not scanned for NaN or inf, since that would read the
whole file: a non-finite batch is handled by ``--on-nonfinite`` like any other.
Example::

    numpy.save("d/x.npy", x); numpy.save("d/y.npy", y)
    train, test, input_shape, targets = open_npy_dir(Path("d"), seed=0, num_samples=None)
    targets             # Targets(shape=(), classes=10) for class ids 0..9
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from distbelief.data.checks import check_input_layout
from distbelief.data.samples import ArraySamples
from distbelief.data.sampling import holdout_split
from distbelief.errors import UserError
from distbelief.task import Targets, Task, make_task

__all__ = ["open_npy_dir"]

NAMES = ("x", "y", "x_test", "y_test")
TARGET_CHUNK = 1 << 20  # target values checked at a time


def open_npy_dir(path: Path, *, seed: int, num_samples: int | None,
                 known: tuple[tuple[int, ...], Targets] | None = None,
                 task: Task | None = None
                 ) -> tuple[ArraySamples, ArraySamples, tuple[int, ...], Targets]:
    """(train, test, input shape, `Targets`) of the .npy directory ``path``, its targets
    read by ``task`` (default classify).

    ``num_samples`` caps the training samples; ``known`` = (input shape, targets)
    as the coordinator found them (in the job description) skips the target scan.

    Raises:
        UserError: x.npy or y.npy missing, only one of x_test.npy / y_test.npy,
            a file that is not a .npy or holds Python objects, a wrong dtype or
            shape, lengths that differ, targets the task cannot learn from, fewer
            than 2 samples.
    """
    task = task or make_task()
    source = f"dataset directory {str(path)!r}"
    files = {name: path / f"{name}.npy" for name in NAMES}
    missing = [f"{name}.npy" for name in ("x", "y") if not files[name].is_file()]
    if missing:
        found = ", ".join(sorted(p.name for p in path.glob("*.npy"))) or "no .npy files"
        raise UserError(f"{source} has no {' or '.join(missing)} (found: {found}): save the inputs "
                        "with numpy.save(DIR + '/x.npy', x) and the labels as y.npy")
    if files["x_test"].is_file() != files["y_test"].is_file():
        raise UserError(f"{source} has only one of x_test.npy and y_test.npy: give both or neither")
    arrays = {name: _open(file, source) for name, file in files.items() if file.is_file()}
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        if xk in arrays:
            check_input_layout(arrays[xk], f"{xk}.npy", source)
            task.check_target_layout(arrays[yk], f"{yk}.npy", source)
            if len(arrays[xk]) != len(arrays[yk]):
                raise UserError(f"{source}: {xk}.npy has {len(arrays[xk])} samples but {yk}.npy "
                                f"{len(arrays[yk])}: give one target per sample")
    x, y = arrays["x"], arrays["y"]
    if len(x) < 2:
        raise UserError(f"{source}: x.npy has {len(x)} samples: give at least 2")
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        if x_test.shape[1:] != x.shape[1:]:
            raise UserError(f"{source}: x_test.npy samples have shape {x_test.shape[1:]} but x.npy "
                            f"samples {x.shape[1:]}: make them match")
        if y_test.shape[1:] != y.shape[1:]:
            raise UserError(f"{source}: y_test.npy targets have shape {y_test.shape[1:]} but "
                            f"y.npy targets {y.shape[1:]}: make them match")
        cap = len(x) if num_samples is None else min(num_samples, len(x))
        train = ArraySamples(x[:cap], y[:cap], target_dtype=task.target_dtype)
        test = ArraySamples(x_test, y_test, target_dtype=task.target_dtype)
    else:
        train_rows, test_rows = holdout_split(len(x), seed)
        if num_samples is not None:
            train_rows = train_rows[:num_samples]
        train = ArraySamples(x, y, train_rows, target_dtype=task.target_dtype)
        test = ArraySamples(x, y, test_rows, target_dtype=task.target_dtype)
    input_shape = tuple(int(d) for d in x.shape[1:])
    if known is not None:
        return train, test, input_shape, known[1]
    top = max(_scan_targets(train, "y.npy", source, task),
              _scan_targets(test, "y_test.npy" if "x_test" in arrays else "y.npy", source, task))
    ids = task.target_dtype == torch.int64  # class or token ids: count them
    return train, test, input_shape, Targets(tuple(int(d) for d in y.shape[1:]),
                                             top + 1 if ids else None)


def _open(file: Path, source: str) -> np.ndarray:
    """Memory-map one .npy file (no pickles).

    Raises:
        UserError: not a .npy file, or an array of Python objects.
    """
    try:
        with open(file, "rb") as f:
            np.lib.format.read_magic(f)
    except (ValueError, OSError) as exc:
        raise UserError(f"{source}: {file.name} is not a .npy file ({exc}): save it with "
                        "numpy.save") from exc
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "object" in str(exc).lower():
            raise UserError(f"{source}: {file.name} holds Python objects, which are not read "
                            "(no pickles): save a numeric array") from exc
        raise UserError(f"{source}: {file.name} is not a valid .npy file ({exc}): save it "
                        "with numpy.save") from exc
    except OSError as exc:
        raise UserError(f"{source}: {file.name} cannot be read ({exc}): check the file") from exc
    if not isinstance(array, np.ndarray):
        raise UserError(f"{source}: {file.name} is not a single array: save it with numpy.save")
    return array


def _scan_targets(samples: ArraySamples, key: str, source: str, task: Task) -> int:
    """Check every target of ``samples`` with ``task``, a chunk at a time; the largest class
    or token id (-1 when empty or for regression targets)."""
    n, top = len(samples), -1
    step = max(1, TARGET_CHUNK // max(1, math.prod(samples.y.shape[1:])))
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = samples.rows[start:stop] if samples.rows is not None else slice(start, stop)
        values = task.check_targets(np.asarray(samples.y[rows]), key, source)
        if values.size and values.dtype.kind == "i":  # ids (regression targets: checked only)
            top = max(top, int(values.max()))
    return top
