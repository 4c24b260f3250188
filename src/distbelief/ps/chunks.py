"""Project Adam's chunked shards: fixed-size chunks of the flat vector, hashed to shards.

Project Adam (Chilimbi et al., OSDI 2014) cut the parameters into ~1 MB chunks
and spread the chunks over the parameter servers by hashing, instead of giving
each server one contiguous range. `assign` does that with rendezvous
(highest-random-weight) hashing **with bounded loads**:

- every chunk ranks the shards by a weight ``blake2b(chunk, shard)`` (the same
  in every process: Python's own `hash()` is salted per process, so it is not
  used), its preference order;
- chunks are placed in index order, each on the first shard of its preference
  order that still has room, where a shard has room while it holds fewer than
  ``floor(n / S)`` chunks, or exactly that many and fewer than ``n mod S``
  shards hold one more (a cap of ``ceil(mean)`` chunks, the bounded-loads
  scheme with its epsilon at the smallest value that always leaves room).

So shards hold ``q`` or ``q + 1`` of the ``n`` chunks (``q = n // S``) and, as
only the very last chunk may be shorter, the largest shard holds at most
less than ``(q + 1) / (q - 1)`` times the bytes of the smallest: at most 1.2
once every shard gets 11 chunks or more (>= 44 chunks over 4 shards), 1.09 for
100 chunks over 4 shards. Plain hashing (each chunk to its first preference)
of 100 chunks over 4 shards gives a median ratio of 1.46 and meets 1.2 about
one time in ten.

Example::

    owners = assign(chunks=10, shard_ids=[0, 1, 2])   # e.g. [2, 0, 1, 1, 0, ...]
    segments(numel=10, chunk_numel=1, owners=owners, shards=3, base=0)
    # per shard: its chunks as (start, end) of the flat vector, adjacent ones merged
"""

from __future__ import annotations

import hashlib
from typing import Sequence

from distbelief.errors import UserError

MAX_CHUNKS = 1 << 16
"""More chunks than this make the layout and every pull slow (one copy per segment)."""


def count(numel: int, chunk_numel: int) -> int:
    """Chunks of `chunk_numel` floats that cover `numel` floats (the last may be shorter)."""
    return -(-numel // chunk_numel)


def weight(chunk: int, shard: int) -> int:
    """The rendezvous weight of `shard` for `chunk`: a 64-bit blake2b digest, the same in
    every process and on every host."""
    digest = hashlib.blake2b(f"chunk{chunk}/shard{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def preference(chunk: int, shard_ids: Sequence[int]) -> list[int]:
    """Indices into `shard_ids`, the shard `chunk` prefers most first (ties: lower index)."""
    return sorted(range(len(shard_ids)), key=lambda i: (-weight(chunk, shard_ids[i]), i))


def assign(chunks: int, shard_ids: Sequence[int]) -> list[int]:
    """The owner (an index into `shard_ids`) of each of `chunks` chunks, by rendezvous
    hashing with bounded loads (see the module doc): every shard gets ``chunks // S``
    or one more. Deterministic; needs ``chunks >= len(shard_ids)``."""
    shards = len(shard_ids)
    if chunks < shards:
        raise ValueError(f"{chunks} chunks cannot fill {shards} shards")
    floor, extra = divmod(chunks, shards)
    loads = [0] * shards
    above = 0  # shards that hold floor + 1 chunks
    owners = []
    for chunk in range(chunks):
        for i in preference(chunk, shard_ids):
            if loads[i] < floor or (loads[i] == floor and above < extra):
                break
        above += loads[i] == floor
        loads[i] += 1
        owners.append(i)
    return owners


def segments(numel: int, chunk_numel: int, owners: Sequence[int], shards: int,
             base: int = 0) -> list[list[tuple[int, int]]]:
    """Per shard, the (start, end) of its chunks in parameter order, offset by `base`;
    adjacent chunks of one shard are merged into one segment."""
    out: list[list[tuple[int, int]]] = [[] for _ in range(shards)]
    for chunk, owner in enumerate(owners):
        start = base + chunk * chunk_numel
        end = base + min(numel, (chunk + 1) * chunk_numel)
        mine = out[owner]
        if mine and mine[-1][1] == start:
            mine[-1] = (mine[-1][0], end)
        else:
            mine.append((start, end))
    return out


def check(numel: int, chunk_numel: int, shards: int, what: str = "the model") -> int:
    """The number of chunks, or UserError when they cannot fill the shards or are too many."""
    n = count(numel, chunk_numel)
    chunk_bytes = 4 * chunk_numel
    if n < shards:
        raise UserError(f"--chunk-bytes {chunk_bytes} cuts {what}'s {numel} parameters into "
                        f"{n} chunks, fewer than its {shards} shards: use --chunk-bytes "
                        f"{4 * max(1, numel // shards)} or less, or fewer --shards")
    if n > MAX_CHUNKS:
        least = 4 * count(numel, MAX_CHUNKS)
        raise UserError(f"--chunk-bytes {chunk_bytes} cuts {what}'s {numel} parameters into "
                        f"{n} chunks, more than {MAX_CHUNKS}: use --chunk-bytes {least} or more")
    return n
