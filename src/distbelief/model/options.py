"""Checks of the model options (partitions, split, balance, micro-batches), before any
process starts. Torch-free: it runs when the command line is read."""

from __future__ import annotations

from distbelief.config import SPLITS, ModelConfig, at_least, choice
from distbelief.errors import UserError
from distbelief.model.balance import parse_balance


def validate_model_options(m: ModelConfig, shards: int, batch_size: int) -> None:
    """UserError naming the first bad value of the [model] section."""
    k = m.partitions
    at_least("--partitions", k, 1, "use 1 for unpartitioned replicas")
    choice("split", m.split, SPLITS, "--split")
    if k > shards:
        raise UserError(f"--shards {shards} is fewer than --partitions {k}: "
                        "shards are laid out by partition, so give at least one shard per "
                        f"partition (--shards {k})")
    if m.balance is not None:
        parse_balance(m.balance)
        if k == 1 or m.split != "layers":
            raise UserError(f"--balance {m.balance} applies to --split layers with "
                            "--partitions of 2 or more: leave it out or use them")
    if m.micro_batches is not None:
        at_least("--micro-batches", m.micro_batches, 1, "use 1 for no pipelining")
        if m.micro_batches > 1 and (k == 1 or m.split != "layers"):
            raise UserError(f"--micro-batches {m.micro_batches} applies to --split layers "
                            "with --partitions of 2 or more (the pipeline): leave it out")
        if m.micro_batches > batch_size:
            raise UserError(f"--micro-batches {m.micro_batches} is more than --batch-size "
                            f"{batch_size}: each micro-batch needs at least one sample")
