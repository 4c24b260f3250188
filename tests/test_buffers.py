"""Buffers (BatchNorm's running statistics) are part of what a job trains: published by the
replicas, averaged by the coordinator, used by evaluation and saved in model.pt."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import distbelief
from distbelief.metrics.report import Reporter
from distbelief.model.buffers import (average, buffer_state, decode, encode, has_buffers,
                                      load_buffers)


def _bn_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 3))


def test_buffers_go_through_json_exactly_and_average_by_kind():
    net = _bn_net()
    net(torch.randn(16, 4) * 3 + 1)  # train mode: the running statistics move
    state = buffer_state(net)
    assert set(state) == {"2.running_mean", "2.running_var", "2.num_batches_tracked"}
    back = decode(encode(state))
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)
    other = {k: v * 3 if v.is_floating_point() else v + 4 for k, v in state.items()}
    mean = average([state, other])
    assert torch.allclose(mean["2.running_mean"], state["2.running_mean"] * 2)
    assert mean["2.num_batches_tracked"].item() == 5  # integers: the largest
    fresh = _bn_net()
    load_buffers(fresh, mean)
    assert torch.equal(fresh[2].running_var, mean["2.running_var"])
    with pytest.raises(ValueError, match="not a buffer"):
        load_buffers(fresh, {"9.running_mean": torch.zeros(8)})
    assert not has_buffers(nn.Linear(2, 2))


def test_the_reporter_publishes_buffers_even_where_it_reports_no_loss(store):
    net = _bn_net()
    report = Reporter(store, 0, total=4, every=2, start_time=0.0, enabled=False)
    report.keep_buffers(net, "0.1")
    report.maybe_log(0)
    assert store.try_get_json("buffers/0.1") is None  # not a reporting step
    net(torch.randn(16, 4))
    report.maybe_log(1)
    assert torch.equal(decode(store.get_json("buffers/0.1"))["2.running_mean"],
                       net[2].running_mean)
    report.keep_buffers(nn.Linear(2, 2), "1")  # nothing to publish
    report.maybe_log(3, force=True)
    assert store.try_get_json("buffers/1") is None


BN_MODEL = '''
from torch import nn

def model(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, num_classes))
'''


def _single_process_accuracy(factory, epochs: int, lr: float) -> float:
    from distbelief.data.datasets import load_dataset

    data = load_dataset("digits", seed=0)
    torch.manual_seed(0)
    model = factory((1, 8, 8), 10)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for rows in torch.randperm(len(data.y_train), generator=g).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data.x_train[rows]), data.y_train[rows]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(data.x_test).argmax(1) == data.y_test).float().mean().item()


@pytest.mark.parametrize("algorithm,partitions", [("downpour", 1), ("sync", 1),
                                                   ("downpour", 2)])
def test_a_batchnorm_model_comes_within_a_point_of_one_process(tmp_path, algorithm,
                                                               partitions):
    path = tmp_path / "bn.py"
    path.write_text(textwrap.dedent(BN_MODEL))
    epochs, lr = 10, 0.05
    cut = ({"partitions": 2, "split": "layers", "balance": "4,4", "shards": 2}
           if partitions > 1 else {"shards": 1})
    summary = distbelief.train(algorithm=algorithm, dataset="digits", model=f"{path}:model",
                               replicas=2, epochs=epochs, batch_size=64,
                               rule="adagrad", lr=lr, run_dir=str(tmp_path / "run"), **cut)
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for layer in (2, 5):  # with partitions: one in each, named as in the whole model
        assert state[f"{layer}.running_mean"].abs().sum() > 0  # not the initial zeros
        assert state[f"{layer}.num_batches_tracked"] > 0
    from distbelief.data.datasets import load_dataset
    from distbelief.plugins import load_callable

    factory = load_callable(f"{path}:model", "model")
    saved = factory((1, 8, 8), 10)
    saved.load_state_dict(state)  # the job's evaluation is model.pt's, buffers and all
    data = load_dataset("digits", seed=0)
    with torch.no_grad():
        mine = (saved.eval()(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert summary["test_accuracy"] == pytest.approx(mine, abs=1e-6)  # a sample is ~0.003
    alone = _single_process_accuracy(factory, epochs, lr)
    # Sync is deterministic: the "within a point". Asynchronous runs differ from
    # run to run, and more under load (a test set of 360 samples: a point is 3.6 of them):
    # one stage gave 0.981-0.997 over 5 idle runs and 0.972 in a loaded suite; two stages,
    # each pushing on its own clock, 0.964-0.994 (one process over seeds 0-7: 0.983-0.994).
    # There the bound is what separates served buffers from none (0.73 without them).
    margin = {"sync": 0.01, "downpour": 0.03 if partitions == 1 else 0.05}[algorithm]
    assert summary["test_accuracy"] >= alone - margin, (summary["test_accuracy"], alone)


@pytest.mark.parametrize("algorithm", ["hogwild", "easgd", "admm"])
def test_every_algorithm_saves_its_replicas_buffers(tmp_path, algorithm):
    path = tmp_path / "bn.py"
    path.write_text(textwrap.dedent(BN_MODEL))
    replicas = {"workers": 2} if algorithm == "hogwild" else {"replicas": 2, "shards": 1}
    distbelief.train(algorithm=algorithm, dataset="digits", model=f"{path}:model", steps=8,
                     batch_size=32, log_every=4, run_dir=str(tmp_path / "run"), **replicas)
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert state["2.running_mean"].abs().sum() > 0 and state["5.num_batches_tracked"] > 0


def test_sandblaster_refuses_a_model_with_buffers_in_one_line(tmp_path):
    path = tmp_path / "bn.py"
    path.write_text(textwrap.dedent(BN_MODEL))
    with pytest.raises(distbelief.UserError) as refused:
        distbelief.train(algorithm="sandblaster", dataset="digits", model=f"{path}:model",
                         steps=2, run_dir=str(tmp_path / "run"))
    assert "--algorithm sandblaster does not train" in str(refused.value)
    assert "2.running_mean" in str(refused.value) and not (tmp_path / "run").exists()
