"""The shard role: serve one slice of the parameters until the job stops.

Publishes ``members/shard/<id>`` (by `run_role`), then ``shard<id>/up`` once its
buffers exist, and ``stats/shard<id>`` (versions, pushes, lost clients) when the
coordinator sets ``job/stop``.
"""

from __future__ import annotations

import os

import torch

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
    ctx.store.set_json(f"shard{ctx.ident}/up", True)
    try:
        server.serve(stop=ctx.stopping)
    finally:
        ctx.store.set_json(f"stats/shard{ctx.ident}", server.stats())
