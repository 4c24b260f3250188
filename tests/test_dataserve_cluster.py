"""Data servers end to end (`distbelief.train`, real processes), against oracles.

With one Downpour replica that fetches before and pushes after every step, the
trained parameters are a function of the batches alone. The batches are a pure
function of (seed, replica, step): today's `BatchStream` order, augmented with a
generator seeded by (seed, replica, step). So a run fed by a data server must end
with exactly the parameters of the same run augmenting inline, and both must
match one process applying that augmentation by hand; without augmentation, a
served run matches plain torch.optim on `BatchStream`'s batches. Synchronous
replicas sharing one data server match one process on their combined batches.
"""

from __future__ import annotations

import pytest
import torch

import distbelief

from _dataserve import AUGMENT, BATCH, COUNTING, LR, SEED, reference

STEPS = 30


def run(tmp_path, name: str, *, augment: dict | None = None, **options) -> tuple[dict, list]:
    settings = dict(dataset="digits", model="mlp", replicas=1, shards=1, n_fetch=1, n_push=1,
                    rule="sgd", lr=LR, batch_size=BATCH, steps=STEPS, seed=SEED, timeout=60,
                    run_dir=str(tmp_path / name))
    summary = distbelief.train({"augment": augment or {}}, **{**settings, **options})
    assert all(code == 0 for code in summary["exit_codes"].values()), summary["exit_codes"]
    return summary, [p.detach() for p in distbelief.load_model(summary["run_dir"]).parameters()]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], atol: float) -> None:
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def augmented_runs(tmp_path_factory):
    """The same augmented Downpour run fed inline (D = 0) and by one data server (D = 1),
    both loading a dataset that records which roles loaded it."""
    tmp = tmp_path_factory.mktemp("augmented")
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        for servers in (0, 1):
            log = tmp / f"loads{servers}.txt"
            patch.setenv("DISTBELIEF_TEST_DATALOG", str(log))
            summary, params = run(tmp, f"d{servers}", augment=AUGMENT, dataset=COUNTING,
                                  data_servers=servers)
            runs[servers] = summary, params, sorted(log.read_text().split())
    return runs


def test_served_and_inline_augmentation_train_exactly_the_same_parameters(augmented_runs):
    (_, inline, _), (summary, served, _) = augmented_runs[0], augmented_runs[1]
    assert all(torch.equal(a, b) for a, b in zip(inline, served))
    assert_close(served, reference(AUGMENT, STEPS), atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(served, reference({}, STEPS)))  # it augmented
    data = summary["data"]
    assert data["servers"] == 1 and data["prefetch"] == 4 and data["augment"]["flip"]
    assert data["batches_served"] == [STEPS] and data["clients_lost"] == [0]
    assert data["servers_replaced"] == [] and data["replica_failovers"] == {"0": 0}
    assert 0 <= data["replica_wait_seconds"]["0"] < summary["wall_seconds"]


def test_replicas_fed_by_data_servers_never_load_the_dataset(augmented_runs):
    assert augmented_runs[1][2] == ["coordinator", "dataserver"]
    assert augmented_runs[0][2] == ["coordinator", "replica"]  # the count is sharp
    inline = augmented_runs[0][0]["data"]
    assert inline["servers"] == 0 and inline["batches_served"] == []
    assert inline["replica_wait_seconds"]["0"] > 0  # the time it made its own batches


def test_served_batches_without_augmentation_are_todays_batches(tmp_path):
    summary, served = run(tmp_path, "plain", data_servers=1, prefetch=2)
    assert summary["data"]["batches_served"] == [STEPS]
    assert_close(served, reference({}, STEPS), atol=1e-6)  # what D = 0 trains (test_downpour_oracle)


def test_sync_replicas_share_one_data_server(tmp_path):
    summary, served = run(tmp_path, "sync", augment=AUGMENT, algorithm="sync", replicas=2,
                          n_fetch=None, n_push=None, data_servers=1, steps=15)
    assert summary["data"]["batches_served"] == [2 * 15]
    assert set(summary["data"]["replica_wait_seconds"]) == {"0", "1"}
    assert_close(served, reference(AUGMENT, 15, replicas=2), atol=1e-5)
