"""--clip-grad-norm: the distributed result equals torch.nn.utils.clip_grad_norm_ in one
process (Downpour's replica step, sync's all-reduced step), and where a step's gradient
is spread over processes it is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import distbelief
from distbelief.data.datasets import BatchStream, load_dataset, replica_indices
from distbelief.errors import UserError
from distbelief.job import JobConfig, apply_options
from distbelief.model.zoo import build_model
from distbelief.ps.rules import clip_grad_norm_

from _reference import one_process_parameters

STEPS, SEED, CLIP = 25, 3, 0.3


@pytest.mark.parametrize("max_norm", [0.01, 1e6])
def test_a_flat_gradient_is_clipped_as_torch_clips_a_models(max_norm):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    F.cross_entropy(model(torch.randn(9, 5)), torch.randint(0, 3, (9,))).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    norm = clip_grad_norm_(flat, max_norm)
    want = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    assert norm == pytest.approx(float(want), rel=1e-6)
    torch.testing.assert_close(flat, torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
                               atol=1e-7, rtol=1e-6)


def test_one_downpour_replica_clips_each_step_as_torch_does(tmp_path):
    summary = distbelief.train(dataset="digits", model="mlp", replicas=1, shards=2, n_fetch=1,
                               n_push=1, rule="sgd", lr=0.1, clip_grad_norm=CLIP,
                               batch_size=32, steps=STEPS, seed=SEED,
                               run_dir=str(tmp_path / "run"))
    trained = list(distbelief.load_model(summary["run_dir"]).parameters())
    sgd = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    for got, want in zip(trained, one_process_parameters(sgd, STEPS, 32, SEED, clip=CLIP)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    unclipped = one_process_parameters(sgd, STEPS, 32, SEED)  # the oracle is sharp
    assert any((g - w).abs().max() > 1e-3 for g, w in zip(trained, unclipped))


def test_sync_clips_the_all_reduced_gradient_by_its_global_norm(tmp_path):
    replicas, batch = 2, 16
    summary = distbelief.train(algorithm="sync", dataset="digits", model="mlp",
                               replicas=replicas, shards=1, rule="sgd", lr=0.1,
                               clip_grad_norm=CLIP, batch_size=batch, steps=STEPS, seed=SEED,
                               run_dir=str(tmp_path / "run"))
    data = load_dataset("digits", seed=SEED)
    torch.manual_seed(SEED)
    model = build_model("mlp", data.input_shape, data.num_classes)
    streams = [BatchStream(data.x_train, data.y_train,
                           replica_indices(len(data.x_train), r, replicas, SEED), batch,
                           seed=SEED * 1000 + r) for r in range(replicas)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        batches = [s.next() for s in streams]
        optimizer.zero_grad()
        F.cross_entropy(model(torch.cat([x for x, _ in batches])),
                        torch.cat([y for _, y in batches])).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
    trained = distbelief.load_model(summary["run_dir"])
    for got, want in zip(trained.parameters(), model.parameters()):
        torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("options,needle", [
    ({"partitions": 2, "shards": 2}, "with --partitions 2"),
    ({"replica_workers": 2}, "with --replica-workers 2"),
    ({"algorithm": "admm", "partitions": 2, "shards": 2}, "each dual-layers part"),
    ({"algorithm": "sandblaster"}, "means nothing for --algorithm sandblaster"),
    ({"clip_grad_norm": 0.0}, "must be a finite number > 0"),
])
def test_where_a_steps_gradient_is_not_in_one_place_clipping_is_refused(options, needle):
    with pytest.raises(UserError) as refused:
        apply_options(JobConfig(), {"clip_grad_norm": 1.0, **options}).validate()
    assert needle in str(refused.value) and "\n" not in str(refused.value)
