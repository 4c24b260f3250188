"""Text files as a byte-level next-token dataset: ``--dataset text:PATH --task sequence``.

``PATH`` is a file, a directory (recursively its ``*.py``, ``*.txt`` and
``*.md`` files), a glob (``src/**/*.py``), or ``stdlib``: the source of this
Python's standard library (``sysconfig.get_paths()["stdlib"]`` without its site-packages,
about 30 MB of .py files), a real corpus that needs no download.

A sample is a window of ``seq_len`` bytes, given as float32 values 0..255
(the data layer's inputs are floats; `distbelief.model.transformer` casts them
back to token ids); its target is the same window shifted by one byte, int64
(next-byte prediction), so the targets are ``Targets((seq_len,), 256)``.

The test split is held out by FILE, not by window: a seeded choice of whole
files holding about 10% of the bytes (at least one file), so no test text is
also trained on. (A single file gives its last 10% of bytes instead.) Each
split's files are concatenated (in sorted path order) and cut into windows
without overlap (stride ``seq_len``). The bytes are kept as one uint8 array
per split and windows are sliced from it when asked for (`ByteWindows`), so
the standard library costs ~30 MB of memory, not 30 MB x 4 bytes x 2.
Example::

    train, test, shape, targets = open_text("stdlib", seq_len=128, seed=0)
    x, y = train.gather(torch.tensor([0, 5]))    # x (2, 128) float32, y (2, 128) int64
    assert torch.equal(x[:, 1:].long(), y[:, :-1])
"""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

import numpy as np
import torch

from distbelief.data.samples import Samples
from distbelief.errors import UserError
from distbelief.task import Targets

__all__ = ["PREFIX", "DEFAULT_SEQ_LEN", "VOCAB", "ByteWindows", "open_text", "text_files",
           "split_files", "stdlib_dir"]

PREFIX = "text:"
DEFAULT_SEQ_LEN = 128
VOCAB = 256
SUFFIXES = (".py", ".txt", ".md")
HOLDOUT_FRACTION = 0.1


class ByteWindows(Samples):
    """Non-overlapping windows of ``seq_len`` bytes of a uint8 array ``data``: sample ``i``
    is ``data[i*T : i*T + T]`` (float32) with target ``data[i*T + 1 : i*T + T + 1]``
    (int64). ``count`` caps the number of windows (default: all that fit).

    Read-only after construction, so thread-safe.
    """

    def __init__(self, data: np.ndarray, seq_len: int, count: int | None = None):
        self.data, self.seq_len = data, seq_len
        fit = max(0, (len(data) - 1) // seq_len)
        self.count = fit if count is None else min(fit, count)
        self.input_shape = (seq_len,)
        self._offsets = np.arange(seq_len + 1)

    def __len__(self) -> int:
        return self.count

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = positions.numpy().astype(np.int64) * self.seq_len
        if len(starts) and (starts.min() < 0 or int(positions.max()) >= self.count):
            raise IndexError(f"window positions must be in 0..{self.count - 1}")
        rows = self.data[starts[:, None] + self._offsets]  # (n, T + 1) uint8
        return (torch.from_numpy(rows[:, :-1].astype(np.float32)),
                torch.from_numpy(rows[:, 1:].astype(np.int64)))


def stdlib_dir() -> Path:
    """This Python's standard library source directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(path: str) -> list[Path]:
    """The files ``path`` names (a file, a directory's *.py/*.txt/*.md files recursively, a
    glob's files, or ``stdlib``), sorted.

    Raises:
        UserError: nothing at ``path``, or no such files there.
    """
    where = stdlib_dir() if path == "stdlib" else Path(path).expanduser()
    if any(c in path for c in "*?["):
        files = [Path(p) for p in glob.glob(str(where), recursive=True)]
        files = [p for p in files if p.is_file()]
    elif where.is_dir():
        files = [p for p in where.rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    elif where.is_file():
        files = [where]
    else:
        raise UserError(f"--dataset text:{path}: no such file or directory: give a text file, "
                        "a directory of .py/.txt/.md files, a glob, or text:stdlib")
    if path == "stdlib":  # the standard library only, not the packages installed beside it
        files = [p for p in files if not {"site-packages", "dist-packages"} & set(p.parts)]
    if not files:
        raise UserError(f"--dataset text:{path}: no {'/'.join(SUFFIXES)} files found there: "
                        "point it at a directory holding text files, or give a glob")
    return sorted(files)


def split_files(sizes: list[int], seed: int, fraction: float = HOLDOUT_FRACTION) -> list[int]:
    """Indices (ascending) of the files held out for testing: files in a seeded random order
    until they hold ``fraction`` of the bytes; at least one, and never all of them."""
    order = np.random.default_rng(seed).permutation(len(sizes))
    total, held, chosen = sum(sizes), 0, []
    for i in order[:len(sizes) - 1]:
        if chosen and held >= fraction * total:
            break
        chosen.append(int(i))
        held += sizes[i]
    return sorted(chosen)


def _read(files: list[Path]) -> list[bytes]:
    chunks = []
    for path in files:
        try:
            chunks.append(path.read_bytes())
        except OSError:  # unreadable (permissions, a broken link): skip, as a corpus reader
            chunks.append(b"")
    return chunks


def open_text(path: str, *, seq_len: int | None = None, seed: int = 0,
              num_samples: int | None = None) -> tuple[Samples, Samples, tuple[int, ...], Targets]:
    """(train, test, input shape ``(seq_len,)``, ``Targets((seq_len,), 256)``) of the text at
    ``path`` (see the module docstring); ``num_samples`` caps the training windows.

    Raises:
        UserError: a missing path, no readable files, or a split shorter than seq_len + 1 bytes.
    """
    seq_len = DEFAULT_SEQ_LEN if seq_len is None else seq_len
    if seq_len < 1:
        raise UserError(f"--seq-len must be at least 1, got {seq_len}: try 128")
    files = text_files(path)
    chunks = _read(files)
    kept = [(f, c) for f, c in zip(files, chunks) if c]
    if not kept:
        raise UserError(f"--dataset text:{path}: none of its {len(files)} files could be read "
                        "or all are empty: give readable text files")
    if len(kept) == 1:
        data = kept[0][1]
        cut = len(data) - max(seq_len + 1, int(len(data) * HOLDOUT_FRACTION))
        train_bytes, test_bytes = data[:max(cut, 0)], data[max(cut, 0):]
    else:
        held = set(split_files([len(c) for _, c in kept], seed))
        train_bytes = b"".join(c for i, (_, c) in enumerate(kept) if i not in held)
        test_bytes = b"".join(c for i, (_, c) in enumerate(kept) if i in held)
    for split, data in (("training", train_bytes), ("test", test_bytes)):
        if len(data) < seq_len + 1:
            raise UserError(f"--dataset text:{path}: the {split} split has {len(data)} bytes, "
                            f"fewer than --seq-len + 1 = {seq_len + 1}: give more or longer "
                            f"files, or a smaller --seq-len")
    train = ByteWindows(np.frombuffer(train_bytes, dtype=np.uint8), seq_len, num_samples)
    test = ByteWindows(np.frombuffer(test_bytes, dtype=np.uint8), seq_len)
    return train, test, (seq_len,), Targets((seq_len,), VOCAB)
