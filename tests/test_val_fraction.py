"""--val-fraction holds a seeded share of the training split out for validation: the
evaluations during a run read it, the test split is read once at the end, and the held-out
rows are never trained on (the job equals a one-process run on the rest)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import distbelief
from distbelief.data.datasets import evaluate_split, load_dataset, split_validation
from distbelief.data.samples import ArraySamples, SubsetSamples

from _cluster import CLI
from _reference import one_process_parameters

SEED, STEPS, FRACTION = 2, 30, 0.25


def test_the_split_is_seeded_disjoint_and_covers_the_training_split():
    data = load_dataset("digits", seed=SEED)
    split = split_validation(data, FRACTION, SEED)
    n = len(data.train)
    assert len(split.val) == int(n * FRACTION) and len(split.train) + len(split.val) == n
    rows = torch.cat([split.train.rows, split.val.rows])
    assert torch.equal(rows.sort().values, torch.arange(n))  # disjoint, and all of them
    assert torch.equal(split_validation(data, FRACTION, SEED).val.rows, split.val.rows)
    assert not torch.equal(split_validation(data, FRACTION, SEED + 1).val.rows, split.val.rows)
    x, y = split.val.gather(torch.tensor([0, 5]))
    assert torch.equal(x, data.x_train[split.val.rows[[0, 5]]])
    assert torch.equal(y, data.y_train[split.val.rows[[0, 5]]])
    assert split.test is data.test and split.watched == ("val", split.val)
    assert split_validation(data, 0.0, SEED) is data and data.watched == ("test", data.test)


def test_a_subset_streams_and_evaluates_its_rows_of_any_split():
    x = torch.randn(40, 3).numpy()
    y = torch.arange(40).remainder(4).numpy()
    base = ArraySamples(x, y)  # read a batch at a time, as a memory-mapped .npy directory
    subset = SubsetSamples(base, torch.tensor([3, 1, 30, 7, 12]))
    batches = list(subset.in_order(2))
    assert [len(b[1]) for b in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.tensor([3, 1, 2, 3, 0]))
    model = torch.nn.Linear(3, 4)
    direct = evaluate_split(model, ArraySamples(x[[3, 1, 30, 7, 12]], y[[3, 1, 30, 7, 12]]))
    assert evaluate_split(model, subset) == pytest.approx(direct)


@pytest.mark.parametrize("data_servers", [0, 1], ids=["inline", "served"])
def test_a_job_trains_on_the_rest_and_watches_the_validation_split(tmp_path, data_servers):
    """One Downpour replica is plain SGD: its parameters equal one process's on the rows not
    held out (and differ from one trained on every row), whether it reads its batches
    itself or from a data server."""
    summary = distbelief.train(dataset="digits", model="mlp", replicas=1, shards=1, rule="sgd",
                               lr=0.1, batch_size=32, steps=STEPS, seed=SEED, eval_every=10,
                               val_fraction=FRACTION, data_servers=data_servers,
                               run_dir=str(tmp_path / "run"))
    trained = list(distbelief.load_model(summary["run_dir"]).parameters())
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    for got, want in zip(trained, one_process_parameters(sgd, STEPS, 32, SEED,
                                                         val_fraction=FRACTION)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    everything = one_process_parameters(sgd, STEPS, 32, SEED)  # the oracle is sharp
    assert any((g - w).abs().max() > 1e-4 for g, w in zip(trained, everything))

    events = [json.loads(line) for line in
              (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    during, final = evals[:-1], evals[-1]
    assert during and all(e["step"] >= 10 for e in during)  # when the watch saw step 10, 20..
    assert all("val_accuracy" in e and "test_accuracy" not in e for e in during)
    assert final["final"] and {"val_accuracy", "test_accuracy"} <= set(final)
    split = split_validation(load_dataset("digits", seed=SEED), FRACTION, SEED)
    model = distbelief.load_model(summary["run_dir"])
    assert summary["val_samples"] == len(split.val) and summary["test_samples"] == len(split.test)
    assert summary["val_accuracy"] == pytest.approx(
        evaluate_split(model, split.val)["accuracy"], abs=1e-6)
    assert summary["test_accuracy"] == pytest.approx(
        evaluate_split(model, split.test)["accuracy"], abs=1e-6)


def test_the_command_line_reports_both_and_refuses_a_whole_split(tmp_path):
    args = [*CLI, "train", "--dataset", "digits", "--model", "mlp", "--replicas", "1",
            "--shards", "1", "--steps", "20", "--quiet"]
    done = subprocess.run([*args, "--val-fraction", "0.2", "--run-dir", str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert " held-out samples (validation " in done.stdout
    bad = subprocess.run([*args, "--val-fraction", "1", "--run-dir", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--val-fraction must be in [0, 1), got 1.0" in bad.stderr
    assert not (tmp_path / "b").exists()
