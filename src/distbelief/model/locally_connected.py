"""Locally connected layers: convolutions whose weights are not shared across positions.

DistBelief's image and speech models used these: every output position has its
own filter bank, so a layer has ``positions * out_channels * in_channels * kernel``
weights. The modules pad their input and call the functional forms, which take an
already padded window. That split lets a model-parallel partition compute only
a slice of the output positions from the matching slice of the padded input::

    layer = LocallyConnected1d(1, 16, input_length=40, kernel_size=5, stride=2, padding=2)
    full = layer(x)                                   # (B, 16, 20)
    xp = F.pad(x, (2, 2))
    a, b = 5, 12                                      # output positions [5, 12)
    part = locally_connected_1d(xp[..., a * 2:(b - 1) * 2 + 5], layer.weight[a:b],
                                layer.bias[:, a:b], kernel_size=5, stride=2)
    assert torch.allclose(part, full[..., a:b])

Each patch is flattened channel-major, then kernel offset (for 2-D: channel,
kernel row, kernel column), the order ``torch.nn.functional.unfold`` produces.
Shape problems raise ``ValueError`` naming the expected and the given shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LocallyConnected1d", "LocallyConnected2d", "locally_connected_1d", "locally_connected_2d"]


def _windows(padded: int, kernel: int, stride: int) -> int:
    """How many windows of ``kernel`` at ``stride`` fit in ``padded`` (0 if none)."""
    return 0 if padded < kernel else (padded - kernel) // stride + 1


def _check_params(weight: Tensor, bias: Tensor | None, lead: tuple[int, ...], patch: int, name: str) -> None:
    """Check ``weight`` is (*lead, C_out, patch) and ``bias`` is (C_out, *lead) or None.

    Raises:
        ValueError: either shape disagrees with the input window.
    """
    if weight.dim() != len(lead) + 2 or tuple(weight.shape[: len(lead)]) != lead or weight.shape[-1] != patch:
        raise ValueError(
            f"{name}: weight has shape {tuple(weight.shape)} but this input needs ({', '.join(map(str, lead))}, "
            f"C_out, {patch}): slice the weight to the same output positions as the input window"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[-2], *lead):
        raise ValueError(
            f"{name}: bias has shape {tuple(bias.shape)}, expected {(weight.shape[-2], *lead)}: "
            "slice the bias to the same output positions as the weight"
        )


def locally_connected_1d(x: Tensor, weight: Tensor, bias: Tensor | None, kernel_size: int, stride: int) -> Tensor:
    """Locally connected 1-D layer on an already padded input (no padding is added here).

    Args:
        x: (B, C_in, L_padded).
        weight: (P, C_out, C_in * kernel_size), one filter bank per output position.
        bias: (C_out, P) or None.
        kernel_size, stride: ints; P must equal (L_padded - kernel_size) // stride + 1.

    Returns:
        (B, C_out, P).

    Raises:
        ValueError: x is not 3-D, or its windows do not match the weight's P,
            C_in * kernel_size, or the bias.
    """
    if x.dim() != 3:
        raise ValueError(f"locally_connected_1d: x has shape {tuple(x.shape)}: give (B, C_in, L_padded)")
    positions = weight.shape[0] if weight.dim() else 0
    windows = _windows(x.shape[2], kernel_size, stride)
    if windows != positions:
        raise ValueError(
            f"locally_connected_1d: input length {x.shape[2]} gives {windows} windows of kernel {kernel_size} "
            f"at stride {stride}, but weight has {positions} positions: pass the padded input window "
            "[a*stride, (b-1)*stride + kernel) for output positions [a, b)"
        )
    _check_params(weight, bias, (positions,), x.shape[1] * kernel_size, "locally_connected_1d")
    if positions == 0:  # an empty slice of positions; unfold refuses a window shorter than the kernel
        patches = x.new_zeros(x.shape[0], 0, x.shape[1] * kernel_size)
    else:  # (B, C, P, k) -> (B, P, C, k) -> (B, P, C*k): channel-major patches, like F.unfold
        patches = x.unfold(2, kernel_size, stride).permute(0, 2, 1, 3).reshape(x.shape[0], positions, -1)
    out = torch.einsum("bpi,poi->bop", patches, weight)
    return out if bias is None else out + bias


def locally_connected_2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, kernel_size: tuple[int, int], stride: tuple[int, int]
) -> Tensor:
    """Locally connected 2-D layer on an already padded input (no padding is added here).

    Args:
        x: (B, C_in, H_padded, W_padded).
        weight: (P_h, P_w, C_out, C_in * kh * kw); patches flatten as (channel, row, column).
        bias: (C_out, P_h, P_w) or None.
        kernel_size, stride: (kh, kw) and (sh, sw); P_h must equal
            (H_padded - kh) // sh + 1, and likewise P_w.

    Returns:
        (B, C_out, P_h, P_w).

    Raises:
        ValueError: x is not 4-D, or its windows do not match the weight's
            (P_h, P_w), C_in * kh * kw, or the bias.
    """
    if x.dim() != 4:
        raise ValueError(f"locally_connected_2d: x has shape {tuple(x.shape)}: give (B, C_in, H_padded, W_padded)")
    (kh, kw), (sh, sw) = kernel_size, stride
    positions = tuple(weight.shape[:2])
    windows = (_windows(x.shape[2], kh, sh), _windows(x.shape[3], kw, sw))
    if windows != positions:
        raise ValueError(
            f"locally_connected_2d: input of size {tuple(x.shape[2:])} gives {windows} windows of kernel "
            f"{(kh, kw)} at stride {(sh, sw)}, but weight has {positions} positions: pass the padded input "
            "window [a*stride, (b-1)*stride + kernel) for output positions [a, b) in each dimension"
        )
    _check_params(weight, bias, positions, x.shape[1] * kh * kw, "locally_connected_2d")
    if 0 in positions:  # an empty slice of positions; F.unfold refuses a window smaller than the kernel
        patches = x.new_zeros(x.shape[0], x.shape[1] * kh * kw, *positions)
    else:
        patches = F.unfold(x, (kh, kw), stride=(sh, sw)).reshape(x.shape[0], -1, *positions)
    out = torch.einsum("bihw,hwoi->bohw", patches, weight)
    return out if bias is None else out + bias


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair.

    Raises:
        ValueError: anything else.
    """
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_sizes(**sizes: int | tuple[int, ...]) -> None:
    """Check every size (or each entry of a tuple) is a positive int; ``padding`` may be 0.

    Raises:
        ValueError: the first size that is not.
    """
    for name, value in sizes.items():
        low = 0 if name == "padding" else 1
        for v in value if isinstance(value, tuple) else (value,):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be {'>= 0' if low == 0 else 'a positive int'}, got {value!r}")


