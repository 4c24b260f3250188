"""A small decoder-only (GPT-style) transformer for ``--task sequence``: ``--model transformer``.

Inputs are token ids of shape (B, T), given as floats (the data layer's inputs
are float32; `distbelief.data.text` gives byte values 0..255) and cast to int64
here; the output is logits (B, T, V). Built as an ``nn.Sequential`` of
``Embed`` (token embedding + learned positions), ``layers`` pre-norm ``Block``
modules (causal self-attention, then a 4x MLP, each with a residual), and
``Head`` (final LayerNorm + linear to the vocabulary), so that model
parallelism by layers (``--partitions 2 --split layers``) can cut it between
any two of them. Position t's logits depend on inputs 0..t only. Example::

    model = transformer(seq_len=128, vocab=256, layers=2, width=128, heads=4)
    logits = model(torch.randint(0, 256, (8, 128)).float())   # (8, 128, 256)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distbelief.errors import UserError

__all__ = ["Embed", "Block", "Head", "transformer", "parse_spec", "DEFAULTS"]

DEFAULTS = (2, 128, 4)
"""(layers, width, heads) of plain ``transformer``."""


class Embed(nn.Module):
    """Token ids (B, T) (any dtype holding integers) -> embeddings (B, T, width), token plus
    learned position, for sequences up to ``seq_len``."""

    def __init__(self, vocab: int, width: int, seq_len: int):
        super().__init__()
        self.vocab = vocab
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(seq_len, width))
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long().clamp_(0, self.vocab - 1)  # float inputs: ids are exact below 2**24
        return self.token(ids) + self.position[: ids.shape[1]]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)) (causal), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(w, dim=2)
        q, k, v = (z.view(b, t, self.heads, w // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(self.norm2(x))


class Head(nn.Module):
    """Final LayerNorm and a linear map to the vocabulary: (B, T, width) -> (B, T, vocab)."""

    def __init__(self, width: int, vocab: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def transformer(seq_len: int, vocab: int, layers: int = DEFAULTS[0], width: int = DEFAULTS[1],
                heads: int = DEFAULTS[2]) -> nn.Sequential:
    """``Embed``, ``layers`` x ``Block``, ``Head`` as one ``nn.Sequential`` (see the module
    docstring). Weights come from torch's global generator.

    Raises:
        UserError: a size below 1, or a width not divisible by the heads.
    """
    for name, value in (("layers", layers), ("width", width), ("heads", heads),
                        ("sequence length", seq_len), ("vocabulary", vocab)):
        if value < 1:
            raise UserError(f"transformer: {name} must be at least 1, got {value}")
    if width % heads:
        raise UserError(f"transformer: width {width} is not divisible by {heads} heads: "
                        f"choose a width that is a multiple of the heads, e.g. {heads * 32}")
    return nn.Sequential(Embed(vocab, width, seq_len),
                         *(Block(width, heads) for _ in range(layers)),
                         Head(width, vocab))


def parse_spec(spec: str) -> tuple[int, int, int] | None:
    """``(layers, width, heads)`` of ``transformer`` or ``transformer:LAYERS:WIDTH:HEADS``
    (trailing values may be left out: ``transformer:4`` is 4 layers of the default width);
    None for another model's spec.

    Raises:
        UserError: a ``transformer:`` spec whose sizes are not integers.
    """
    name, _, rest = spec.partition(":")
    if name != "transformer":
        return None
    parts = rest.split(":") if rest else []
    if len(parts) > 3:
        raise UserError(f"model {spec!r}: give at most transformer:LAYERS:WIDTH:HEADS")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise UserError(f"model {spec!r}: sizes must be integers, as in transformer:2:128:4 "
                        "(LAYERS:WIDTH:HEADS)") from None
    return tuple(values + list(DEFAULTS[len(values):]))  # type: ignore[return-value]
