"""Fine-tuning, ``--init-from RUN_DIR|model.pt``: a new job starts from trained weights.

A job that starts from a trained run and takes one step at a negligible learning
rate must end where that run ended (1e-6): the shards, and through them every
replica, started from the loaded weights rather than the seeded ones. A model of
another shape, a missing file and ``--resume`` together are refused in one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distbelief
from distbelief.errors import UserError
from distbelief.model.initial import first_mismatch, load_initial
from distbelief.model.zoo import build_model

SMALL = dict(dataset="digits", model="mlp", replicas=2, shards=1, batch_size=32, seed=3,
             log_every=50)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Run directories of 2 epochs of the digits mlp, by Downpour and by sync."""
    runs = {}
    for algorithm in ("downpour", "sync"):
        run_dir = tmp_path_factory.mktemp(algorithm) / "run"
        distbelief.train(algorithm=algorithm, epochs=2, run_dir=str(run_dir), **SMALL)
        runs[algorithm] = run_dir
    return runs


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


@pytest.mark.parametrize("algorithm", ["downpour", "sync"])
def test_a_job_starts_from_the_given_run(trained, tmp_path, algorithm):
    source = trained[algorithm]
    given = source if algorithm == "downpour" else source / "model.pt"  # a directory or a file
    summary = distbelief.train(algorithm=algorithm, init_from=str(given), steps=1, lr=1e-9,
                               run_dir=str(tmp_path / "tuned"), **SMALL)
    before, after = _weights(source), _weights(Path(summary["run_dir"]))
    seeded = build_model("mlp", (64,), 10).state_dict()  # what a job without it starts from
    assert before.keys() == after.keys()
    for name in before:
        assert torch.allclose(after[name], before[name], atol=1e-6, rtol=0), name
        assert not torch.allclose(seeded[name], before[name], atol=1e-3), name  # it trained


@pytest.mark.parametrize("algorithm", ["hogwild", "easgd", "admm", "sandblaster"])
def test_every_other_algorithm_starts_from_it(trained, tmp_path, algorithm):
    """Shared parameters (Hogwild), elastic and consensus replicas, L-BFGS: a Downpour run's
    weights, one step (ADMM: one round) at lr 1e-9, the same weights."""
    options = dict(SMALL)
    if algorithm == "hogwild":  # its workers share one tensor: no replicas, no shards
        options.pop("replicas"), options.pop("shards")
    if algorithm == "sandblaster":  # full-batch L-BFGS, reporting every iteration
        options.pop("batch_size"), options.pop("log_every")
    summary = distbelief.train(algorithm=algorithm, init_from=str(trained["downpour"]), steps=1,
                               lr=1e-9, run_dir=str(tmp_path / "tuned"), **options)
    before, after = _weights(trained["downpour"]), _weights(Path(summary["run_dir"]))
    for name in before:
        assert torch.allclose(after[name], before[name], atol=1e-6, rtol=0), name


def test_another_model_is_refused_naming_the_parameter(trained, tmp_path):
    with pytest.raises(UserError) as err:
        distbelief.train(algorithm="downpour", init_from=str(trained["downpour"]), steps=1,
                         run_dir=str(tmp_path / "x"), **{**SMALL, "model": "linear"})
    text = str(err.value)
    assert "\n" not in text and "--init-from" in text and "--model linear" in text
    assert "'" in text and ("missing" in text or "there but" in text or "has not" in text)
    assert not (tmp_path / "x").exists()


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(UserError) as err:
        distbelief.train(algorithm="downpour", init_from=str(tmp_path / "nope.pt"), steps=1,
                         run_dir=str(tmp_path / "x"), **SMALL)
    assert "\n" not in str(err.value) and "nope.pt" in str(err.value)
    with pytest.raises(UserError, match="holds no model.pt"):
        distbelief.train(algorithm="downpour", init_from=str(tmp_path), steps=1, **SMALL)


def test_resume_and_init_from_together_are_refused(trained):
    with pytest.raises(UserError) as err:
        distbelief.train(resume=str(trained["sync"]), init_from=str(trained["downpour"]))
    assert "\n" not in str(err.value) and "--init-from" in str(err.value)


def test_mismatches_name_the_first_differing_parameter(tmp_path):
    """Missing, unexpected and reshaped entries, each named with its shapes."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    state = model.state_dict()
    assert first_mismatch(model, state) is None
    wider = {**state, "0.weight": torch.zeros(5, 4)}
    assert first_mismatch(model, wider) == "'0.weight' is (5, 4) there but (3, 4) in this model"
    assert "'1.running_mean' (3,) is missing" in first_mismatch(
        model, {k: v for k, v in state.items() if k != "1.running_mean"})
    assert "it holds 'extra' (2,)" in first_mismatch(model, {**state, "extra": torch.zeros(2)})
    # buffers load too (BatchNorm's running statistics)
    saved = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(saved, tmp_path / "model.pt")
    load_initial(model, tmp_path)
    assert torch.equal(model[1].running_mean, saved["1.running_mean"])
    torch.save({"a": 1}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="holds no state dict"):
        load_initial(model, tmp_path / "bad.pt")


def test_replicas_start_from_the_given_runs_buffers(tmp_path):
    """A BatchNorm model's running statistics come with it: after one step each replica's
    are 0.9 of the loaded ones plus 0.1 of one batch's (momentum 0.1), nowhere near the
    fresh model's zeros and ones."""
    model = f"{Path(__file__).resolve().parent / '_models.py'}:mlp_bn"
    source = tmp_path / "source"
    distbelief.train(algorithm="downpour", epochs=2, run_dir=str(source),
                     **{**SMALL, "model": model})
    again = tmp_path / "again"
    distbelief.train(algorithm="downpour", steps=1, lr=1e-9, init_from=str(source),
                     run_dir=str(again), **{**SMALL, "model": model})
    before, after = _weights(source), _weights(again)
    for name in ("2.running_mean", "5.running_var"):
        fresh = torch.zeros_like(before[name]) if "mean" in name else torch.ones_like(before[name])
        moved = (after[name] - before[name]).norm()
        assert moved < 0.3 * (fresh - before[name]).norm(), name
    assert after["2.num_batches_tracked"] == before["2.num_batches_tracked"] + 1
