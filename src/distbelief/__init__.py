"""distbelief: DistBelief-style distributed training on PyTorch.

Downpour SGD, synchronous averaging and Sandblaster L-BFGS against a sharded
parameter server, with model-parallel replicas, run as a local cluster of
processes or one role per host. See `distbelief.train`, `distbelief.plan` (choose
the strategy), `distbelief.predict` and `distbelief train --help`.
"""

from distbelief.job import JobConfig
from distbelief.errors import UserError

__all__ = ["JobConfig", "UserError", "load_model", "plan", "predict", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # torch is imported on first use, so that `distbelief train` can start its role
    # launcher (runtime/zygote.py) before its own imports, and the two overlap
    if name in ("train", "load_model", "plan"):
        from distbelief import api

        return getattr(api, name)
    if name == "predict":
        from distbelief.inference import predict

        return predict
    raise AttributeError(f"module 'distbelief' has no attribute {name!r}")
