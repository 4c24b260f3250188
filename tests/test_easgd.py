"""Elastic averaging SGD (`--algorithm easgd`): oracles against one process, the bytes of
the elastic exchange, a lost replica and its replacement."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
import torch
import torch.nn.functional as F

import distbelief
from distbelief.api import resolve_config
from distbelief.data.datasets import load_dataset
from distbelief.data.sampling import BatchStream, replica_indices
from distbelief.errors import UserError
from distbelief.metrics.log import read_metrics
from distbelief.model.flat import FlatModel
from distbelief.model.precision import autocast
from distbelief.model.zoo import build_model

from _cluster import role_pid, wait_until

SEED, BATCH, STEPS, LR = 2, 32, 24, 0.1
JOB = dict(algorithm="easgd", dataset="digits", model="mlp", replicas=1, shards=2, seed=SEED,
           batch_size=BATCH, steps=STEPS, rule="sgd", lr=LR, log_every=1)


def reference(alpha: float, period: int, make_optimizer=None,
              precision: str = "fp32") -> tuple[torch.Tensor, list[float]]:
    """The formula in one process on replica 0's batches: (the centre, each step's loss);
    the local steps are `make_optimizer(parameters)`'s (default: SGD at LR), their forward
    passes under --precision `precision`."""
    data = load_dataset("digits", seed=SEED)
    torch.manual_seed(SEED)
    model = build_model("mlp", data.input_shape, data.num_classes)
    stream = BatchStream(data.x_train, data.y_train,
                         replica_indices(len(data.y_train), 0, 1, SEED), BATCH, seed=SEED * 1000)
    flat = FlatModel(model, grads=1)
    x, centre = flat.params, flat.params.clone()
    optimizer = (make_optimizer or (lambda p: torch.optim.SGD(p, lr=LR)))(model.parameters())
    losses = []
    for step in range(STEPS):
        if step % period == 0:
            e = alpha * (x - centre)
            x.sub_(e)
            centre.add_(e)
        xb, yb = stream.next()
        optimizer.zero_grad()
        with autocast(precision):
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return centre, losses


def centre_of(run_dir) -> torch.Tensor:
    state = torch.load(run_dir / "model.pt", weights_only=True)
    return torch.cat([v.reshape(-1) for v in state.values()])


def train_losses(run_dir) -> list[float]:
    return [e["loss"] for e in read_metrics(run_dir / "metrics.jsonl") if e["event"] == "train"]


def test_alpha_zero_is_local_sgd_exactly(tmp_path):
    """alpha = 0: no elastic force; every step's loss is plain torch.optim.SGD's, bit for
    bit, and the centre never moves from the initial model."""
    distbelief.train(**JOB, alpha=0.0, period=1, run_dir=str(tmp_path / "run"))
    centre, losses = reference(0.0, 1)
    assert train_losses(tmp_path / "run") == losses
    assert torch.equal(centre_of(tmp_path / "run"), centre)


@pytest.mark.parametrize("period", [1, 3])
def test_one_replica_follows_the_formula(tmp_path, period):
    summary = distbelief.train(**JOB, alpha=0.5, period=period, run_dir=str(tmp_path / "run"))
    centre, losses = reference(0.5, period)
    torch.testing.assert_close(centre_of(tmp_path / "run"), centre, rtol=0, atol=1e-6)
    assert train_losses(tmp_path / "run") == pytest.approx(losses, abs=1e-6)
    # one pull and one push of the parameters per exchange, an exchange per period (and
    # the replica's first pull of the centre)
    exchanges = -(-STEPS // period)
    numel = centre.numel()
    assert summary["easgd"]["exchanges"] == exchanges
    assert summary["easgd"]["bytes_per_step"] == (2 * exchanges + 1) * numel * 4 / STEPS


def test_a_local_adamw_follows_the_formula_as_torch_adamw(tmp_path):
    """The elastic exchange with AdamW as each replica's local optimizer (an adaptive inner
    optimizer, as the language model and DiLoCo train with)."""
    job = {**JOB, "rule": "adamw", "lr": 0.01, "weight_decay": 0.05}
    distbelief.train(**job, alpha=0.5, period=2, run_dir=str(tmp_path / "run"))
    adamw = lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05)  # noqa: E731
    centre, losses = reference(0.5, 2, adamw)
    torch.testing.assert_close(centre_of(tmp_path / "run"), centre, rtol=0, atol=1e-6)
    assert train_losses(tmp_path / "run") == pytest.approx(losses, abs=1e-6)
    sgd_centre, _ = reference(0.5, 2)  # the oracle is sharp
    assert (sgd_centre - centre).abs().max() > 1e-3


def test_one_replica_in_bf16_follows_the_formula_under_autocast(tmp_path):
    distbelief.train(**JOB, alpha=0.5, period=2, precision="bf16", run_dir=str(tmp_path / "run"))
    centre, losses = reference(0.5, 2, precision="bf16")
    torch.testing.assert_close(centre_of(tmp_path / "run"), centre, rtol=0, atol=1e-6)
    assert train_losses(tmp_path / "run") == pytest.approx(losses, abs=1e-6)
    fp32_centre, _ = reference(0.5, 2)  # the oracle is sharp: bf16 differs
    assert (fp32_centre - centre).abs().max() > 1e-4


@pytest.mark.parametrize("restart", [False, True], ids=["counted", "restarted"])
def test_a_killed_replica_is_counted_or_replaced_from_the_centre(tmp_path, cli_job, restart):
    run_dir = tmp_path / "run"
    proc = cli_job("--algorithm", "easgd", "--dataset", "digits", "--model", "mlp",
                   "--replicas", "3", "--steps", "1200", "--log-every", "5",
                   "--run-dir", str(run_dir), "--quiet", *(["--restart-replicas"] * restart))

    def victim():
        if not (run_dir / "metrics.jsonl").exists():
            return None
        trained = any(e["event"] == "train" and e["replica"] == 1 and e["step"] >= 20
                      for e in read_metrics(run_dir / "metrics.jsonl"))
        return role_pid(run_dir, "replica", 1) if trained else None

    os.kill(wait_until(victim, 90, "replica 1 to train"), signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    summary = json.loads((run_dir / "summary.json").read_text())
    if restart:
        assert summary["replicas_lost"] == 0 and summary["replica_restarts"] == {"1": 1}
    else:
        assert summary["replicas_lost"] == 1 and summary["lost_replicas"] == [1]
    steps = {e["replica"]: e["step"] for e in read_metrics(run_dir / "metrics.jsonl")
             if e["event"] == "train"}
    assert steps[0] == steps[2] == 1200 and (steps[1] == 1200) == restart
    assert summary["test_accuracy"] >= 0.9


@pytest.mark.parametrize("options, message", [
    (dict(alpha=1.5), "--alpha must be in [0, 1]"),
    (dict(period=0), "--period must be >= 1"),
    (dict(n_push=2), "--n-push 2 means nothing for --algorithm easgd"),
])
def test_bad_options_get_one_line(options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_config(None, {"algorithm": "easgd", **options})


def test_alpha_defaults_to_the_papers_beta_over_the_replicas():
    cfg = resolve_config(None, {"algorithm": "easgd", "replicas": 3}).resolved()
    assert cfg.easgd.alpha == pytest.approx(0.3)
