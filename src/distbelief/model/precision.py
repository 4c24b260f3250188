"""Mixed precision (--precision): where a replica computes in bfloat16.

Only the forward pass (and the loss) runs under `torch.autocast`; the backward
pass follows the dtypes autocast chose, so the gradients of the float32
parameters are float32. The parameters, the update rule, the shards' master
copy and evaluation stay float32. Example::

    with autocast(cfg.train.precision, cfg.cluster.device):
        loss = task.loss(model(x), y)
    loss.backward()
"""

from __future__ import annotations

import torch


def autocast(precision: str, device: str = "cpu") -> torch.autocast:
    """The forward pass's context for --precision (fp32: autocast disabled) on `device`
    (cpu, cuda or cuda:N)."""
    return torch.autocast("cuda" if str(device).startswith("cuda") else "cpu",
                          dtype=torch.bfloat16, enabled=precision == "bf16")
