"""Tests for distbelief.model.locally_connected against per-position loop references and nn.ConvNd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distbelief.model.locally_connected import (
    LocallyConnected1d,
    LocallyConnected2d,
    locally_connected_1d,
    locally_connected_2d,
)


def reference_1d(x, weight, bias, kernel, stride, padding):
    """One matmul per output position over an explicitly sliced window."""
    xp = F.pad(x, (padding, padding))
    outs = []
    for p in range(weight.shape[0]):
        window = xp[:, :, p * stride:p * stride + kernel].reshape(x.shape[0], -1)  # (B, C*k), channel-major
        out = window @ weight[p].T
        outs.append(out if bias is None else out + bias[:, p])
    return torch.stack(outs, dim=2)


def reference_2d(x, weight, bias, kernel, stride, padding):
    """F.unfold's columns, one matmul per output position (i, j)."""
    cols = F.unfold(x, kernel, padding=padding, stride=stride)  # (B, C*kh*kw, P_h*P_w), row-major positions
    ph, pw = weight.shape[:2]
    out = torch.empty(x.shape[0], weight.shape[2], ph, pw, dtype=x.dtype)
    for i in range(ph):
        for j in range(pw):
            o = cols[:, :, i * pw + j] @ weight[i, j].T
            out[:, :, i, j] = o if bias is None else o + bias[:, i, j]
    return out


def _grads(fn, tensors):
    """Output of fn() and gradients of a fixed random projection of it wrt each tensor."""
    for t in tensors:
        t.grad = None
    out = fn()
    gout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    (out * gout).sum().backward()
    return out.detach(), [t.grad.clone() for t in tensors]


CASES_1D = [  # (C_in, C_out, L, kernel, stride, padding, bias)
    (1, 16, 40, 5, 2, 2, True),
    (3, 4, 11, 3, 1, 0, True),
    (2, 5, 10, 4, 3, 1, False),
    (4, 2, 7, 7, 1, 0, True),
    (2, 3, 9, 1, 2, 0, False),
]


@pytest.mark.parametrize("c_in, c_out, length, kernel, stride, padding, bias", CASES_1D)
def test_1d_matches_loop_reference(c_in, c_out, length, kernel, stride, padding, bias):
    layer = LocallyConnected1d(c_in, c_out, length, kernel, stride, padding, bias).double()
    assert layer.output_length == (length + 2 * padding - kernel) // stride + 1
    assert layer.weight.shape == (layer.output_length, c_out, c_in * kernel)
    assert (layer.bias is None) == (not bias)
    x = torch.randn(3, c_in, length, dtype=torch.float64, requires_grad=True)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    got, got_grads = _grads(lambda: layer(x), params)
    want, want_grads = _grads(
        lambda: reference_1d(x, layer.weight, layer.bias, kernel, stride, padding), params
    )
    assert got.shape == (3, c_out, layer.output_length)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


CASES_2D = [  # (C_in, C_out, size, kernel, stride, padding, bias)
    (1, 16, (8, 8), 3, 1, 1, True),
    (16, 8, (8, 8), 3, 2, 1, True),
    (3, 4, (6, 7), (2, 3), (1, 2), (0, 1), False),
    (2, 3, (5, 5), 5, 1, 0, True),
    (2, 2, (9, 4), (3, 1), (3, 1), (1, 0), True),
]


