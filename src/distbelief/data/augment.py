"""Random augmentation of training batches: a pure function of the batch and a generator.

The generator is seeded by (seed, replica, step) (`augment_generator`), so a
data server and a replica augmenting inline produce bit-identical batches, and a
stream can be taken up at any step. Signals are samples of shape (L,) or (C, L),
images (C, H, W); each knob of `AugmentConfig` that does not fit the samples'
shape is refused up front with one line. Only elementwise operations, gathers
and the generator's own draws are used, so the result does not depend on the
number of threads of the process that computes it.

The operations, in the order they are applied (each draws per-sample values):

- ``warp``: elastic distortion (Simard et al. 2003): a Gaussian random
  displacement field smoothed by ``warp_smooth`` passes of a [1, 2, 1]/4 filter,
  scaled so its largest displacement is ``warp``, resampled (linear/bilinear).
- ``shift``: roll by an offset in -shift..shift (images: along H and W).
- ``crop`` (images): pad by ``crop`` zeros, crop back to H x W at a random offset.
- ``flip`` (images): horizontal flip with probability 1/2.
- ``scale``: multiply by a factor in [1 - scale, 1 + scale].
- ``noise``: add Gaussian noise of standard deviation ``noise``.

Example::

    aug = Augmenter(AugmentConfig(shift=3, noise=0.05), input_shape=(1, 40))
    xb = aug(xb, augment_generator(seed=0, replica=1, step=17))  # xb itself is unchanged
"""

from __future__ import annotations

import numpy as np
import torch

from distbelief.config import AugmentConfig
from distbelief.errors import UserError

_SALT = 0x5EED_A06  # keeps these draws apart from the batch order's, which share the seed


def augment_generator(seed: int, replica: int, step: int) -> torch.Generator:
    """The generator of replica `replica`'s augmentation at `step` (a pure function)."""
    mixed = np.random.SeedSequence([seed, replica, step, _SALT]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(mixed[0]))


def sample_kind(shape: tuple[int, ...]) -> str:
    """"signal" for (L,) or (C, L) samples, "image" for (C, H, W), else "other"."""
    return {1: "signal", 2: "signal", 3: "image"}.get(len(shape), "other")


class Augmenter:
    """Applies an `AugmentConfig` to batches of samples of `input_shape`. Thread-safe.

    Raises UserError (at construction) when a knob does not fit the shape.
    """

    def __init__(self, cfg: AugmentConfig, input_shape: tuple[int, ...]):
        self.cfg, self.shape = cfg, tuple(int(s) for s in input_shape)
        self.kind = sample_kind(self.shape)
        self._check_fit()

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def _check_fit(self) -> None:
        c, shape = self.cfg, self.shape
        for name, value in (("flip", c.flip), ("crop", c.crop)):
            if value and self.kind != "image":
                raise UserError(f"augment.{name} applies to images (C, H, W), but the dataset's "
                                f"samples have shape {shape}: leave it out (signals take shift, "
                                "scale, noise and warp)")
        for name, value in (("shift", c.shift), ("warp", c.warp)):
            if value and self.kind == "other":
                raise UserError(f"augment.{name} applies to signals (L,) or (C, L) and images "
                                f"(C, H, W), but the dataset's samples have shape {shape}: "
                                "leave it out (scale and noise work on any shape)")
        spatial = shape[-1:] if self.kind == "signal" else shape[1:]
        smallest = min(spatial) if spatial else 0
        for name, value in (("shift", c.shift), ("crop", c.crop)):
            if value and value >= smallest:
                raise UserError(f"augment.{name} {value} must be smaller than the samples' "
                                f"size {smallest} (shape {shape}): give a smaller {name}")
        if c.warp and smallest < 2:
            raise UserError(f"augment.warp needs samples at least 2 long, but their shape is "
                            f"{shape}: leave it out")

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The augmented batch `x` (shape (n, *input_shape)); a new tensor."""
        c = self.cfg
        if not c.enabled:
            return x
        n = len(x)
        out = x.reshape(n, 1, -1) if len(self.shape) == 1 else x
        image = self.kind == "image"
        if c.warp:
            out = (_warp_image if image else _warp_signal)(out, c.warp, c.warp_smooth, g)
        if c.shift:
            out = (_roll_image if image else _roll_signal)(out, c.shift, g)
        if c.crop:
            out = _crop_image(out, c.crop, g)
        if c.flip:
            flips = torch.rand(n, generator=g) < 0.5
            out = torch.where(flips.view(n, 1, 1, 1), out.flip(-1), out)
        if c.scale:
            factor = (1.0 - c.scale) + (2.0 * c.scale) * torch.rand(n, generator=g)
            out = out * factor.view(n, *([1] * (out.dim() - 1)))
        if c.noise:
            out = out + c.noise * torch.randn(out.shape, generator=g)
        return out.reshape(x.shape)


def _offsets(n: int, most: int, g: torch.Generator) -> torch.Tensor:
    """n random integers in -most..most."""
    return torch.randint(-most, most + 1, (n,), generator=g)


def _roll_signal(x: torch.Tensor, most: int, g: torch.Generator) -> torch.Tensor:
    n, channels, length = x.shape
    k = _offsets(n, most, g)
    index = (torch.arange(length) - k[:, None]) % length  # out[t] = x[t - k]
    return x.gather(2, index[:, None, :].expand(n, channels, length))


def _roll_image(x: torch.Tensor, most: int, g: torch.Generator) -> torch.Tensor:
    n, channels, h, w = x.shape
    ky, kx = _offsets(n, most, g), _offsets(n, most, g)
    rows = (torch.arange(h) - ky[:, None]) % h
    cols = (torch.arange(w) - kx[:, None]) % w
    x = x.gather(2, rows[:, None, :, None].expand(n, channels, h, w))
    return x.gather(3, cols[:, None, None, :].expand(n, channels, h, w))


def _crop_image(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad`, then crop H x W at offsets in 0..2*pad (as torchvision's RandomCrop)."""
    n, channels, h, w = x.shape
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    rows = torch.arange(h) + oy[:, None] - pad
    cols = torch.arange(w) + ox[:, None] - pad
    inside = (((rows >= 0) & (rows < h))[:, None, :, None]
              & ((cols >= 0) & (cols < w))[:, None, None, :])
    x = x.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(n, channels, h, w))
    x = x.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(n, channels, h, w))
    return torch.where(inside, x, torch.zeros((), dtype=x.dtype))


