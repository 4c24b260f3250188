"""What consensus ADMM's replicas and round closer say to each other through the store.

- ``admm/arrivals`` (a stream the closer consumes), records of two kinds:
  a contribution ``{"replica", "gen", "seq", "steps", "based_on"}`` (x_i + u_i
  is in the replica's member vector on every shard; "based_on": the round whose
  z its local steps started from), and a primal report
  ``{"replica", "round", "primal_sq"}`` (||x_i - z||^2 once it pulled the z of
  that round).
- ``admm/in/<replica>.<gen>/<seq>``: the closer's answer to one contribution,
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


def answer_key(replica: int, generation: int, seq: int) -> str:
    return f"admm/in/{replica}.{generation}/{seq}"
