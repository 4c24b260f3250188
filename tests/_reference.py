"""The single-process oracle: the digits MLP trained by torch.optim on the batches one
replica (or one Hogwild worker) of a job with this seed draws."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from distbelief.data.datasets import BatchStream, load_dataset, replica_indices, split_validation
from distbelief.model.precision import autocast
from distbelief.model.zoo import build_model


def one_process_parameters(make_optimizer: Callable[[list], torch.optim.Optimizer],
                           steps: int, batch_size: int, seed: int,
                           clip: float | None = None, val_fraction: float = 0.0,
                           precision: str = "fp32") -> list[torch.Tensor]:
    """The MLP's parameters after `steps` steps of `make_optimizer(parameters)` in this
    process, on replica 0's stream of a one-replica job seeded `seed`; `clip`: each
    step's gradients clipped by torch.nn.utils.clip_grad_norm_ first; `val_fraction`: the
    job's --val-fraction (the rows it holds out are not trained on); `precision`: the
    forward pass under the job's --precision (`distbelief.model.precision.autocast`)."""
    data = split_validation(load_dataset("digits", seed=seed), val_fraction, seed)
    torch.manual_seed(seed)
    model = build_model("mlp", data.input_shape, data.num_classes)
    indices = replica_indices(len(data.x_train), 0, 1, seed)
    stream = BatchStream(data.x_train, data.y_train, indices, batch_size, seed=seed * 1000)
    optimizer = make_optimizer(list(model.parameters()))
    for _ in range(steps):
        xb, yb = stream.next()
        optimizer.zero_grad()
        with autocast(precision):
            loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]
