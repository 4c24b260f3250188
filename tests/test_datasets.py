"""Tests for distbelief.data.datasets: built-in data, user .npz files, partitions, batches."""

import numpy as np
import pytest
import torch

from distbelief.data.datasets import BatchStream, Dataset, load_dataset, replica_indices
from distbelief.errors import UserError


def test_digits_shapes_and_range():
    ds = load_dataset("digits", seed=0)
    assert isinstance(ds, Dataset)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == int(1797 * 0.2)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0


def test_digits_split_is_deterministic_per_seed():
    a, b, c = load_dataset("digits", seed=0), load_dataset("digits", seed=0), load_dataset("digits", seed=1)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_test, c.x_test)


def test_digits_num_samples_caps_training_set():
    ds = load_dataset("digits", num_samples=100)
    assert len(ds.x_train) == 100 and len(ds.x_test) == int(1797 * 0.2)


def test_synthetic():
    ds = load_dataset("synthetic", seed=3, num_samples=500)
    assert ds.input_shape == (32,) and ds.num_classes == 10
    assert len(ds.x_train) == 400 and len(ds.x_test) == 100
    assert torch.equal(ds.y_train, load_dataset("synthetic", seed=3, num_samples=500).y_train)


def test_npz_round_trip_with_split(tmp_path):
    x = np.random.rand(50, 3, 4).astype(np.float64)
    y = np.arange(50) % 5
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset(str(tmp_path / "d.npz"), seed=0)
    assert ds.input_shape == (3, 4) and ds.num_classes == 5
    assert len(ds.x_train) == 40 and len(ds.x_test) == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # every sample lands in exactly one of train and test, unchanged
    both = torch.cat([ds.x_train, ds.x_test]).reshape(50, -1).double()
    original = torch.from_numpy(x).reshape(50, -1).float().double()
    assert torch.equal(both[both[:, 0].argsort()], original[original[:, 0].argsort()])


def test_npz_with_explicit_test_set(tmp_path):
    np.savez(
        tmp_path / "d.npz",
        x=np.zeros((6, 2)), y=np.array([0, 1, 0, 1, 0, 1]),
        x_test=np.ones((3, 2)), y_test=np.array([2.0, 0.0, 1.0]),
    )
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert len(ds.x_train) == 6 and len(ds.x_test) == 3
    assert ds.num_classes == 3  # max label over train and test


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"inputs": np.zeros((4, 2)), "y": np.zeros(4)}, "found keys"),
        ({"x": np.zeros((4, 2))}, "'y'"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(3)}, "len(x) = 4 but len(y) = 3"),
        ({"x": np.zeros((4, 2)), "y": np.array([0.5, 1, 0, 1])}, "non-integer"),
        ({"x": np.zeros((1, 2)), "y": np.zeros(1, dtype=int)}, "at least 2"),
        ({"x": np.array([[0.0, np.nan]] * 4), "y": np.zeros(4, dtype=int)}, "non-finite"),
        ({"x": np.zeros((4, 2)), "y": np.array([0, -1, 0, 1])}, "'y' has value -1"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4), "x_test": np.zeros((2, 2))}, "x_test"),
    ],
)
def test_malformed_npz_raises_user_error(tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError) as info:
        load_dataset(str(tmp_path / "bad.npz"))
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_npz_missing_and_corrupt_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(UserError, match="not an .npz archive") as info:
        load_dataset(str(tmp_path / "junk.npz"))
    assert "pickle" not in str(info.value)  # never advise loading untrusted data unsafely
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(UserError, match="not an .npz archive"):
        load_dataset(str(tmp_path / "single.npz"))


def test_factory_spec(tmp_path):
    path = tmp_path / "data_factory.py"
    path.write_text(
        "import torch\n"
        "def make():\n"
        "    return {'x': torch.randn(20, 4), 'y': torch.arange(20) % 2}\n"
        "def wrong():\n"
        "    return [1, 2]\n"
    )
    ds = load_dataset(f"{path}:make")
    assert ds.input_shape == (4,) and ds.num_classes == 2 and len(ds.x_train) == 16
    with pytest.raises(UserError, match="return a dict"):
        load_dataset(f"{path}:wrong")


def test_unknown_spec_lists_choices():
    with pytest.raises(UserError, match="digits, mnist1d, synthetic"):
        load_dataset("imagenet")


def test_mnist1d_small_and_cached(tmp_path):
    ds = load_dataset("mnist1d", seed=0, num_samples=2000, cache_dir=tmp_path)
    assert ds.input_shape == (1, 40) and ds.num_classes == 10
    assert len(ds.x_train) == 1600 and len(ds.x_test) == 400
    cached = list(tmp_path.glob("*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp"))
    stamp = cached[0].stat().st_mtime_ns
    again = load_dataset("mnist1d", seed=0, num_samples=2000, cache_dir=tmp_path)
    assert cached[0].stat().st_mtime_ns == stamp  # read, not regenerated
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)


