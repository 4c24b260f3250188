"""How the flat parameter vector is cut into shards.

The model's parameters are flattened (in `model.parameters()` order) into one
vector of `numel` floats; shard `s` holds the contiguous range
``ranges[s] = (start, end)``. Ranges are balanced to within one element.

Project Adam's layout (``--shard-layout chunks``, `Layout.chunked`) cuts the
vector into chunks of ``--chunk-bytes`` instead and hashes them to the shards
(`distbelief.ps.chunks`): shard `s` then holds the list of segments
``segments(s)`` (its chunks, in parameter order, adjacent ones merged), and its
slice is their concatenation. ``ranges`` is empty for such a layout; code that
moves slices goes through `segments`, which gives a range layout's one range.

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
    chunked = Layout.chunked(numel=12, shards=2, chunk_numel=2)
    chunked.segments(0)      # ((4, 10),): chunks 2, 3, 4
    chunked.segments(1)      # ((0, 4), (10, 12)): chunks 0, 1, 5; its slice is their concatenation
"""

from __future__ import annotations

from dataclasses import dataclass

from distbelief.config import DEFAULT_CHUNK_BYTES, SHARD_LAYOUTS, ClusterConfig, choice
from distbelief.errors import UserError
from distbelief.ps import chunks as C


@dataclass(frozen=True)
class Chunks:
    """A chunk layout's shards: what each one holds."""

    numel: int
    """Floats per chunk (``chunk_bytes / 4``); the last chunk of a range may be shorter."""
    counts: tuple[int, ...]
    """Chunks per shard."""
    segments: tuple[tuple[tuple[int, int], ...], ...]
    """Per shard, its (start, end) segments of the flat vector in parameter order."""


