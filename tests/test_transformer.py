"""The transformer model (distbelief.model.transformer): its output shape, causality, that it
learns Python's own source in-process, cuts between blocks, and trains through
distbelief.train on text:<a stdlib directory>."""

from __future__ import annotations

import math

import pytest
import torch

import distbelief
from distbelief.data.datasets import evaluate_split, load_dataset
from distbelief.data.text import stdlib_dir
from distbelief.errors import UserError
from distbelief.model.partition import PartitionPlan
from distbelief.model.transformer import Block, Embed, Head, parse_spec
from distbelief.model.zoo import build_model, check_model
from distbelief.task import Targets, make_task

SEQ = make_task("sequence")
JSON_DIR = stdlib_dir() / "json"  # ~40 KB of Python: fast to read, real text


def test_output_is_logits_per_position_and_the_spec_picks_the_sizes():
    model = build_model("transformer", (16,), 256)
    assert isinstance(model, torch.nn.Sequential)
    assert isinstance(model[0], Embed) and isinstance(model[-1], Head)
    assert [type(m) for m in model[1:-1]] == [Block, Block]
    x = torch.randint(0, 256, (3, 16)).float()
    assert model(x).shape == (3, 16, 256)
    small = build_model("transformer:3:32:2", (16,), 256)
    assert len(small) == 5 and small[0].token.embedding_dim == 32 and small[1].heads == 2
    check_model(small, (16,), Targets((16,), 256), SEQ)
    assert parse_spec("transformer:4") == (4, 128, 4) and parse_spec("mlp") is None


@pytest.mark.parametrize("spec, fragment", [
    ("transformer:x", "sizes must be integers"),
    ("transformer:1:30:4", "not divisible by 4 heads"),
    ("transformer:0", "layers must be at least 1"),
])
def test_bad_specs_and_shapes_are_refused(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        build_model(spec, (16,), 256)
    with pytest.raises(UserError, match=r"shape \(T,\)"):
        build_model("transformer", (1, 16), 256)


def test_a_later_byte_does_not_change_earlier_logits():
    model = build_model("transformer:2:32:4", (12,), 256).eval()
    x = torch.randint(0, 256, (2, 12)).float()
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_cut_between_blocks_the_parts_give_the_whole_models_output():
    model = build_model("transformer:2:32:2", (8,), 256).eval()
    plan = PartitionPlan("layers", 2, (2, 2))
    x = torch.randint(0, 256, (2, 8)).float()
    with torch.no_grad():
        torch.testing.assert_close(plan.part_module(model, 1)(plan.part_module(model, 0)(x)),
                                   model(x), rtol=0, atol=0)


def test_the_loss_falls_over_30_adam_steps_on_python_source():
    data = load_dataset(f"text:{JSON_DIR}", task=SEQ, seq_len=32)
    model = build_model("transformer:1:32:2", data.input_shape, data.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        x, y = data.train.gather(torch.randint(0, len(data.train), (32,), generator=gen))
        loss = SEQ.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(256), rel=0.1)  # uniform over bytes at first
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_sync_training_on_stdlib_text_lowers_the_test_perplexity(tmp_path):
    spec = f"text:{JSON_DIR}"
    data = load_dataset(spec, task=SEQ, seq_len=32)
    torch.manual_seed(0)
    untrained = build_model("transformer:1:32:2", data.input_shape, data.num_classes)
    before = math.exp(evaluate_split(untrained, data.test, task=SEQ)["loss"])
    summary = distbelief.train(
        algorithm="sync", task="sequence", dataset=spec, model="transformer:1:32:2",
        seq_len=32, replicas=2, steps=20, batch_size=32, rule="adam", lr=0.003, seed=0,
        run_dir=str(tmp_path / "run"), show_progress=False)
    assert summary["task"]["headline"] == "perplexity"
    assert summary["model"]["target_shape"] == [32] and summary["model"]["target_classes"] == 256
    assert summary["test_perplexity"] < 256 and summary["test_perplexity"] < 0.7 * before, (
        summary["test_perplexity"], before)


def test_downpour_trains_it_cut_into_two_pipeline_partitions(tmp_path):
    summary = distbelief.train(
        algorithm="downpour", task="sequence", dataset=f"text:{JSON_DIR}",
        model="transformer:2:32:2", seq_len=32, replicas=1, partitions=2, split="layers",
        steps=30, batch_size=32, rule="adam", lr=0.003, seed=0, run_dir=str(tmp_path / "run"),
        show_progress=False)
    assert summary["test_perplexity"] < 64  # uniform guessing over bytes: 256
