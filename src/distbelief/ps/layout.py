"""How the flat parameter vector is cut into shards.

The model's parameters are flattened (in `model.parameters()` order) into one
vector of `numel` floats; shard `s` holds the contiguous range
``ranges[s] = (start, end)``. Ranges are balanced to within one element.

With model parallelism the flat vector is the concatenation of the partitions'
parameters, and `by_partition` gives every partition shards of its own (no
shard straddles two partitions), so partition k pulls and pushes only
``layout.subset(groups[k])``: a layout of just its shards, with ranges relative
to the partition's own flat vector and ``ids`` naming the shards.

Example::

    layout = Layout.balanced(numel=10, shards=3)
    layout.ranges            # [(0, 4), (4, 7), (7, 10)]
    Layout.from_json(layout.to_json()) == layout
    layout, groups = Layout.by_partition([6, 4], shards=3)
    groups                   # [[0, 1], [2]]
    layout.subset(groups[1]).ranges   # [(0, 4)]; .ids == (2,)
"""

from __future__ import annotations

from dataclasses import dataclass

from distbelief.errors import UserError


@dataclass(frozen=True)
class Layout:
    numel: int
    ranges: tuple[tuple[int, int], ...]
    ids: tuple[int, ...] | None = None
    """The shards' ids when this is a subset of the job's shards (None: 0..shards-1)."""

    @property
    def shard_ids(self) -> tuple[int, ...]:
        return self.ids if self.ids is not None else tuple(range(len(self.ranges)))

    @classmethod
    def by_partition(cls, part_numels: list[int], shards: int) -> tuple[Layout, list[list[int]]]:
        """Shards laid out by partition: each partition gets shards of its own, in
        proportion to its parameters (at least one), its range balanced among them.

        Returns the job's layout and, per partition, the ids of its shards.
        """
        parts = len(part_numels)
        if shards < parts:
            raise UserError(f"--shards {shards} is fewer than --partitions {parts}: give at "
                            f"least one shard per partition (--shards {parts})")
        if min(part_numels) < 1:
            raise UserError("a partition holds no parameters: change --balance so every "
                            "partition gets a layer with parameters")
        counts = _proportional(part_numels, shards)
        ranges, groups, start, shard = [], [], 0, 0
        for numel, count in zip(part_numels, counts):
            sub = cls.balanced(numel, count)
            ranges.extend((start + a, start + b) for a, b in sub.ranges)
            groups.append(list(range(shard, shard + count)))
            start += numel
            shard += count
        return cls(start, tuple(ranges)), groups

    def subset(self, ids: list[int]) -> Layout:
        """The layout of the contiguous shards `ids`, ranges relative to the first one's start."""
        ids = list(ids)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"shards {ids} are not contiguous")
        base = self.ranges[ids[0]][0]
        ranges = tuple((a - base, b - base) for a, b in (self.ranges[i] for i in ids))
        return Layout(ranges[-1][1], ranges, tuple(ids))

    @classmethod
    def balanced(cls, numel: int, shards: int) -> Layout:
        """Contiguous ranges whose sizes differ by at most one element."""
        if shards < 1:
            raise ValueError(f"shards must be >= 1, got {shards}")
        if shards > numel:
            raise UserError(f"--shards {shards} is more than the model's {numel} parameters: "
                            f"use at most {numel} shards")
        return cls(numel, tuple(contiguous_ranges(numel, shards)))

    @property
    def shards(self) -> int:
        return len(self.ranges)

    def size(self, shard: int) -> int:
        start, end = self.ranges[shard]
        return end - start

    def to_json(self) -> dict:
        return {"numel": self.numel, "ranges": [list(r) for r in self.ranges],
                **({"ids": list(self.ids)} if self.ids is not None else {})}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        ids = data.get("ids")
        return cls(int(data["numel"]), tuple((int(a), int(b)) for a, b in data["ranges"]),
                   tuple(int(i) for i in ids) if ids is not None else None)


def contiguous_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """[0, n) cut into `parts` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for k in range(parts):
        end = start + base + (1 if k < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _proportional(sizes: list[int], total: int) -> list[int]:
    """`total` split in proportion to `sizes`, at least 1 each (largest remainder)."""
    spare = total - len(sizes)
    whole = sum(sizes)
    shares = [spare * s / whole for s in sizes]
    counts = [1 + int(x) for x in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
