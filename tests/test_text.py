"""The text:PATH dataset (distbelief.data.text): byte windows and next-byte targets exactly,
a test split of whole held-out files, refusals in one line, and the stdlib shortcut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distbelief.data.datasets import load_dataset
from distbelief.data.text import ByteWindows, split_files, stdlib_dir, text_files
from distbelief.errors import UserError
from distbelief.task import Targets, make_task

SEQ = make_task("sequence")


def write_corpus(root, sizes=(300, 200, 150, 100, 50, 40)):
    """Files f0.py .. whose bytes are all one letter each (file i: chr(ord('a') + i)), so a
    window's bytes say which file they came from; plus a file that is not text."""
    root.mkdir(exist_ok=True)
    for i, size in enumerate(sizes):
        sub = root / "pkg" if i % 2 else root
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.{('py', 'txt', 'md')[i % 3]}").write_bytes(bytes([97 + i]) * size)
    (root / "image.png").write_bytes(b"\x89PNG" * 100)
    return root


def test_windows_are_stride_t_slices_and_targets_the_next_byte():
    data = np.arange(23, dtype=np.uint8)
    windows = ByteWindows(data, seq_len=5)
    assert len(windows) == 4  # (23 - 1) // 5
    x, y = windows.gather(torch.tensor([3, 0]))
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.tolist() == [list(range(15, 20)), list(range(0, 5))]
    assert y.tolist() == [list(range(16, 21)), list(range(1, 6))]
    assert len(ByteWindows(data, seq_len=5, count=2)) == 2
    with pytest.raises(IndexError):
        windows.gather(torch.tensor([4]))


def test_a_directory_gives_whole_held_out_files_as_the_test_split(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    assert [p.name for p in text_files(str(root))] == ["f0.py", "f2.md", "f4.txt", "f1.txt",
                                                       "f3.py", "f5.md"]
    ds = load_dataset(f"text:{root}", task=SEQ, seq_len=8, seed=3)
    assert ds.input_shape == (8,) and ds.targets == Targets((8,), 256)
    train_letters = set(ds.train.data.tobytes().decode())
    test_letters = set(ds.test.data.tobytes().decode())
    assert train_letters and test_letters and not train_letters & test_letters
    assert train_letters | test_letters == set("abcdef")
    assert len(ds.test.data) >= 0.1 * 840 and len(ds.test.data) < 840
    x, y = ds.train.tensors()
    assert x.shape == (len(ds.train), 8) and y.shape == (len(ds.train), 8)
    assert torch.equal(x[:, 1:].long(), y[:, :-1])
    assert len(ds.train) == (len(ds.train.data) - 1) // 8
    # the same seed holds out the same files; num_samples caps the training windows
    again = load_dataset(f"text:{root}", task=SEQ, seq_len=8, seed=3, num_samples=5)
    assert again.test.data.tobytes() == ds.test.data.tobytes() and len(again.train) == 5


def test_held_out_files_are_about_a_tenth_at_least_one_never_all():
    assert split_files([10, 10], seed=0) in ([0], [1])
    for seed in range(5):
        chosen = split_files([100] * 30, seed=seed)
        assert len(chosen) == 3 and chosen == sorted(chosen)
    assert len(split_files([1000, 1, 1], seed=1)) in (1, 2)


def test_a_glob_and_a_single_file(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    assert [p.name for p in text_files(str(root / "**" / "*.py"))] == ["f0.py", "f3.py"]
    one = load_dataset(f"text:{root / 'f0.py'}", task=SEQ, seq_len=4)
    assert len(one.train.data) + len(one.test.data) == 300 and len(one.test.data) >= 5


@pytest.mark.parametrize("make, spec, fragment", [
    (lambda root: None, "text:{root}/missing", "no such file or directory"),
    (lambda root: (root / "a.png").write_bytes(b"x"), "text:{root}", "no .py/.txt/.md files"),
    (lambda root: (root / "a.txt").write_bytes(b""), "text:{root}", "could be read"),
    (lambda root: [(root / f"{n}.txt").write_bytes(b"abc") for n in "ab"], "text:{root}",
     r"fewer than --seq-len \+ 1 = 9"),
])
def test_refusals_are_one_line(tmp_path, make, spec, fragment):
    root = tmp_path / "r"
    root.mkdir()
    make(root)
    with pytest.raises(UserError, match=fragment) as err:
        load_dataset(spec.format(root=root), task=SEQ, seq_len=8)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("task", ["classify", "regress"])
def test_other_tasks_are_refused(tmp_path, task):
    root = write_corpus(tmp_path / "corpus")
    with pytest.raises(UserError, match="use --task sequence"):
        load_dataset(f"text:{root}", task=make_task(task), seq_len=8)


def test_the_stdlib_shortcut_finds_the_standard_library():
    files = text_files("stdlib")
    assert {"os.py", "decoder.py"} <= {p.name for p in files}
    assert all("site-packages" not in p.parts for p in files)
    assert all(p.is_relative_to(stdlib_dir()) for p in files[:50])
    ds = load_dataset(f"text:{stdlib_dir() / 'json'}", task=SEQ, seq_len=32)
    assert len(ds.train) > 100 and len(ds.test) > 10
