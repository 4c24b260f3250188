"""--precision bf16: the replicas' forward passes run under torch.autocast (bfloat16) while
the parameters, gradients, update rules and the shards' master copy stay float32."""

from __future__ import annotations

import re

import pytest
import torch

import distbelief
from distbelief.api import resolve_config
from distbelief.errors import UserError

from _reference import one_process_parameters

SEED, STEPS, LR = 4, 25, 0.1


@pytest.mark.parametrize("algorithm", ["downpour", "hogwild"])
def test_one_replica_in_bf16_is_one_process_under_autocast(tmp_path, algorithm):
    """One Downpour replica, or one Hogwild worker: plain SGD on the shards' (or the shared
    tensor's) float32 parameters, its forward pass in bfloat16."""
    one = {"downpour": {"replicas": 1, "shards": 2}, "hogwild": {"workers": 1}}[algorithm]
    summary = distbelief.train(algorithm=algorithm, dataset="digits", model="mlp", rule="sgd",
                               lr=LR, batch_size=32, steps=STEPS, seed=SEED, precision="bf16",
                               run_dir=str(tmp_path / "run"), **one)
    trained = list(distbelief.load_model(summary["run_dir"]).parameters())
    assert all(p.dtype == torch.float32 for p in trained)  # fp32 master parameters
    sgd = lambda params: torch.optim.SGD(params, lr=LR)  # noqa: E731
    for got, want in zip(trained, one_process_parameters(sgd, STEPS, 32, SEED,
                                                         precision="bf16")):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    full = one_process_parameters(sgd, STEPS, 32, SEED)  # the oracle is sharp: bf16 differs
    assert any((g - w).abs().max() > 1e-4 for g, w in zip(trained, full))


@pytest.mark.parametrize("algorithm", ["sync", "admm"])
def test_two_replicas_that_wait_for_each_other_train_in_bf16(tmp_path, algorithm):
    """Sync and ADMM's rounds wait for both replicas: no race decides what is trained, and
    3 epochs on digits end well above chance (0.1). (EASGD's bf16 oracle is in
    tests/test_easgd.py; asynchronous runs are held to oracles of one replica, not to an
    accuracy: a Hogwild run in bf16 gave 0.94 once and 0.71 under load.)"""
    summary = distbelief.train(algorithm=algorithm, dataset="digits", model="mlp", replicas=2,
                               epochs=3, seed=SEED, precision="bf16",
                               run_dir=str(tmp_path / "run"))
    assert summary["test_accuracy"] >= 0.75, summary["test_accuracy"]
    assert all(p.dtype == torch.float32
               for p in distbelief.load_model(summary["run_dir"]).parameters())


@pytest.mark.parametrize("options, message", [
    (dict(algorithm="sandblaster", precision="bf16"),
     "--precision 'bf16' means nothing for --algorithm sandblaster"),
    (dict(partitions=2, precision="bf16"),
     "--precision bf16 does not work with --partitions 2 yet"),
    (dict(precision="fp16"), "--precision"),
])
def test_where_it_cannot_apply_it_is_refused_in_one_line(options, message):
    with pytest.raises(UserError, match=re.escape(message)) as refused:
        resolve_config(None, options)
    assert "\n" not in str(refused.value)