@dataclass(frozen=True)
class Layout:
    numel: int
    ranges: tuple[tuple[int, int], ...]
    ids: tuple[int, ...] | None = None
    """The shards' ids when this is a subset of the job's shards (None: 0..shards-1)."""
    chunks: Chunks | None = None
    """Set for a chunk layout (then `ranges` is empty); None for contiguous ranges."""

    @property
    def shard_ids(self) -> tuple[int, ...]:
        return self.ids if self.ids is not None else tuple(range(self.shards))

    @property
    def kind(self) -> str:
        return "ranges" if self.chunks is None else "chunks"

    def segments(self, shard: int) -> tuple[tuple[int, int], ...]:
        """The (start, end) pieces of the flat vector shard `shard` holds, in the order
        they are concatenated in its slice (a range layout: its one range)."""
        if self.chunks is None:
            return (self.ranges[shard],)
        return self.chunks.segments[shard]

    @classmethod
    def chunked(cls, numel: int, shards: int, chunk_numel: int) -> Layout:
        """Chunks of `chunk_numel` floats hashed to `shards` shards with bounded loads
        (`distbelief.ps.chunks`). UserError when there are fewer chunks than shards."""
        if shards > numel:
            cls.balanced(numel, shards)  # the same one-line UserError
        return cls._chunked([numel], [list(range(shards))], chunk_numel)

    @classmethod
    def _chunked(cls, numels: list[int], groups: list[list[int]], chunk_numel: int,
                 what: str = "the model") -> Layout:
        """Each range of `numels` (one after the other) chunked over its group of shards."""
        shards = sum(len(g) for g in groups)
        counts, segments, base = [0] * shards, [()] * shards, 0
        for k, (numel, group) in enumerate(zip(numels, groups)):
            n = C.check(numel, chunk_numel, len(group),
                        what if len(numels) == 1 else f"partition {k}")
            owners = C.assign(n, group)
            for i, segs in enumerate(C.segments(numel, chunk_numel, owners, len(group), base)):
                counts[group[i]] = owners.count(i)
                segments[group[i]] = tuple(segs)
            base += numel
        return cls(base, (), None, Chunks(chunk_numel, tuple(counts), tuple(segments)))

    @classmethod
    def by_partition(cls, part_numels: list[int], shards: int,
                     chunk_numel: int | None = None) -> tuple[Layout, list[list[int]]]:
        """Shards laid out by partition: each partition gets shards of its own, in
        proportion to its parameters (at least one), its range balanced among them
        (with `chunk_numel`: its range cut in chunks hashed to its own shards).

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
        if chunk_numel is not None:
            firsts = [sum(counts[:k]) for k in range(parts)]
            groups = [list(range(a, a + n)) for a, n in zip(firsts, counts)]
            return cls._chunked(list(part_numels), groups, chunk_numel), groups
        ranges, groups, start, shard = [], [], 0, 0
        for numel, count in zip(part_numels, counts):
            sub = cls.balanced(numel, count)
            ranges.extend((start + a, start + b) for a, b in sub.ranges)
            groups.append(list(range(shard, shard + count)))
            start += numel
            shard += count
        return cls(start, tuple(ranges)), groups

    def subset(self, ids: list[int]) -> Layout:
        """The layout of the contiguous shards `ids`, ranges relative to the first one's start
        (a chunk layout: shards that together hold one contiguous range, a partition's)."""
        ids = list(ids)
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise ValueError(f"shards {ids} are not contiguous")
        if self.chunks is not None:
            return self._chunk_subset(ids)
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

    def _chunk_subset(self, ids: list[int]) -> Layout:
        pieces = sorted(seg for i in ids for seg in self.chunks.segments[i])
        base, numel = pieces[0][0], sum(b - a for a, b in pieces)
        if pieces[-1][1] - base != numel:
            raise ValueError(f"shards {ids} do not hold one contiguous range")
        segments = tuple(tuple((a - base, b - base) for a, b in self.chunks.segments[i])
                         for i in ids)
        counts = tuple(self.chunks.counts[i] for i in ids)
        return Layout(numel, (), tuple(ids), Chunks(self.chunks.numel, counts, segments))

    @property
    def shards(self) -> int:
        return len(self.ranges) if self.chunks is None else len(self.chunks.segments)

    def size(self, shard: int) -> int:
        """The number of floats shard `shard` holds."""
        return sum(end - start for start, end in self.segments(shard))

    def describe(self) -> dict:
        """The layout in numbers, for summary.json: kind, chunks, bytes per shard and the
        largest shard's bytes over the smallest's."""
        sizes = [4 * self.size(s) for s in range(self.shards)]
        return {"kind": self.kind,
                "chunks": sum(self.chunks.counts) if self.chunks else None,
                "chunk_bytes": 4 * self.chunks.numel if self.chunks else None,
                "shard_bytes": sizes,
                "balance": max(sizes) / min(sizes) if min(sizes) > 0 else None}

    def to_json(self) -> dict:
        if self.chunks is not None:
            return self._chunks_json()
        return {"numel": self.numel, "ranges": [list(r) for r in self.ranges],
                **({"ids": list(self.ids)} if self.ids is not None else {})}

    def _chunks_json(self) -> dict:
        return {"numel": self.numel, "kind": "chunks", "chunk_numel": self.chunks.numel,
                "counts": list(self.chunks.counts),
                "segments": [[list(seg) for seg in segs] for segs in self.chunks.segments],
                **({"ids": list(self.ids)} if self.ids is not None else {})}

    @classmethod
    def from_json(cls, data: dict) -> Layout:
        ids = data.get("ids")
        ids = tuple(int(i) for i in ids) if ids is not None else None
        if data.get("kind") == "chunks":
            segments = tuple(tuple((int(a), int(b)) for a, b in segs)
                             for segs in data["segments"])
            chunks = Chunks(int(data["chunk_numel"]), tuple(int(n) for n in data["counts"]),
                            segments)
            return cls(int(data["numel"]), (), ids, chunks)
        return cls(int(data["numel"]), tuple((int(a), int(b)) for a, b in data["ranges"]),
                   ids)


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


def validate_layout_options(c: ClusterConfig) -> None:
    """UserError naming a bad --shard-layout or --chunk-bytes (before any process starts)."""
    choice("shard_layout", c.shard_layout, SHARD_LAYOUTS, "--shard-layout")
    if c.chunk_bytes < 4 or c.chunk_bytes % 4:
        raise UserError(f"--chunk-bytes must be a positive multiple of 4 (float32), got "
                        f"{c.chunk_bytes}: try {DEFAULT_CHUNK_BYTES} (1 MB, Project Adam's)")
    if c.shard_layout == "ranges" and c.chunk_bytes != DEFAULT_CHUNK_BYTES:
        raise UserError(f"--chunk-bytes {c.chunk_bytes} applies to --shard-layout chunks "
                        "only: add --shard-layout chunks or leave --chunk-bytes out")
