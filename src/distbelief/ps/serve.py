"""The shard role: serve one slice of the parameters until the job stops.

Publishes ``members/shard/<id>`` (by `run_role`), then ``shard<id>/up`` once its
buffers exist, and ``stats/shard<id>`` (versions, pushes, lost clients) when the
coordinator sets ``job/stop``. Writes its checkpoint file when the coordinator sets
``ckpt/write`` (see `distbelief.checkpoint`), and starts from the manifest's set
when the job resumes.
"""

from __future__ import annotations

import os

import torch

from distbelief.checkpoint import load_file, set_dir
from distbelief.ps.layout import Layout
from distbelief.ps.shard import ShardServer
from distbelief.runtime.role import RoleContext


def run_shard(ctx: RoleContext) -> None:
    # a shard's work comes in bursts (one update per push) while its clients wait for the
    # answer, so it may use this host's cores between the shards
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.config.cluster.shards))
    layout = Layout.from_json(ctx.job["layout"])
    server = ShardServer(ctx.store, shard=ctx.ident, numel=layout.size(ctx.ident),
                         rule_cfg=ctx.config.optimizer, timeout=ctx.config.cluster.timeout,
                         on_nonfinite=ctx.config.train.on_nonfinite)
    resume = ctx.job.get("resume")
    if resume is not None:  # continue from the last complete checkpoint
        server.restore(load_file(ctx.job["run_dir"], resume, f"shard{ctx.ident}.pt"))
    ctx.store.set_json(f"shard{ctx.ident}/up", True)
    written = resume["checkpoint"] if resume else 0

    def write_checkpoint() -> None:
        """Write the set the coordinator asks for (see distbelief.checkpoint)."""
        nonlocal written
        number = ctx.store.try_get_json("ckpt/write") or 0
        if number > written:
            folder = set_dir(ctx.job["run_dir"], number)
            folder.mkdir(parents=True, exist_ok=True)
            info = server.save(folder / f"shard{ctx.ident}.pt")
            ctx.store.set_json(f"ckpt/{number}/shard{ctx.ident}", info)
            written = number

    try:
        server.serve(stop=ctx.stopping, tick=write_checkpoint)
    finally:
        ctx.store.set_json(f"stats/shard{ctx.ident}", server.stats())
