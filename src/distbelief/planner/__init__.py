"""Choosing the strategy automatically: ``distbelief plan`` and ``--strategy auto``.

The planner profiles the job's model and data on this host, enumerates the
layouts the registered algorithms accept (`candidates`), predicts each one's
samples/s and memory with a cost model of pure functions (`cost`), and runs the
most promising for a few seconds each through the real launcher (`trials`),
choosing by how fast the training loss falls (`plan`). Example::

    from distbelief.planner import make_plan
    plan = make_plan(cfg, fixed={"data.dataset", "model.name"})
    print(plan.choice.name, plan.why)
"""

from distbelief.planner.links import Hardware, parse_bandwidth, parse_memory
from distbelief.planner.plan import Plan, host_commands, make_plan

__all__ = ["Hardware", "Plan", "host_commands", "make_plan", "parse_bandwidth", "parse_memory"]
