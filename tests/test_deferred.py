"""Deferred Linear weight gradients equal plain autograd's, however many backward passes
(micro-batches) came before the flush."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distbelief.model.deferred import DeferredWeights


def model() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 9), nn.Sigmoid(), nn.Linear(9, 7, bias=False),
                         nn.ReLU(), nn.Linear(7, 5))


@pytest.mark.parametrize("micro", [1, 3, 4])
def test_flush_gives_the_autograd_gradients(micro):
    net = model()
    x, y = torch.randn(12, 3, 4), torch.randint(0, 5, (12,))
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(x), y).backward()

    weights = DeferredWeights(net)
    for xb, yb in zip(torch.tensor_split(x, micro), torch.tensor_split(y, micro)):
        (F.cross_entropy(weights.forward(xb), yb, reduction="sum") / len(y)).backward()
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert weights.pending and all(m.weight.grad is None for m in linears)
    weights.flush()
    assert not weights.pending
    for mine, theirs in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-5)


def test_flush_adds_into_existing_gradients_in_place():
    net = model()
    grads = [torch.ones_like(p) for p in net.parameters()]
    for p, g in zip(net.parameters(), grads):
        p.grad = g
    x, y = torch.randn(6, 3, 4), torch.randint(0, 5, (6,))
    ref = copy.deepcopy(net)
    F.cross_entropy(ref(x), y).backward()
    weights = DeferredWeights(net)
    F.cross_entropy(weights.forward(x), y).backward()
    weights.flush()
    for p, g, theirs in zip(net.parameters(), grads, ref.parameters()):
        assert p.grad is g  # the same tensor (a push buffer's view), updated in place
        torch.testing.assert_close(p.grad, theirs.grad + 1, atol=1e-6, rtol=1e-5)


def test_no_grad_forward_is_the_plain_model():
    net = model()
    x = torch.randn(4, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(DeferredWeights(net).forward(x), net(x))
