"""Hogwild! (`--algorithm hogwild`): the lock-free rules, the W = 1 oracle, W = 2 training,
a dying worker, and the options hogwild refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distbelief
from distbelief.algorithms.hogwild.worker import shared_views
from distbelief.cli import main as cli_main
from distbelief.config import OptimizerConfig
from distbelief.job import JobConfig, apply_options
from distbelief.errors import JobFailed, UserError
from distbelief.metrics.log import read_metrics
from distbelief.ps.rules import STATE_SLOTS, InPlaceRule
from distbelief.runtime.shm import SHM_DIR

from _reference import one_process_parameters

STEPS, BATCH, SEED, LR = 30, 32, 4, 0.1

TORCH_RULES = {
    "sgd": lambda p, wd: torch.optim.SGD(p, lr=0.1, weight_decay=wd),
    "momentum": lambda p, wd: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=wd),
    "adagrad": lambda p, wd: torch.optim.Adagrad(p, lr=0.1, weight_decay=wd),
}


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("rule", sorted(TORCH_RULES))
def test_lock_free_rules_follow_torch_optim(rule, weight_decay):
    numel = 50
    shared = torch.zeros(numel * (1 + STATE_SLOTS[rule]))
    params, state = shared_views(shared, numel, STATE_SLOTS[rule])
    params.copy_(torch.randn(numel))
    reference = torch.nn.Parameter(params.clone())
    optimizer = TORCH_RULES[rule]([reference], weight_decay)
    mine = InPlaceRule(OptimizerConfig(rule=rule, lr=0.1, weight_decay=weight_decay),
                       params, state)
    for _ in range(5):
        grad = torch.randn(numel)
        kept = grad.clone()
        mine.apply(grad)
        reference.grad = grad.clone()
        optimizer.step()
        assert torch.equal(grad, kept)  # the worker's private gradient is left alone
    torch.testing.assert_close(params, reference.detach(), atol=1e-6, rtol=0)
    assert shared.data_ptr() == params.data_ptr()  # updated in place, in the shared tensor


def reference_sgd(steps: int) -> list[torch.Tensor]:
    """One process, torch.optim.SGD, on the batches of the single worker's stream."""
    return one_process_parameters(lambda params: torch.optim.SGD(params, lr=LR), steps, BATCH,
                                  SEED)


def test_one_worker_is_exactly_single_process_sgd(tmp_path):
    summary = distbelief.train(algorithm="hogwild", workers=1, dataset="digits", model="mlp",
                               lr=LR, batch_size=BATCH, steps=STEPS, seed=SEED, log_every=10,
                               run_dir=str(tmp_path / "run"))
    assert summary["algorithm"] == "hogwild" and summary["workers"] == 1
    assert summary["config"]["rule"] == "sgd"  # hogwild's default rule: plain SGD
    assert summary["updates_applied"] == STEPS and summary["exit_codes"] == {"replica0": 0}
    trained = list(distbelief.load_model(summary["run_dir"]).parameters())
    for got, want in zip(trained, reference_sgd(STEPS)):
        assert torch.equal(got, want)
    # the oracle is sharp: one step less is a different model
    assert any(not torch.equal(got, want) for got, want in zip(trained, reference_sgd(STEPS - 1)))


def test_two_workers_train_mnist1d_and_both_report(tmp_path):
    steps = 250
    summary = distbelief.train(algorithm="hogwild", workers=2, dataset="mnist1d", model="mlp",
                               lr=0.1, batch_size=64, steps=steps, eval_every=100,
                               log_every=50, run_dir=str(tmp_path / "run"))
    assert summary["test_accuracy"] > 0.35  # chance is 0.10
    assert summary["worker_updates"] == [steps, steps]
    assert summary["updates_applied"] == 2 * steps and summary["total_steps"] == 2 * steps
    assert summary["exit_codes"] == {"replica0": 0, "replica1": 0}
    assert summary["threads_per_worker"] >= 1 and summary["train_samples_per_second"] > 0
    events = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    train = [e for e in events if e["event"] == "train"]
    assert {(e["replica"], e["step"]) for e in train} == {
        (w, s) for w in (0, 1) for s in range(50, steps + 1, 50)}
    assert sum(e["samples"] for e in train) == 2 * steps * 64
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) >= 2 and evals[-1]["final"]
    assert evals[-1]["test_accuracy"] == summary["test_accuracy"]
    roles = json.loads((Path(summary["run_dir"]) / "cluster.json").read_text())["roles"]
    assert [r["kind"] for r in roles] == ["coordinator", "worker", "worker"]
    assert not list(SHM_DIR.glob("distbelief-*-hogwild"))  # the shared tensor is gone


DYING_MODEL = """
import os
import torch

class DieInWorker1(torch.nn.Module):
    calls = 0

    def forward(self, x):
        if os.environ.get("DISTBELIEF_ROLE") == "replica" and os.environ.get("DISTBELIEF_ID") == "1":
            DieInWorker1.calls += 1
            if DieInWorker1.calls == 5:
                os._exit(3)
        return x

def make(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), DieInWorker1(), torch.nn.Linear(64, num_classes))
"""