@pytest.mark.parametrize("c_in, c_out, size, kernel, stride, padding, bias", CASES_2D)
def test_2d_matches_loop_reference(c_in, c_out, size, kernel, stride, padding, bias):
    layer = LocallyConnected2d(c_in, c_out, size, kernel, stride, padding, bias).double()
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    assert layer.output_size == tuple((n + 2 * pp - kk) // ss + 1 for n, kk, ss, pp in zip(size, k, s, p))
    assert layer.weight.shape == (*layer.output_size, c_out, c_in * k[0] * k[1])
    x = torch.randn(2, c_in, *size, dtype=torch.float64, requires_grad=True)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    got, got_grads = _grads(lambda: layer(x), params)
    want, want_grads = _grads(lambda: reference_2d(x, layer.weight, layer.bias, k, s, p), params)
    assert got.shape == (2, c_out, *layer.output_size)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_same_weights_everywhere_is_a_convolution():
    # Tying every position's weights to one conv filter must give nn.ConvNd's output,
    # which pins the patch flattening order to (channel, kernel offsets).
    conv1 = nn.Conv1d(3, 4, 5, stride=2, padding=2).double()
    lc1 = LocallyConnected1d(3, 4, 17, 5, stride=2, padding=2).double()
    with torch.no_grad():
        lc1.weight.copy_(conv1.weight.reshape(4, -1).expand_as(lc1.weight))
        lc1.bias.copy_(conv1.bias[:, None].expand_as(lc1.bias))
    x1 = torch.randn(2, 3, 17, dtype=torch.float64)
    torch.testing.assert_close(lc1(x1), conv1(x1))

    conv2 = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)).double()
    lc2 = LocallyConnected2d(3, 4, (7, 6), (3, 2), stride=(2, 1), padding=(1, 0)).double()
    with torch.no_grad():
        lc2.weight.copy_(conv2.weight.reshape(4, -1).expand_as(lc2.weight))
        lc2.bias.copy_(conv2.bias[:, None, None].expand_as(lc2.bias))
    x2 = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(lc2(x2), conv2(x2))


def test_weights_are_not_shared():
    layer1 = LocallyConnected1d(2, 3, 12, 3, stride=1, padding=1)
    x1 = torch.randn(4, 2, 12)
    before = layer1(x1).detach()
    with torch.no_grad():
        layer1.weight[5] += 1.0
    changed = (layer1(x1).detach() != before).any(dim=(0, 1))
    assert changed.tolist() == [i == 5 for i in range(layer1.output_length)]

    layer2 = LocallyConnected2d(2, 3, (6, 5), 3, padding=1)
    x2 = torch.randn(4, 2, 6, 5)
    before = layer2(x2).detach()
    with torch.no_grad():
        layer2.weight[2, 3] += 1.0
    changed = (layer2(x2).detach() != before).any(dim=(0, 1))
    expected = torch.zeros(6, 5, dtype=torch.bool)
    expected[2, 3] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("kernel, stride, padding", [(5, 2, 2), (3, 1, 1), (4, 3, 0)])
def test_1d_functional_slice_matches_full_output(kernel, stride, padding):
    layer = LocallyConnected1d(2, 3, 23, kernel, stride, padding).double()
    x = torch.randn(2, 2, 23, dtype=torch.float64)
    full = layer(x)
    xp = F.pad(x, (padding, padding))
    n = layer.output_length
    for a, b in [(0, n), (0, 1), (2, 5), (n - 1, n), (1, n - 1)]:
        window = xp[:, :, a * stride:(b - 1) * stride + kernel]
        part = locally_connected_1d(window, layer.weight[a:b], layer.bias[:, a:b], kernel, stride)
        torch.testing.assert_close(part, full[:, :, a:b])


def test_1d_functional_empty_slice():
    layer = LocallyConnected1d(2, 3, 10, 3)
    out = locally_connected_1d(torch.zeros(4, 2, 0), layer.weight[:0], layer.bias[:, :0], 3, 1)
    assert out.shape == (4, 3, 0)


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), ((2, 3), (2, 1), (0, 1))])
def test_2d_functional_row_slice_matches_full_output(kernel, stride, padding):
    layer = LocallyConnected2d(2, 3, (11, 6), kernel, stride, padding).double()
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    x = torch.randn(2, 2, 11, 6, dtype=torch.float64)
    full = layer(x)
    xp = F.pad(x, (pw, pw, ph, ph))
    n = layer.output_size[0]
    for a, b in [(0, n), (0, 1), (1, 3), (n - 1, n)]:
        window = xp[:, :, a * sh:(b - 1) * sh + kh, :]
        part = locally_connected_2d(window, layer.weight[a:b], layer.bias[:, a:b], (kh, kw), (sh, sw))
        torch.testing.assert_close(part, full[:, :, a:b])


