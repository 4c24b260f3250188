"""The "dual layers" split, one partition of a replica (the source notes, section 6).

With ``--partitions K`` (``--split layers``) each replica is K processes, one
per part of the network. Each runs a `layers.DualLayersPart`: every round it
takes ``--local-steps`` steps on its own weights and input rows without
waiting for its neighbours, then each boundary exchanges q_k and p_{k+1} once
over a pair of `model.pipeline.Link` channels (not per micro-batch, as the
pipeline does) and both sides update that boundary's dual. The part's weights
are at the same time a consensus variable across replicas (`ConsensusMember`):
it contributes W_k + u to its partition's shards, the round closer averages
the replicas' contributions shard by shard, and the part pulls its z_k. With
one replica this is a proximal term that keeps W_k near its last round's value.

A part stops only on an answer of the closer (every part of a replica gets the
same one), so the parts of a replica always exchange the same rounds.
Reports: the last part's loss (the job's task's; "train" events); every contribution
carries the residual of the boundary to its right (`DualLayersPart.boundary_residual`).
"""

from __future__ import annotations

import contextlib
from functools import partial
import time

import torch

from distbelief.algorithms.admm.consensus import ConsensusMember
from distbelief.algorithms.admm.layers import DualLayersConfig, DualLayersPart, touched_rows
from distbelief.algorithms.admm.protocol import member_vector
from distbelief.algorithms.slowdown import Slowdown
from distbelief.data.feed import replica_data_and_model
from distbelief.data.sampling import replica_indices
from distbelief.metrics.report import Reporter
from distbelief.model.flat import FlatModel
from distbelief.model.partition import PartitionPlan
from distbelief.model.pipeline import Link
from distbelief.ps.client import PSClient
from distbelief.ps.layout import Layout
from distbelief.ps.vectors import ZERO
from distbelief.runtime.channel import Channel
from distbelief.runtime.context import RoleContext
from distbelief.task import task_of


def run_partition(ctx: RoleContext) -> None:
    cfg, r, k = ctx.config, ctx.ident, ctx.part
    K = cfg.model.partitions
    torch.set_num_threads(cfg.cluster.threads_per_process(cfg.cluster.replicas * K))
    data, model = replica_data_and_model(ctx)
    plan = PartitionPlan.from_json(ctx.job["partition"])
    module = plan.part_module(model, k)
    del model  # a partition keeps only its own layers
    rows = replica_indices(len(data.train), r, cfg.cluster.replicas, cfg.train.seed)
    # this replica's rows only, in the partitions that read data (the first and the last)
    x_rows, y_rows = data.train.gather(rows) if k in (0, K - 1) else (None, None)
    steps = ctx.job["steps"]
    ctx.store.get_json("job/ready", what="the coordinator to initialise the shards")
    layout = Layout.from_json(ctx.job["layout"]).subset(ctx.job["partition"]["shards"][k])
    peers = ctx.store.clone()  # the boundary channels join through their own connection
    try:
        with PSClient(ctx.store, layout, f"replica{r}.part{k}", transport=cfg.cluster.transport,
                      timeout=cfg.cluster.timeout, grad_buffers=1) as ps, \
                _links(peers.raw, f"admm/replica{r}", k, K, cfg.cluster.timeout) as (left, right):
            flat = FlatModel(module, grads=1)
            member = ConsensusMember(ctx, ps, flat.params, generation=0)
            ps.vector(ZERO, member_vector(r)).wait(cfg.cluster.timeout)
            member.pull()
            flat.params.copy_(member.z)
            inputs = x_rows if k == 0 else left.recv()  # one pipelined forward
            a = cfg.admm
            config = DualLayersConfig(
                rho=a.boundary_rho, lr=cfg.optimizer.lr, lr_p=a.boundary_step,
                local_steps=a.local_steps, batch_size=min(cfg.data.batch_size, len(rows)),
                seed=cfg.train.seed * 1000 + r, weight_decay=cfg.optimizer.weight_decay,
                decay_rounds=steps // a.local_steps)
            part = DualLayersPart(module, k, K, inputs,
                                  targets=y_rows if k == K - 1 else None,
                                  config=config, regularizer=_consensus_pull(module, member),
                                  task=task_of(cfg))
            if right is not None:
                right.send(part.initial_output)
            if k == K - 1:
                ctx.store.append("events", {"event": "replica_joined", "time": _now(ctx),
                                            "replica": r})
            done = _rounds(ctx, part, member, left, right, steps)
            boundary_bytes = sum(link.bytes_sent for link in (left, right) if link is not None)
    finally:
        peers.close()
    ctx.store.set_json(f"done/replica{ctx.member}", {"steps": done,
                                                     "rounds_joined": member.joined,
                                                     "boundary_bytes": boundary_bytes,
                                                     "transport_bytes": ps.transport_bytes()})


def _rounds(ctx: RoleContext, part: DualLayersPart, member: ConsensusMember,
            left: Link | None, right: Link | None, steps: int) -> int:
    """Train round after round until the closer's answer ends it; returns the steps taken."""
    whole_name = PartitionPlan.from_json(ctx.job["partition"]).whole_name  # buffers' names
    report = Reporter.for_role(ctx, steps, enabled=part.is_last, module=part.module,
                               rename=partial(whole_name, ctx.part or 0))
    slow = Slowdown.for_worker(ctx.config, ctx.ident)
    step = 0
    while True:
        batches = part.batches()
        for batch in batches:
            with slow.compute():
                loss = part.local_step(batch)
            report.step(loss if loss is not None else 0.0, len(batch))
            report.maybe_log(step)
            step += 1
        rows = touched_rows(batches)
        out = part.outgoing(rows)
        if left is not None:
            left.send(out["left"])
        if right is not None:
            right.send(out["right"])
        part.incoming(rows, from_left=left.recv() if left is not None else None,
                      from_right=right.recv() if right is not None else None)
        member.contribute({"boundary": part.boundary_residual()})
        answer = member.await_answer()
        if answer is None or member.take(answer):
            break
    report.maybe_log(step - 1, force=True)
    return step


def _consensus_pull(module, member: ConsensusMember):
    """The regularizer that adds rho (W - z + u) to the weights' gradients."""
    params = [p for p in module.parameters() if p.requires_grad]

    def add() -> None:
        pull = (member.x - member.z + member.u).mul_(member.rho)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.add_(pull[offset: offset + n].view_as(p))
            offset += n
    return add


@contextlib.contextmanager
def _links(store, prefix: str, k: int, parts: int, timeout: float):
    """(left, right): the links of part k's boundaries (None at the ends). Blocks until the
    neighbours joined; both are closed on exit."""
    with contextlib.ExitStack() as stack:
        left = right = None
        # both sides of a boundary open its "q" channel first, then its "p" channel
        if k > 0:  # boundary k-1: this side receives q_{k-1} and sends p_k
            q = Channel(store, f"{prefix}/b{k - 1}/q", 1, timeout)
            p = Channel(store, f"{prefix}/b{k - 1}/p", 0, timeout)
            left = stack.enter_context(Link(recv=q, send=p, name=f"{prefix}/b{k - 1}",
                                            timeout=timeout))
        if k < parts - 1:  # boundary k: this side sends q_k and receives p_{k+1}
            q = Channel(store, f"{prefix}/b{k}/q", 0, timeout)
            p = Channel(store, f"{prefix}/b{k}/p", 1, timeout)
            right = stack.enter_context(Link(recv=p, send=q, name=f"{prefix}/b{k}",
                                             timeout=timeout))
        yield left, right


def _now(ctx: RoleContext) -> float:
    return time.time() - ctx.job["start_time"]
