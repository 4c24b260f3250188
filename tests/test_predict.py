"""`distbelief predict`: a trained model run whole or partitioned across processes.

Oracle: the logits written by K = 2 (layers, pipelined) and K = 3 (units)
partition processes equal the whole model's within 1e-5, and the accuracy on
the run's test split equals the one the run reported.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import distbelief
from distbelief.data.datasets import load_dataset

from test_cli_errors import assert_user_error, run_cli, run_main  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("predict")
    summary = distbelief.train(dataset="digits", model="mlp", replicas=1, shards=3, steps=40,
                               run_dir=str(base / "run"), show_progress=False)
    data = load_dataset("digits", seed=0)
    np.savez(base / "test.npz", x=data.x_test.numpy(), y=data.y_test.numpy())
    np.savez(base / "unlabelled.npz", x=data.x_test[:7].numpy())
    model = distbelief.load_model(base / "run")
    with torch.no_grad():
        logits = model(data.x_test)
    return base, summary, logits


@pytest.mark.parametrize("options", [
    [], ["--partitions", "2"], ["--partitions", "2", "--micro-batches", "3", "--batch-size", "50"],
    ["--partitions", "3", "--split", "units"], ["--partitions", "2", "--balance", "4,2"],
], ids=["whole", "layers-2", "layers-2-micro", "units-3", "layers-balance"])
def test_partitioned_prediction_equals_the_whole_model(run, options):
    base, summary, logits = run
    out = base / f"out{'-'.join(options)}.npz"
    result = run_cli(base, "predict", base / "run", "--input", base / "test.npz", "-o", out,
                     *options)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout
    with np.load(out) as written:
        torch.testing.assert_close(torch.from_numpy(written["logits"]), logits, atol=1e-5,
                                   rtol=1e-5)
        assert (written["predictions"] == logits.argmax(1).numpy()).all()
        assert float(written["accuracy"]) == pytest.approx(summary["test_accuracy"])


def test_unlabelled_input_gives_predictions_only(run):
    base, _, logits = run
    summary = distbelief.predict(base / "run", base / "unlabelled.npz",
                                         base / "unlabelled-out.npz", partitions=2)
    assert summary["accuracy"] is None and summary["samples"] == 7
    assert summary["boundary_bytes"] > 0
    with np.load(base / "unlabelled-out.npz") as written:
        assert "accuracy" not in written.files
        assert (written["predictions"] == logits[:7].argmax(1).numpy()).all()


def test_prediction_user_errors(run, tmp_path, run_main):
    """Each case through the command's `main` in this process, the first one also as a
    subprocess of ``python -m distbelief.cli``."""
    base, _, _ = run
    np.savez(tmp_path / "wide.npz", x=np.zeros((4, 1, 9, 9), dtype=np.float32))
    np.savez(tmp_path / "noy.npz", z=np.zeros((4, 1, 8, 8), dtype=np.float32))
    np.savez(tmp_path / "short.npz", x=np.zeros((4, 1, 8, 8), dtype=np.float32), y=np.zeros(3))
    cases = [
        (["predict", tmp_path / "nope", "--input", base / "test.npz", "-o", "o.npz"],
         ["nope", "summary.json"]),
        (["predict", base / "run", "--input", tmp_path / "missing.npz", "-o", "o.npz"],
         ["missing.npz", "does not exist"]),
        (["predict", base / "run", "--input", tmp_path / "wide.npz", "-o", "o.npz"],
         ["(4, 1, 9, 9)", "(1, 8, 8)"]),
        (["predict", base / "run", "--input", tmp_path / "noy.npz", "-o", "o.npz"],
         ["no array 'x'"]),
        (["predict", base / "run", "--input", tmp_path / "short.npz", "-o", "o.npz"],
         ["3 labels for 4 samples"]),
        (["predict", base / "run", "--input", base / "test.npz", "-o", "o.npz",
          "--partitions", "2", "--balance", "5,5"], ["--balance 5,5", "6 layers"]),
        (["predict", base / "run", "--input", base / "test.npz", "-o", "o.npz",
          "--partitions", "9"], ["--partitions 9"]),
    ]
    assert_user_error(run_cli(tmp_path, *cases[0][0]), *cases[0][1])
    for args, mentions in cases:
        assert_user_error(run_main(tmp_path, *args), *mentions)
    assert not (tmp_path / "o.npz").exists()
