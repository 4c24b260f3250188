"""Oracle: one-replica Downpour with n_fetch = n_push = 1 is exactly torch.optim.

With a single replica that fetches before and pushes after every step, each
push is applied to the very parameters the gradient was computed on, so the
sharded parameter server must reproduce a single-process optimizer on the same
batches, whatever the number of shards (every rule is elementwise).
"""

import pytest
import torch

import distbelief

from _reference import one_process_parameters

STEPS = 25
SEED = 3

OPTIMIZERS = {
    "sgd": (0.1, lambda params, lr: torch.optim.SGD(params, lr=lr)),
    "momentum": (0.05, lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)),
    "adagrad": (0.05, lambda params, lr: torch.optim.Adagrad(params, lr=lr)),
    "adam": (0.003, lambda params, lr: torch.optim.Adam(params, lr=lr)),
}


def reference_parameters(rule: str, steps: int, batch_size: int) -> list[torch.Tensor]:
    """The same training in one process with torch.optim."""
    lr, make = OPTIMIZERS[rule]
    return one_process_parameters(lambda params: make(params, lr), steps, batch_size, SEED)


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("rule", ["sgd", "momentum", "adagrad", "adam"])
def test_one_replica_equals_torch_optim(tmp_path, rule, shards):
    lr, _ = OPTIMIZERS[rule]
    transport = "shm" if shards == 1 else "gloo"  # both transports must be exact
    summary = distbelief.train(dataset="digits", model="mlp", replicas=1, shards=shards,
                               n_fetch=1, n_push=1, rule=rule, lr=lr, batch_size=32,
                               steps=STEPS, seed=SEED, transport=transport,
                               run_dir=str(tmp_path / "run"))
    assert summary["shard_pushes"] and sum(summary["shard_pushes"]) == STEPS * shards
    trained = distbelief.load_model(summary["run_dir"])
    expected = reference_parameters(rule, STEPS, batch_size=32)
    for got, want in zip(trained.parameters(), expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_oracle_detects_a_different_optimizer(tmp_path):
    """The oracle is sharp: the same run does not match a different rule's reference."""
    summary = distbelief.train(dataset="digits", model="mlp", replicas=1, shards=2,
                               rule="adagrad", lr=0.05, batch_size=32, steps=STEPS, seed=SEED,
                               run_dir=str(tmp_path / "run"))
    trained = distbelief.load_model(summary["run_dir"])
    expected = reference_parameters("sgd", STEPS, batch_size=32)
    assert any((got - want).abs().max() > 1e-3
               for got, want in zip(trained.parameters(), expected))
