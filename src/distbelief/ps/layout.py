"""How the flat parameter vector is cut into shards.

The model's parameters are flattened (in `model.parameters()` order) into one
vector of `numel` floats; shard `s` holds the contiguous range
``ranges[s] = (start, end)``. Ranges are balanced to within one element.

Example::

    layout = Layout.balanced(numel=10, shards=3)
    layout.ranges            # [(0, 4), (4, 7), (7, 10)]
    Layout.from_json(layout.to_json()) == layout
"""

from __future__ import annotations

from dataclasses import dataclass

from distbelief.errors import UserError


@dataclass(frozen=True)
class Layout:
    numel: int
    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def balanced(cls, numel: int, shards: int) -> Layout:
        """Contiguous ranges whose sizes differ by at most one element."""
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if shards > numel:
            raise UserError(f"--shards {shards} is more than the model's {numel} parameters: "
                            f"use at most {numel} shards")
        base, extra = divmod(numel, shards)
        ranges, start = [], 0
        for s in range(shards):
            end = start + base + (1 if s < extra else 0)
            ranges.append((start, end))
            start = end
        return cls(numel, tuple(ranges))

    @property
    def shards(self) -> int:
        return len(self.ranges)

    def size(self, shard: int) -> int:
        start, end = self.ranges[shard]
        return end - start

    def to_json(self) -> dict:
        return {"numel": self.numel, "ranges": [list(r) for r in self.ranges]}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        return cls(int(data["numel"]), tuple((int(a), int(b)) for a, b in data["ranges"]))
