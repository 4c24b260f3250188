"""Test-only fault points: named places in the code where a test makes a role die,
hang or pause, deterministically, instead of killing it by timing luck.

Code marks a point with ``fault("staleness.tick.before", who=f"replica{r}")``.
Nothing happens unless the environment variable DISTBELIEF_FAULTS names it;
the job's processes inherit the variable from the test that starts the job.
Its value is a comma-separated list of rules ``POINT/WHO/N=ACTION``:

- POINT: the point's name; WHO: whose crossing counts ("replica1", "shard0";
  ``*`` for anyone); N: the crossing (1-based, counted per process) at which
  the action fires, ``*`` for every crossing.
- ACTION: ``exit`` (the process ends at once with status 86, as a kill would
  leave it: no clean-up, no goodbye), ``hang`` (the calling thread blocks for
  ever; the process's other threads run on), ``sleep:S`` (pause S seconds).

Example::

    DISTBELIEF_FAULTS="staleness.wait/replica1/2=exit,replica.step/replica0/5=hang"

Thread-safe. Unknown actions or malformed rules raise ValueError the first
time any point is crossed, so a typo in a test does not pass silently.
"""

from __future__ import annotations

import os
import threading
import time

ENV = "DISTBELIEF_FAULTS"
EXIT_STATUS = 86
"""The status a process ends with at an ``exit`` fault (tests tell it from a crash)."""

_lock = threading.Lock()
_counts: dict[tuple[str, str], int] = {}
_rules: list[tuple[str, str, str, str]] | None = None


def _parse(text: str) -> list[tuple[str, str, str, str]]:
    rules = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        target, sep, action = item.partition("=")
        fields = target.split("/")
        if not sep or len(fields) != 3 or not all(fields):
            raise ValueError(f"{ENV}: rule {item!r} is not POINT/WHO/N=ACTION")
        if not (action in ("exit", "hang") or action.startswith("sleep:")):
            raise ValueError(f"{ENV}: rule {item!r}: the action is exit, hang or sleep:S")
        rules.append((fields[0], fields[1], fields[2], action))
    return rules


def fault(point: str, who: str = "*") -> None:
    """Cross fault point `point` as `who`; acts only when DISTBELIEF_FAULTS names it."""
    global _rules
    text = os.environ.get(ENV)
    if not text:
        return
    with _lock:
        if _rules is None:
            _rules = _parse(text)
        n = _counts[(point, who)] = _counts.get((point, who), 0) + 1
        action = next((a for p, w, k, a in _rules
                       if p == point and w in ("*", who) and k in ("*", str(n))), None)
    if action is None:
        return
    if action == "exit":
        os._exit(EXIT_STATUS)
    if action == "hang":
        threading.Event().wait()
    time.sleep(float(action.split(":", 1)[1]))