def test_mnist1d_leaves_global_rng_alone(tmp_path):
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    load_dataset("mnist1d", seed=0, num_samples=100, cache_dir=tmp_path)
    assert np.random.rand() == expected


@pytest.mark.parametrize("n, replicas", [(10, 3), (7, 7), (100, 4), (5, 1)])
def test_replica_indices_disjoint_and_covering(n, replicas):
    parts = [replica_indices(n, r, replicas, seed=0) for r in range(replicas)]
    joined = torch.cat(parts)
    assert sorted(joined.tolist()) == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert torch.equal(parts[0], replica_indices(n, 0, replicas, seed=0))


def test_replica_indices_bad_arguments():
    with pytest.raises(UserError, match="3 samples among 4 replicas"):
        replica_indices(3, 0, 4, seed=0)
    with pytest.raises(UserError, match="replica 2 is out of range"):
        replica_indices(10, 2, 2, seed=0)


def test_batch_stream_deterministic_and_reshuffles():
    x = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(10)
    indices = torch.tensor([0, 2, 3, 5, 7, 8, 9])
    a = BatchStream(x, y, indices, batch_size=3, seed=5)
    b = BatchStream(x, y, indices, batch_size=3, seed=5)
    assert a.steps_per_epoch == 2 and a.epoch == 0
    batches_a = [a.next()[1].tolist() for _ in range(8)]
    batches_b = [b.next()[1].tolist() for _ in range(8)]
    assert batches_a == batches_b
    assert all(len(batch) == 3 for batch in batches_a)  # partial batch dropped
    assert a.epoch == 3
    for epoch in range(4):
        seen = batches_a[2 * epoch] + batches_a[2 * epoch + 1]
        assert len(set(seen)) == 6 and set(seen) <= set(indices.tolist())
    orders = {tuple(batches_a[2 * e] + batches_a[2 * e + 1]) for e in range(4)}
    assert len(orders) > 1  # a fresh order each epoch
    other = BatchStream(x, y, indices, batch_size=3, seed=6)
    assert [other.next()[1].tolist() for _ in range(8)] != batches_a


def test_batch_stream_small_partition_uses_it_whole():
    x, y = torch.randn(10, 2), torch.arange(10)
    stream = BatchStream(x, y, torch.tensor([4, 1, 7]), batch_size=8, seed=0)
    assert stream.steps_per_epoch == 1
    xb, yb = stream.next()
    assert sorted(yb.tolist()) == [1, 4, 7] and torch.equal(xb, x[yb])
    stream.next()
    assert stream.epoch == 1


def test_speech_shape_classes_and_determinism():
    import time

    start = time.perf_counter()
    ds = load_dataset("speech", seed=2)
    elapsed = time.perf_counter() - start
    assert ds.input_shape == (440,) and ds.num_classes == 8192
    assert len(ds.x_train) + len(ds.x_test) == 4096
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert 0 <= int(ds.y_train.min()) and int(ds.y_train.max()) < 8192
    assert len(torch.unique(ds.y_train)) > 1000  # not collapsed onto a few classes
    again = load_dataset("speech", seed=2)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    assert not torch.equal(ds.y_train, load_dataset("speech", seed=3).y_train)
    assert elapsed < 5.0  # cheap enough to regenerate in every process (about 0.3 s)


def test_speech_small_keeps_8192_classes():
    ds = load_dataset("speech", seed=0, num_samples=10)
    assert ds.num_classes == 8192 and len(ds.x_train) == 8 and ds.x_train.shape[1:] == (440,)


def test_digits_come_from_the_cache_without_scikit_learn(tmp_path):
    """The first load writes digits.npz; a later one, in a fresh process, reads it and
    gives the same split without importing scikit-learn (~1.7 s of CPU per process)."""
    import subprocess
    import sys

    first = load_dataset("digits", seed=3, cache_dir=tmp_path)
    assert (tmp_path / "digits.npz").is_file()
    script = ("import sys, torch; from pathlib import Path; "
              "from distbelief.data.datasets import load_dataset; "
              f"d = load_dataset('digits', seed=3, cache_dir=Path({str(tmp_path)!r})); "
              "torch.save([d.train.x, d.train.y, d.test.x, d.test.y], sys.argv[1]); "
              "print('sklearn' in sys.modules)")
    out = tmp_path / "split.pt"
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
    again = torch.load(out)
    for a, b in zip([first.train.x, first.train.y, first.test.x, first.test.y], again):
        assert torch.equal(a, b)
