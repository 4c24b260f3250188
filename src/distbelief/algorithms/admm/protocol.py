"""What consensus ADMM's replicas and round closer say to each other through the store.

- ``admm/arrivals`` (a stream the closer consumes), records of two kinds:
  a contribution ``{"replica", "part", "gen", "seq", "based_on"}`` (x_i + u_i
  is in the replica's member vector on every shard of its partition; "part":
  None unpartitioned; "based_on": the round whose z its local steps started
  from; a partition adds "boundary", the residual of the boundary on its
  right), and a primal report ``{"replica", "part", "round", "primal_sq"}``
  (||x_i - z||^2 once it pulled the z of that round). A partitioned replica's
  contribution is complete once each of its partitions made its own.
- ``admm/in/<member>/g<gen>/<seq>``: the closer's answer to one contribution,
  ``{"round", "rho", "final"}``: it went into that round's mean, rho is the
  next round's, and "final" ends the replica's training.
- ``admm/final``: the job's last round closed.

On every shard, vector `member_vector(r)` holds replica r's latest contribution
(each one replaces the one before); a round's MEAN averages those of every
replica that contributed and is not lost.
"""

from __future__ import annotations

ARRIVALS = "admm/arrivals"
FINAL = "admm/final"
MEMBERS_BASE = 16  # shard vector of replica 0's contribution; replica r's is MEMBERS_BASE + r


def member_vector(replica: int) -> int:
    return MEMBERS_BASE + replica


def answer_key(member: str, generation: int, seq: int) -> str:
    """`member`: "3", or "3.1" for partition 1 of replica 3."""
    return f"admm/in/{member}/g{generation}/{seq}"
