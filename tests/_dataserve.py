"""Helpers of the data-server tests: a dataset factory that records which role loaded
it, and the one-process reference of an augmented Downpour/sync run."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from distbelief.config import AugmentConfig
from distbelief.data.augment import Augmenter, augment_generator
from distbelief.data.datasets import BatchStream, load_dataset, replica_indices
from distbelief.model.zoo import build_model

SEED, BATCH, LR = 3, 32, 0.1
AUGMENT = {"shift": 1, "crop": 1, "flip": True, "scale": 0.1, "noise": 0.05, "warp": 0.8}
COUNTING = "_dataserve:digits"  # --dataset digits, recording which role loads it


def digits() -> dict:
    """scikit-learn's digits exactly as ``--dataset digits``; appends the loading role's
    name to the file $DISTBELIEF_TEST_DATALOG names."""
    from sklearn.datasets import load_digits

    log = os.environ.get("DISTBELIEF_TEST_DATALOG")
    if log:
        with open(log, "a") as f:
            f.write(os.environ.get("DISTBELIEF_ROLE", "coordinator") + "\n")
    scans = load_digits()
    return {"x": (scans.images / 16.0).reshape(-1, 1, 8, 8), "y": scans.target}


def reference(augment: dict, steps: int, replicas: int = 1) -> list[torch.Tensor]:
    """One process: each replica's BatchStream batch of each step, augmented with the
    generator of (seed, replica, step), the replicas' batches combined; torch SGD (what
    one Downpour replica with n_fetch = n_push = 1, or synchronous replicas, compute)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: more threads only cost (a lot, on a busy host)
    try:
        return _train(augment, steps, replicas)
    finally:
        torch.set_num_threads(threads)


def _train(augment: dict, steps: int, replicas: int) -> list[torch.Tensor]:
    data = load_dataset("digits", seed=SEED)
    torch.manual_seed(SEED)
    model = build_model("mlp", data.input_shape, data.num_classes)
    aug = Augmenter(AugmentConfig(**augment), data.input_shape)
    streams = [BatchStream(data.x_train, data.y_train,
                           replica_indices(len(data.x_train), r, replicas, SEED), BATCH,
                           seed=SEED * 1000 + r) for r in range(replicas)]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(steps):
        xs, ys = [], []
        for r, stream in enumerate(streams):
            xb, yb = stream.next()
            xs.append(aug(xb, augment_generator(SEED, r, step)) if augment else xb)
            ys.append(yb)
        optimizer.zero_grad()
        F.cross_entropy(model(torch.cat(xs)), torch.cat(ys)).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]
