"""distbelief: DistBelief-style distributed training on PyTorch.

Downpour SGD, synchronous averaging and Sandblaster L-BFGS against a sharded
parameter server, with model-parallel replicas, run as a local cluster of
processes or one role per host. See `distbelief.train`, `distbelief.predict` and
`distbelief train --help`.
"""

from distbelief.api import load_model, train
from distbelief.config import JobConfig
from distbelief.errors import UserError
from distbelief.inference import predict

__all__ = ["JobConfig", "UserError", "load_model", "predict", "train"]
__version__ = "0.1.0"
