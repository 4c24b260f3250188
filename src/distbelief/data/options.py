"""Checks of the data options (data servers, prefetch, augmentation), before any process starts.

Torch-free: it runs when the command line is read. Whether an augmentation
fits the data's shape is checked once the data is loaded (`data.augment.Augmenter`).
"""

from __future__ import annotations

import math
from typing import Any

from distbelief.config import DataConfig, at_least
from distbelief.errors import UserError


def validate_data_options(cfg: Any) -> None:
    """UserError naming the first bad value of cfg.data, cfg.augment and the data servers."""
    c, a = cfg.cluster, cfg.augment
    at_least("--data-servers", c.data_servers, 0, "use 0 to let each replica load its data")
    at_least("--prefetch", cfg.data.prefetch, 1, "let at least one batch be in flight")
    if c.data_servers == 0 and cfg.data.prefetch != DataConfig().prefetch:
        raise UserError(f"--prefetch {cfg.data.prefetch} applies to data servers only: "
                        "add --data-servers 1 (or more) or leave --prefetch out")
    if c.data_servers and cfg.model.partitions > 1:
        raise UserError(f"--data-servers {c.data_servers} feeds unpartitioned replicas "
                        f"only, but --partitions is {cfg.model.partitions}: use "
                        "--partitions 1 or leave --data-servers out (augmentation still "
                        "works inline)")
    for name, value in (("shift", a.shift), ("crop", a.crop)):
        at_least(f"augment.{name}", value, 0, "give a number of samples or pixels, 0 for none")
    if not 0 <= a.scale < 1:
        raise UserError(f"augment.scale must be in [0, 1), got {a.scale}: the factor is "
                        "drawn from [1 - scale, 1 + scale]; try 0.1")
    for name, value in (("noise", a.noise), ("warp", a.warp)):
        if not 0 <= value < math.inf:
            raise UserError(f"augment.{name} must be a finite number >= 0, got {value}: "
                            "use 0 for none")
    at_least("augment.warp_smooth", a.warp_smooth, 1, "try 4")
