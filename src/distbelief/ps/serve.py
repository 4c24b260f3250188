"""The shard role: serve one slice of the parameters until the job stops.

Publishes ``members/shard/<id>`` (by `run_role`), then ``shard<id>/up`` once its
buffers exist, and ``stats/shard<id>`` (versions, pushes, lost clients) when the
coordinator sets ``job/stop``. Writes its checkpoint file when the coordinator sets
``ckpt/write`` (see `distbelief.checkpoint`), and starts from the manifest's set
when the job resumes. A shard started to replace a lost one (``restart/shard<id>``
set) restores the last checkpoint, skips its predecessor's connection requests and
publishes its ``shard<id>/generation``, which tells the clients to connect again.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from distbelief.checkpoint import load_file, read_manifest, set_dir
from distbelief.ps.protocol import conn_counter
from distbelief.ps.layout import Layout
from distbelief.ps.shard import ShardServer
from distbelief.runtime.context import RoleContext
from distbelief.runtime.faults import fault


def run_shard(ctx: RoleContext, rule: bool = True) -> None:
    """Serve shard `ctx.ident` until the job stops. `rule`: whether pushes are applied with
    the job's update rule (False: the shard only serves pulls, sets and vector operations,
    and keeps no rule state)."""
    # the host's cores are shared by every process of the job, the shards among them: after
    # each update the OpenMP threads of a shard spin a while for more work, and threads
    # beyond its share take a core from the transfers and replicas that run meanwhile
    # (a 40 MB push and pull over gloo took 32 ms with 2 threads, 26 ms with 1)
    cluster = ctx.config.cluster
    processes = cluster.shards + cluster.replicas * ctx.config.model.partitions
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    layout = Layout.from_json(ctx.job["layout"])
    s, store = ctx.ident, ctx.store
    server = ShardServer(store, shard=s, numel=layout.size(s),
                         rule_cfg=(ctx.config.optimizer if rule
                                   else dataclasses.replace(ctx.config.optimizer, rule=None)),
                         timeout=ctx.config.cluster.timeout,
                         on_nonfinite=ctx.config.train.on_nonfinite,
                         total_updates=ctx.job.get("shard_updates"))
    restart = store.try_get_json(f"restart/shard{s}")  # this process replaces a lost shard
    manifest = read_manifest(ctx.job["run_dir"]) if restart else ctx.job.get("resume")
    if manifest is not None:  # continue from the last complete checkpoint
        server.restore(load_file(ctx.job["run_dir"], manifest, f"shard{s}.pt"))
    # the predecessor's connection requests are not ours to answer
    skip = store.add(conn_counter(s), 0) if restart else 0
    store.set_json(f"shard{s}/up", True)
    store.set_json(f"shard{s}/generation", restart["generation"] if restart else 0)
    written = manifest["checkpoint"] if manifest else 0
    next_report = 0.0

    def tick() -> None:
        """Write the checkpoint the coordinator asks for (see distbelief.checkpoint); publish
        the version now and then (what a restart from a checkpoint loses is measured by it)."""
        nonlocal written, next_report
        ctx.progress()  # one pass of the accept loop: the shard's main loop advances
        fault("shard.pass", f"shard{s}")
        number = store.try_get_json("ckpt/write") or 0
        if number > written:
            folder = set_dir(ctx.job["run_dir"], number)
            folder.mkdir(parents=True, exist_ok=True)
            info = server.save(folder / f"shard{s}.pt")
            store.set_json(f"ckpt/{number}/shard{s}", info)
            written = number
        if time.monotonic() >= next_report:
            store.set_json(f"version/shard{s}", server.version)
            next_report = time.monotonic() + 0.2

    try:
        server.serve(stop=ctx.stopping, tick=tick, skip_tickets=skip)
    finally:
        store.set_json(f"stats/shard{s}", server.stats())
