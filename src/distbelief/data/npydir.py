"""A directory of ``.npy`` files, opened memory-mapped: data larger than memory.

``--dataset path/to/dir`` reads::

    dir/x.npy        inputs (N, features...), any numeric dtype (float32 avoids a conversion)
    dir/y.npy        labels (N,), integer class ids 0..C-1
    dir/x_test.npy   optional test set (both or neither); without it the seeded
    dir/y_test.npy   20% split of `distbelief.data.sampling.holdout_split` is taken

Every array is opened with ``np.load(path, mmap_mode="r", allow_pickle=False)``:
nothing is read until a batch asks for its rows (`ArraySamples.gather`), so a
replica touches only its own rows and the operating system keeps only the
pages in use. Opening reads the headers (shapes, dtypes) and, in the
coordinator, the labels, in chunks, to check them and count the classes (1 M
labels at a time; labels are small next to inputs). The inputs are not scanned
for NaN or inf, since that would read the whole file: a non-finite batch is
handled by ``--on-nonfinite`` like any other. Example::

    numpy.save("d/x.npy", x); numpy.save("d/y.npy", y)
    train, test, input_shape, num_classes = open_npy_dir(Path("d"), seed=0, num_samples=None)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distbelief.data.checks import check_input_layout, check_label_layout, check_labels
from distbelief.data.samples import ArraySamples
from distbelief.data.sampling import holdout_split
from distbelief.errors import UserError

__all__ = ["open_npy_dir"]

NAMES = ("x", "y", "x_test", "y_test")
LABEL_CHUNK = 1 << 20


def open_npy_dir(path: Path, *, seed: int, num_samples: int | None,
                 known: tuple[tuple[int, ...], int] | None = None
                 ) -> tuple[ArraySamples, ArraySamples, tuple[int, ...], int]:
    """(train, test, input shape, number of classes) of the .npy directory ``path``.

    ``num_samples`` caps the training samples; ``known`` = (input shape, classes)
    as the coordinator found them (in the job description) skips the label scan.

    Raises:
        UserError: x.npy or y.npy missing, only one of x_test.npy / y_test.npy,
            a file that is not a .npy or holds Python objects, a wrong dtype or
            shape, lengths that differ, bad labels, fewer than 2 samples.
    """
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
            check_label_layout(arrays[yk], f"{yk}.npy", source)
            if len(arrays[xk]) != len(arrays[yk]):
                raise UserError(f"{source}: {xk}.npy has {len(arrays[xk])} samples but {yk}.npy "
                                f"{len(arrays[yk])}: give one label per sample")
    x, y = arrays["x"], arrays["y"]
    if len(x) < 2:
        raise UserError(f"{source}: x.npy has {len(x)} samples: give at least 2")
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        if x_test.shape[1:] != x.shape[1:]:
            raise UserError(f"{source}: x_test.npy samples have shape {x_test.shape[1:]} but x.npy "
                            f"samples {x.shape[1:]}: make them match")
        cap = len(x) if num_samples is None else min(num_samples, len(x))
        train, test = ArraySamples(x[:cap], y[:cap]), ArraySamples(x_test, y_test)
    else:
        train_rows, test_rows = holdout_split(len(x), seed)
        if num_samples is not None:
            train_rows = train_rows[:num_samples]
        train, test = ArraySamples(x, y, train_rows), ArraySamples(x, y, test_rows)
    input_shape = tuple(int(d) for d in x.shape[1:])
    if known is not None:
        return train, test, input_shape, int(known[1])
    top = max(_largest_label(train, "y.npy", source),
              _largest_label(test, "y_test.npy" if "x_test" in arrays else "y.npy", source))
    return train, test, input_shape, top + 1


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


def _largest_label(samples: ArraySamples, key: str, source: str) -> int:
    """The largest label of ``samples`` (-1 when empty), checking each, a chunk at a time."""
    n, top = len(samples), -1
    for start in range(0, n, LABEL_CHUNK):
        stop = min(start + LABEL_CHUNK, n)
        rows = samples.rows[start:stop] if samples.rows is not None else slice(start, stop)
        labels = check_labels(np.asarray(samples.y[rows]), key, source)
        if len(labels):
            top = max(top, int(labels.max()))
    return top
