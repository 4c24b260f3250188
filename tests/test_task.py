"""The task (`distbelief.task`): each built-in loss and metric equals PyTorch's, and bad
targets, outputs and user functions get one line naming the problem and the fix."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distbelief.errors import UserError
from distbelief.job import JobConfig, apply_options
from distbelief.model.evaluate import evaluate
from distbelief.task import Targets, make_task, task_of


def _close(a, b):
    assert torch.allclose(torch.as_tensor(a, dtype=torch.float64),
                          torch.as_tensor(b, dtype=torch.float64), rtol=1e-6, atol=1e-7)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_classify_is_cross_entropy_bit_for_bit(gen):
    out, y = torch.randn(7, 5, generator=gen), torch.randint(0, 5, (7,), generator=gen)
    task = make_task("classify")
    for reduction in ("mean", "sum", "none"):
        assert torch.equal(task.loss(out, y, reduction), F.cross_entropy(out, y, reduction=reduction))


@pytest.mark.parametrize("loss,fn", [("mse", F.mse_loss), ("l1", F.l1_loss)])
@pytest.mark.parametrize("shape", [(), (3,), (2, 4)])
def test_regress_losses_are_per_sample_means(gen, loss, fn, shape):
    out, y = torch.randn(6, *shape, generator=gen), torch.randn(6, *shape, generator=gen)
    task = make_task("regress", loss=loss)
    assert torch.equal(task.loss(out, y), fn(out, y))
    per = fn(out, y, reduction="none").reshape(6, -1).mean(dim=1)
    _close(task.loss(out, y, "none"), per)
    _close(task.loss(out, y, "sum"), per.sum())
    # a batch cut in two sums to the whole batch's loss
    _close(task.loss(out[:2], y[:2], "sum") + task.loss(out[2:], y[2:], "sum"),
           task.loss(out, y, "sum"))


def test_regress_takes_a_flat_output_for_a_shaped_target(gen):
    out, y = torch.randn(4, 6, generator=gen), torch.randn(4, 2, 3, generator=gen)
    _close(make_task("regress").loss(out, y), F.mse_loss(out.reshape(4, 2, 3), y))
    scalar = torch.randn(4, generator=gen)
    _close(make_task("regress").loss(out[:, :1], scalar), F.mse_loss(out[:, 0], scalar))


def test_sequence_is_per_token_cross_entropy(gen):
    out, y = torch.randn(3, 5, 11, generator=gen), torch.randint(0, 11, (3, 5), generator=gen)
    task = make_task("sequence")
    whole = F.cross_entropy(out.reshape(-1, 11), y.reshape(-1))
    assert torch.equal(task.loss(out, y), whole)
    _close(task.loss(out, y, "sum"), whole * 3)
    _close(task.loss(out, y, "none"),
           F.cross_entropy(out.transpose(1, 2), y, reduction="none").mean(dim=1))


def test_metrics_over_a_split_equal_the_sums_over_all_of_it(gen):
    model = torch.nn.Linear(4, 3)
    x = torch.randn(50, 4, generator=gen)
    y = torch.randint(0, 3, (50,), generator=gen)
    got = evaluate(model, x, y, make_task("classify"), batch_size=7)
    with torch.no_grad():
        logits = model(x)
    _close(got["loss"], F.cross_entropy(logits, y))
    assert got["accuracy"] == pytest.approx((logits.argmax(1) == y).double().mean().item())

    targets = torch.randn(50, 3, generator=gen)
    got = evaluate(model, x, targets, make_task("regress"), batch_size=7)
    with torch.no_grad():
        err = model(x) - targets
    _close(got["loss"], err.square().mean())
    _close(got["rmse"], err.square().mean().sqrt())
    _close(got["mae"], err.abs().mean())


def test_sequence_metrics_give_perplexity_and_token_accuracy(gen):
    out, y = torch.randn(4, 6, 9, generator=gen), torch.randint(0, 9, (4, 6), generator=gen)
    meter = make_task("sequence").meter()
    meter.update(out[:1], y[:1])
    meter.update(out[1:], y[1:])
    got = meter.result()
    ce = F.cross_entropy(out.reshape(-1, 9), y.reshape(-1))
    _close(got["loss"], ce)
    _close(got["perplexity"], math.exp(ce))
    assert got["token_accuracy"] == pytest.approx((out.argmax(-1) == y).double().mean().item())


def test_targets_are_checked_and_converted_by_the_task():
    assert make_task("classify").check_targets(np.array([0.0, 2.0]), "y", "d").dtype == np.int64
    assert make_task("regress").check_targets(np.array([0.5, 2]), "y", "d").dtype == np.float32
    with pytest.raises(UserError, match="regress"):
        make_task("classify").check_targets(np.array([0.5, 1.0]), "y", "d")
    with pytest.raises(UserError, match="non-finite"):
        make_task("regress").check_targets(np.array([0.5, np.nan]), "y", "d")
    with pytest.raises(UserError, match=r"\(N, T\)"):
        make_task("sequence").check_targets(np.zeros(3), "y", "d")
    assert make_task("regress").targets_of([np.zeros((5, 2, 3))]) == Targets((2, 3), None)
    assert make_task("sequence").targets_of([np.array([[0, 4], [1, 2]])]) == Targets((2,), 5)
    assert Targets((2, 3), None).outputs == 6


@pytest.mark.parametrize("task,out,targets,needle", [
    ("classify", torch.zeros(2, 3), Targets((), 4), "width 3 but the dataset has 4 classes"),
    ("classify", torch.zeros(2, 4, 5), Targets((), 4), "needs (2, 4)"),
    ("regress", torch.zeros(2, 5), Targets((3,), None), "make the model output (2, 3)"),
    ("sequence", torch.zeros(2, 7), Targets((7,), 11), "needs (2, 7, 11)"),
    ("sequence", torch.zeros(2, 7, 5), Targets((7,), 11), "at least 11 units"),
])
def test_an_output_that_does_not_fit_the_task_names_both_and_the_fix(task, out, targets, needle):
    target = torch.zeros(2, *targets.shape, dtype=make_task(task).target_dtype)
    with pytest.raises(UserError) as err:
        make_task(task).check_output(out, 2, targets, target, "'m'")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_users_loss_and_metrics_come_from_a_file(tmp_path, gen):
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent("""
        import torch
        def huber(output, target):
            return torch.nn.functional.huber_loss(output.reshape(target.shape), target)
        def within(output, target):
            return {"within_half": (output.reshape(target.shape) - target).abs().lt(0.5).float().mean()}
        def vector(output, target):
            return (output - target) ** 2
    """))
    cfg = apply_options(JobConfig(), {"task": "regress", "loss": f"{path}:huber",
                                      "metrics": f"{path}:within"}).validate()
    task = task_of(cfg)
    out, y = torch.randn(6, 1, generator=gen), torch.randn(6, generator=gen)
    _close(task.loss(out, y), F.huber_loss(out[:, 0], y))
    _close(task.loss(out, y, "sum"), 6 * F.huber_loss(out[:, 0], y))
    _close(task.loss(out, y, "none"), F.huber_loss(out[:, 0], y, reduction="none"))
    meter = task.meter()
    meter.update(out[:2], y[:2])
    meter.update(out[2:], y[2:])
    assert meter.result()["within_half"] == pytest.approx(
        float((out[:, 0] - y).abs().lt(0.5).float().mean()))
    bad = make_task("regress", loss=f"{path}:vector")
    with pytest.raises(UserError, match="0-d tensor"):
        bad.check_output(out, 6, Targets((), None), y, "'m'")


def test_a_loss_the_task_does_not_have_is_refused_in_one_line():
    with pytest.raises(UserError, match="use mse or l1"):
        make_task("regress", loss="cross_entropy")
    with pytest.raises(UserError, match="does not exist"):
        make_task("classify", loss="/nowhere/x.py:f")
    with pytest.raises(UserError, match="--task 'rank'"):
        apply_options(JobConfig(), {"task": "rank"}).validate()