def test_functional_shape_errors_name_both_numbers():
    w1 = torch.zeros(4, 3, 2 * 3)
    with pytest.raises(ValueError, match=r"gives 5 windows.*weight has 4 positions"):
        locally_connected_1d(torch.zeros(1, 2, 7), w1, None, 3, 1)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 3, 6\).*\(4, C_out, 9\)"):
        locally_connected_1d(torch.zeros(1, 3, 6), w1, None, 3, 1)
    with pytest.raises(ValueError, match=r"bias has shape \(3, 5\), expected \(3, 4\)"):
        locally_connected_1d(torch.zeros(1, 2, 6), w1, torch.zeros(3, 5), 3, 1)
    with pytest.raises(ValueError, match="give \\(B, C_in, L_padded\\)"):
        locally_connected_1d(torch.zeros(2, 6), w1, None, 3, 1)
    w2 = torch.zeros(2, 3, 4, 2 * 9)
    with pytest.raises(ValueError, match=r"gives \(3, 3\) windows.*weight has \(2, 3\) positions"):
        locally_connected_2d(torch.zeros(1, 2, 5, 5), w2, None, (3, 3), (1, 1))
    with pytest.raises(ValueError, match=r"bias has shape"):
        locally_connected_2d(torch.zeros(1, 2, 4, 5), w2, torch.zeros(4, 2, 2), (3, 3), (1, 1))


def test_forward_shape_errors_name_expected_and_got():
    layer1 = LocallyConnected1d(2, 3, 10, 3)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 2, 10\), got \(4, 3, 10\)"):
        layer1(torch.zeros(4, 3, 10))
    with pytest.raises(ValueError, match=r"got \(4, 2, 11\)"):
        layer1(torch.zeros(4, 2, 11))
    layer2 = LocallyConnected2d(2, 3, (6, 5), 3)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 2, 6, 5\), got \(1, 2, 5, 6\)"):
        layer2(torch.zeros(1, 2, 5, 6))


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: LocallyConnected1d(0, 3, 10, 3), "in_channels must be a positive int"),
        (lambda: LocallyConnected1d(2, 3, 10, 3, stride=0), "stride must be a positive int"),
        (lambda: LocallyConnected1d(2, 3, 10, 3, padding=-1), "padding must be >= 0"),
        (lambda: LocallyConnected1d(2, 3, 4, 7, padding=1), "kernel_size 7 is larger than the padded input length 6"),
        (lambda: LocallyConnected2d(2, 3, (4, 8), (5, 3)), "larger than the padded input size (4, 8)"),
        (lambda: LocallyConnected2d(2, 3, (4, 8, 1), 3), "input_size must be an int or a pair"),
        (lambda: LocallyConnected2d(2, 3, 4, 3, padding=(1, -1)), "padding must be >= 0"),
    ],
)
def test_constructor_errors(make, fragment):
    with pytest.raises(ValueError) as info:
        make()
    assert fragment in str(info.value)


def test_init_is_per_position_linear_and_seeded():
    torch.manual_seed(3)
    a = LocallyConnected2d(2, 4, 6, 3, padding=1)
    torch.manual_seed(3)
    b = LocallyConnected2d(2, 4, 6, 3, padding=1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    bound = 1 / (2 * 9) ** 0.5
    for p in (a.weight, a.bias):
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound


def test_extra_repr():
    assert repr(LocallyConnected1d(1, 16, 40, 5, stride=2, padding=2)) == (
        "LocallyConnected1d(1, 16, input_length=40, kernel_size=5, stride=2, padding=2, output_length=20)"
    )
    assert repr(LocallyConnected2d(1, 16, 8, 3, padding=1, bias=False)) == (
        "LocallyConnected2d(1, 16, input_size=(8, 8), kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), "
        "output_size=(8, 8), bias=False)"
    )