def _smooth(t: torch.Tensor, dim: int) -> torch.Tensor:
    """One pass of a [1, 2, 1]/4 filter along `dim`, edges replicated."""
    size = t.shape[dim]
    padded = torch.cat([t.narrow(dim, 0, 1), t, t.narrow(dim, size - 1, 1)], dim)
    return (padded.narrow(dim, 0, size) + padded.narrow(dim, 2, size) + t * 2.0) * 0.25


def _field(shape: tuple[int, ...], dims: tuple[int, ...], passes: int,
           g: torch.Generator) -> torch.Tensor:
    field = torch.randn(shape, generator=g)
    for _ in range(passes):
        for dim in dims:
            field = _smooth(field, dim)
    return field


def _scale_to(fields: list[torch.Tensor], largest: float) -> list[torch.Tensor]:
    """Scale each sample's fields together so that their largest |value| is `largest`."""
    peak = torch.stack([f.abs().flatten(1).amax(1) for f in fields]).amax(0).clamp_min(1e-12)
    factor = (largest / peak).view(-1, *([1] * (fields[0].dim() - 1)))
    return [f * factor for f in fields]


def _warp_signal(x: torch.Tensor, largest: float, passes: int,
                 g: torch.Generator) -> torch.Tensor:
    n, channels, length = x.shape
    [shift] = _scale_to([_field((n, length), (1,), passes, g)], largest)
    pos = (torch.arange(length, dtype=x.dtype) + shift).clamp(0, length - 1)
    i0 = pos.floor().long().clamp(0, length - 2)
    weight = (pos - i0.to(x.dtype))[:, None, :]
    x0 = x.gather(2, i0[:, None, :].expand(n, channels, length))
    x1 = x.gather(2, (i0 + 1)[:, None, :].expand(n, channels, length))
    return x0 + weight * (x1 - x0)


def _warp_image(x: torch.Tensor, largest: float, passes: int,
                g: torch.Generator) -> torch.Tensor:
    n, channels, h, w = x.shape
    dy, dx = _scale_to([_field((n, h, w), (1, 2), passes, g),
                        _field((n, h, w), (1, 2), passes, g)], largest)
    py = (torch.arange(h, dtype=x.dtype)[:, None] + dy).clamp(0, h - 1)
    px = (torch.arange(w, dtype=x.dtype)[None, :] + dx).clamp(0, w - 1)
    y0 = py.floor().long().clamp(0, h - 2)
    x0 = px.floor().long().clamp(0, w - 2)
    wy = (py - y0.to(x.dtype)).view(n, 1, h * w)
    wx = (px - x0.to(x.dtype)).view(n, 1, h * w)
    flat = x.reshape(n, channels, h * w)

    def at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        index = (rows * w + cols).view(n, 1, h * w).expand(n, channels, h * w)
        return flat.gather(2, index)

    v00, v01, v10, v11 = at(y0, x0), at(y0, x0 + 1), at(y0 + 1, x0), at(y0 + 1, x0 + 1)
    top = v00 + wx * (v01 - v00)
    bottom = v10 + wx * (v11 - v10)
    return (top + wy * (bottom - top)).view(n, channels, h, w)