def _init_uniform(params: list[Tensor | None], fan_in: int) -> None:
    """nn.Linear's initialisation per position: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from torch's global RNG."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        for p in params:
            if p is not None:
                p.uniform_(-bound, bound)


class LocallyConnected1d(nn.Module):
    """Like ``nn.Conv1d`` but with separate weights at each of the ``output_length`` positions.

    Input (B, in_channels, input_length) -> output (B, out_channels, output_length),
    zero-padding ``padding`` on both sides. Example::

        layer = LocallyConnected1d(1, 16, input_length=40, kernel_size=5, stride=2, padding=2)
        layer(torch.randn(8, 1, 40)).shape  # (8, 16, 20)

    Raises:
        ValueError: non-positive sizes, negative padding, a kernel larger than
            the padded input; at forward, an input of the wrong shape.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        input_length: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_sizes(in_channels=in_channels, out_channels=out_channels, input_length=input_length,
                     kernel_size=kernel_size, stride=stride, padding=padding)
        if kernel_size > input_length + 2 * padding:
            raise ValueError(
                f"kernel_size {kernel_size} is larger than the padded input length {input_length + 2 * padding} "
                f"(input_length {input_length} + 2 * padding {padding}): use a smaller kernel or more padding"
            )
        self.in_channels, self.out_channels, self.input_length = in_channels, out_channels, input_length
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.output_length = _windows(input_length + 2 * padding, kernel_size, stride)
        fan_in = in_channels * kernel_size
        self.weight = nn.Parameter(torch.empty(self.output_length, out_channels, fan_in))
        self.bias = nn.Parameter(torch.empty(out_channels, self.output_length)) if bias else None
        _init_uniform([self.weight, self.bias], fan_in)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, self.input_length)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"LocallyConnected1d expected input of shape (B, {expected[0]}, {expected[1]}), "
                f"got {tuple(x.shape)}: its weights are tied to one input length"
            )
        x = F.pad(x, (self.padding, self.padding)) if self.padding else x
        return locally_connected_1d(x, self.weight, self.bias, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, input_length={self.input_length}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"output_length={self.output_length}" + ("" if self.bias is not None else ", bias=False")
        )


class LocallyConnected2d(nn.Module):
    """Like ``nn.Conv2d`` but with separate weights at each of the ``output_size`` positions.

    ``input_size``, ``kernel_size``, ``stride`` and ``padding`` take an int or an
    (h, w) pair and are stored as pairs. Input (B, in_channels, *input_size) ->
    output (B, out_channels, *output_size). Example::

        layer = LocallyConnected2d(1, 16, input_size=8, kernel_size=3, padding=1)
        layer(torch.randn(4, 1, 8, 8)).shape  # (4, 16, 8, 8)

    Raises:
        ValueError: non-positive sizes, negative padding, a kernel larger than
            the padded input; at forward, an input of the wrong shape.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        input_size: int | tuple[int, int],
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        input_size, kernel_size = _pair(input_size, "input_size"), _pair(kernel_size, "kernel_size")
        stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
        _check_sizes(in_channels=in_channels, out_channels=out_channels, input_size=input_size,
                     kernel_size=kernel_size, stride=stride, padding=padding)
        padded = tuple(n + 2 * p for n, p in zip(input_size, padding))
        if any(k > n for k, n in zip(kernel_size, padded)):
            raise ValueError(
                f"kernel_size {kernel_size} is larger than the padded input size {padded} "
                f"(input_size {input_size} + 2 * padding {padding}): use a smaller kernel or more padding"
            )
        self.in_channels, self.out_channels, self.input_size = in_channels, out_channels, input_size
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.output_size = tuple(_windows(n, k, s) for n, k, s in zip(padded, kernel_size, stride))
        fan_in = in_channels * kernel_size[0] * kernel_size[1]
        self.weight = nn.Parameter(torch.empty(*self.output_size, out_channels, fan_in))
        self.bias = nn.Parameter(torch.empty(out_channels, *self.output_size)) if bias else None
        _init_uniform([self.weight, self.bias], fan_in)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, *self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"LocallyConnected2d expected input of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}: its weights are tied to one input size"
            )
        ph, pw = self.padding
        x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        return locally_connected_2d(x, self.weight, self.bias, self.kernel_size, self.stride)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, input_size={self.input_size}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"output_size={self.output_size}" + ("" if self.bias is not None else ", bias=False")
        )