def test_a_dying_worker_ends_the_job_naming_it(tmp_path):
    (tmp_path / "dying.py").write_text(DYING_MODEL)
    with pytest.raises(JobFailed, match=r"hogwild worker 1 died .*exit code 3.*start the run again"):
        distbelief.train(algorithm="hogwild", workers=2, dataset="digits",
                         model=f"{tmp_path / 'dying.py'}:make", steps=2000,
                         run_dir=str(tmp_path / "run"))


NAN_MODEL = """
import os
import torch

class NanEvery10(torch.nn.Module):
    calls = 0

    def forward(self, x):
        if os.environ.get("DISTBELIEF_ROLE") == "replica":
            NanEvery10.calls += 1
            if NanEvery10.calls % 10 == 5:
                return x * float("nan")
        return x

def make(input_shape, num_classes):
    return torch.nn.Sequential(torch.nn.Flatten(), NanEvery10(), torch.nn.Linear(64, num_classes))
"""


def test_nonfinite_steps_are_skipped_and_counted_or_stop_the_job(tmp_path):
    (tmp_path / "nan.py").write_text(NAN_MODEL)
    summary = distbelief.train(algorithm="hogwild", workers=2, dataset="digits",
                               model=f"{tmp_path / 'nan.py'}:make", steps=40, lr=0.1,
                               rule="adagrad", run_dir=str(tmp_path / "skip"))
    # each worker's steps 5, 15, 25, 35 gave NaN: not applied (neither to the parameters nor
    # to Adagrad's shared sums), counted
    assert summary["nonfinite_skipped"] == 8 and summary["worker_updates"] == [36, 36]
    trained = distbelief.load_model(summary["run_dir"])
    assert all(torch.isfinite(p).all() for p in trained.parameters())
    with pytest.raises(JobFailed, match="replica[01] produced a non-finite loss and "
                                        "--on-nonfinite stop ends the job"):
        distbelief.train(algorithm="hogwild", workers=2, dataset="digits", steps=40,
                         model=f"{tmp_path / 'nan.py'}:make", on_nonfinite="stop",
                         run_dir=str(tmp_path / "stop"))


@pytest.mark.parametrize("options, message", [
    (dict(shards=3), "--shards 3 means nothing for --algorithm hogwild"),
    (dict(replicas=4), "--replicas 4 means nothing for --algorithm hogwild.*use --workers"),
    (dict(transport="gloo"), "--transport 'gloo' means nothing for --algorithm hogwild"),
    (dict(n_fetch=2), "--n-fetch 2 means nothing for --algorithm hogwild"),
    (dict(sync_fraction=0.5), "--sync-fraction 0.5 means nothing for --algorithm hogwild"),
    (dict(checkpoint_every="50"), "--checkpoint-every '50' means nothing for --algorithm hogwild"),
    (dict(restart_replicas=True), "--restart-replicas True means nothing"),
    (dict(slow_worker="1:2"), "--slow-worker '1:2' means nothing for --algorithm hogwild"),
    (dict(replica_workers=2), "--replica-workers 2 means nothing for --algorithm hogwild"),
    (dict(partitions=2), "--partitions 2 works with --algorithm downpour or admm only"),
    (dict(rule="adam"), "--rule adam does not work with --algorithm hogwild.*use sgd"),
    (dict(workers=0), "--workers must be >= 1, got 0"),
])
def test_hogwild_refuses_what_means_nothing_to_it(options, message):
    with pytest.raises(UserError, match=message):
        apply_options(JobConfig(), {"algorithm": "hogwild", **options}).validate()


def test_workers_is_refused_for_other_algorithms_and_rules_are_accepted():
    with pytest.raises(UserError, match="--workers 3 means nothing for --algorithm downpour"):
        apply_options(JobConfig(), {"workers": 3}).validate()
    for rule in ("sgd", "momentum", "adagrad"):
        cfg = apply_options(JobConfig(), {"algorithm": "hogwild", "rule": rule, "epochs": 2,
                                          "batch_size": 32, "weight_decay": 0.01})
        assert cfg.validate().resolved().optimizer.rule == rule


def test_cli_refusal_is_one_line(capsys, tmp_path):
    code = cli_main(["train", "--algorithm", "hogwild", "--shards", "3",
                     "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--shards 3 means nothing" in err
    assert not (tmp_path / "run").exists()


def test_resume_and_multi_host_are_refused_in_one_line(tmp_path, monkeypatch):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    cfg = apply_options(JobConfig(), {"algorithm": "hogwild", "workers": 2}).validate()
    (run_dir / "config.toml").write_text(cfg.resolved().to_toml())
    with pytest.raises(UserError, match="hogwild runs write no checkpoints to resume from"):
        distbelief.train(resume=str(run_dir))
    for key, value in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="runs on one host: start it without torchrun"):
        distbelief.train(algorithm="hogwild", run_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
