"""The one list of training algorithms. Adding one: its module, plus one line here.

The first one listed is the default. Importing this module is cheap (no torch):
each algorithm imports its heavy parts when a role or the coordinator runs it.
"""

from __future__ import annotations

from distbelief.algorithms.admm import Admm
from distbelief.algorithms.base import Algorithm
from distbelief.algorithms.downpour import Downpour
from distbelief.algorithms.easgd import Easgd
from distbelief.algorithms.hogwild import Hogwild
from distbelief.algorithms.sandblaster import Sandblaster
from distbelief.algorithms.sync import Sync
from distbelief.errors import UserError

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Downpour(),
    Sync(),
    Sandblaster(),
    Hogwild(),
    Admm(),
    Easgd(),
)}
DEFAULT_ALGORITHM = next(iter(ALGORITHMS))


def get_algorithm(name: str) -> Algorithm:
    """The algorithm called `name`; UserError naming the choices when there is none."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise UserError(f"--algorithm {name!r} is not one of {', '.join(ALGORITHMS)}: "
                        "pick one of those") from None
