"""Jobs of every task through the public command and API: regression of sklearn's diabetes
data by Downpour and sync, a sequence model by sync and Downpour, a user's own loss and
metrics; the summary, the curves and `distbelief predict` report the task's metrics."""

from __future__ import annotations

import json
import math
import subprocess
import textwrap

import numpy as np
import pytest
import torch

import distbelief
from _cluster import CLI

TIMEOUT = 120


@pytest.fixture(scope="module")
def diabetes(tmp_path_factory):
    """sklearn's diabetes data with standardised float targets: predicting their mean gives
    an RMSE of about 1, a linear model about 0.7."""
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    path = tmp_path_factory.mktemp("diabetes") / "diabetes.npz"
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.float32))
    return path


@pytest.mark.parametrize("algorithm", ["downpour", "sync"])
def test_regression_trains_through_the_command_and_predict_reports_its_rmse(
        tmp_path, diabetes, algorithm):
    run = tmp_path / "run"
    args = ["train", "--algorithm", algorithm, "--dataset", str(diabetes), "--task", "regress",
            "--model", "linear", "--replicas", "2", "--epochs", "30", "--batch-size", "16",
            "--rule", "adam", "--lr", "0.02", "--run-dir", str(run), "--quiet"]
    if algorithm == "downpour":
        args += ["--shards", "1"]
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"]["name"] == "regress" and summary["task"]["headline"] == "rmse"
    assert "test_accuracy" not in summary
    assert summary["model"]["target_shape"] == [] and summary["model"]["num_classes"] == 1
    # scalar targets: the mean per-sample squared error is the squared RMSE
    assert summary["test_rmse"] == pytest.approx(math.sqrt(summary["test_loss"]), rel=1e-5)
    assert summary["test_rmse"] < 0.85  # predicting the mean gives about 1.0
    assert f"test rmse {summary['test_rmse']:.4f}" in done.stdout
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "eval" and "test_rmse" in e for e in evals)

    # the held-out split as predict's input: the same RMSE, predictions in the targets' shape
    with np.load(diabetes) as arrays:
        x, y = arrays["x"], arrays["y"]
    from distbelief.data.sampling import holdout_split

    _, test = holdout_split(len(x), 0)
    np.savez(tmp_path / "held.npz", x=x[test], y=y[test])
    predicted = subprocess.run([*CLI, "predict", str(run), "--input", str(tmp_path / "held.npz"),
                                "-o", str(tmp_path / "out.npz")],
                               capture_output=True, text=True, timeout=TIMEOUT)
    assert predicted.returncode == 0, predicted.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert out["predictions"].shape == (len(test),) and out["predictions"].dtype == np.float32
        assert float(out["rmse"]) == pytest.approx(summary["test_rmse"], rel=1e-5)
        assert "logits" not in out.files
    assert "rmse" in predicted.stdout


SEQUENCE_CODE = '''
import numpy as np
import torch
from torch import nn

V, T = 8, 6

def copy_data():
    """Token sequences whose target at each position is the token before it (the first
    position's target is 0): a model must look one position back."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, size=(600, T))
    y = np.concatenate([np.zeros((600, 1), dtype=x.dtype), x[:, :-1]], axis=1)
    return {"x": x.astype(np.float32), "y": y}

class LookBack(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.mix = nn.Conv1d(16, 16, kernel_size=2, padding=1)
        self.out = nn.Linear(16, V)

    def forward(self, x):
        h = self.embed(x.long()).transpose(1, 2)          # (B, 16, T)
        h = torch.relu(self.mix(h))[:, :, : x.shape[1]]   # causal: positions t-1 and t
        return self.out(h.transpose(1, 2))                # (B, T, V)

def model():
    return LookBack()
'''


@pytest.mark.parametrize("algorithm", ["sync", "downpour"])
def test_a_sequence_model_learns_and_reports_perplexity(tmp_path, algorithm):
    (tmp_path / "seq.py").write_text(SEQUENCE_CODE)
    spec = str(tmp_path / "seq.py")
    summary = distbelief.train(
        algorithm=algorithm, task="sequence", dataset=f"{spec}:copy_data",
        model=f"{spec}:model", replicas=2, shards=1, epochs=8, batch_size=32, rule="adam",
        lr=0.01, run_dir=str(tmp_path / "run"), show_progress=False)
    assert summary["task"]["headline"] == "perplexity"
    assert summary["model"]["target_shape"] == [6] and summary["model"]["target_classes"] == 8
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]), rel=1e-5)
    assert summary["test_perplexity"] < 2.0  # uniform guessing: 8
    assert summary["test_token_accuracy"] > 0.8


LOSS_CODE = '''
import torch
import torch.nn.functional as F

def smoothed(output, target):
    return F.cross_entropy(output, target, label_smoothing=0.1)

def confident(output, target):
    return {"confidence": output.softmax(dim=1).max(dim=1).values.mean()}
'''


def test_a_users_loss_and_metrics_train_and_are_reported(tmp_path):
    (tmp_path / "mine.py").write_text(LOSS_CODE)
    spec = str(tmp_path / "mine.py")
    summary = distbelief.train(
        algorithm="sync", dataset="digits", model="mlp", loss=f"{spec}:smoothed",
        metrics=f"{spec}:confident", replicas=2, epochs=3, batch_size=32, rule="adam", lr=0.003,
        run_dir=str(tmp_path / "run"), show_progress=False)
    assert summary["task"] == {"name": "classify", "loss": f"{spec}:smoothed",
                               "headline": "accuracy", "metrics": f"{spec}:confident"}
    assert summary["test_accuracy"] > 0.85
    assert 0.3 < summary["test_confidence"] < 1.0
    # the reported test loss is the user's loss over the test split
    model = distbelief.load_model(tmp_path / "run")
    from distbelief.data.datasets import load_dataset

    data = load_dataset("digits", seed=0)
    model.eval()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(data.x_test), data.y_test,
                                                     label_smoothing=0.1)
    assert summary["test_loss"] == pytest.approx(float(expected), rel=1e-5)
