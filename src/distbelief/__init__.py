"""distbelief: DistBelief-style distributed training on PyTorch.

Downpour SGD against a sharded parameter server, run as a local cluster of
processes or one role per host. See `distbelief.train` and `distbelief train --help`.
"""

from distbelief.api import load_model, train
from distbelief.config import JobConfig
from distbelief.errors import UserError

__all__ = ["JobConfig", "UserError", "load_model", "train"]
__version__ = "0.1.0"
