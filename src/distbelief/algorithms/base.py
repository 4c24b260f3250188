"""The interface every training algorithm implements, and what the coordinator lends it.

An algorithm is one module or folder under `distbelief.algorithms` with one
`Algorithm` subclass, listed once in `algorithms.registry`. The generic code
(config, command line, role dispatch, coordinator, watch loop, summary) asks
it, never its name:

- **config**: `section`, the dataclass of its own TOML table (its fields are
  command-line options, their help the string under each field); `honours`,
  the shared fields it uses (any other one set to a non-default value is
  refused, with `refusal_fixes` saying what to do instead); `defaults` for the
  shared fields it leaves unset; `validate` and `resolve`.
- **launch**: `parameters` ("served": parameter-server shards; "shared": one
  tensor in this host's memory, which also makes it one host only);
  `run_replica`, the entry point of its replica (worker) processes; `replicas`.
- **the coordinator**: either the generic watch loop (with `start` and a
  per-job `Poller` as hooks) or its own `drive` (Sandblaster's L-BFGS driver).
- **failures**: `lost_replica`: None counts a lost replica (or restarts it
  with ``--restart-replicas`` where honoured); a sentence ends the job.
- **results**: `summary`, the fields it adds to ``summary.json``, and
  `summary_config`, the settings it records there.
- **planning** (`distbelief plan`, ``--strategy auto``): `exchange`, how one of
  its replica steps moves parameters (the planner's cost model reads it, never
  the name); `plan_variants`, settings of its own worth trying; `replicas_option`,
  the flat option that sets how many replica processes it runs.

Example, a trivial algorithm (one module plus one registry line): plain
asynchronous SGD, Downpour's replica at a fetch and a push every step::

    class Asgd(Algorithm):
        name = "asgd"
        title = "asynchronous SGD: a fetch and a push every step, plain SGD in the shards"
        honours = COMMON | SERVED | RULE | BATCHES | REPORTS
        defaults = {"optimizer.rule": "sgd", "optimizer.lr": 0.05, "train.on_nonfinite": "skip"}
        role_modules = ("distbelief.algorithms.downpour.replica",)

        def run_replica(self, ctx) -> None:
            from distbelief.algorithms.downpour.replica import run_replica

            run_replica(ctx)

Nothing here imports torch: the command line reads the registry for ``--help``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from distbelief.runtime.context import RoleContext
    from distbelief.runtime.store import JobStore


def _fields(section: str, names: str) -> frozenset[str]:
    return frozenset(f"{section}.{n}" for n in names.split())


# Groups of shared fields, to spell `Algorithm.honours` with.
COMMON = (_fields("data", "dataset num_samples seq_len val_fraction") | _fields("model", "name")
          | _fields("train", "steps seed eval_every run_dir tensorboard init_from")
          | _fields("cluster", "host port timeout progress_timeout token_file threads")
          | _fields("optimizer", "lr") | _fields("task", "name loss metrics"))
"""Used by every algorithm."""
REPORTS = _fields("train", "log_every on_nonfinite")
"""Workers that report every few steps (`metrics.report.Reporter`) and skip a NaN/inf step
or stop the job on it (Sandblaster's driver reports every iteration and cannot skip)."""
SERVED = _fields("cluster", "replicas shards transport slow_worker shard_layout chunk_bytes")
"""The parameter server and its replicas."""
RULE = _fields("optimizer", "rule momentum nesterov beta1 beta2 eps weight_decay lr_schedule "
                            "warmup_steps lr_step_every lr_gamma clip_grad_norm")
"""An update rule (L-BFGS takes none)."""
BATCHES = _fields("data", "batch_size") | _fields("train", "epochs")
"""Training on a stream of mini-batches, counted in epochs."""
DATA_SERVING = (_fields("cluster", "data_servers") | _fields("data", "prefetch")
                | _fields("augment", "shift scale noise flip crop warp warp_smooth"))
"""Data servers and augmentation of the batch stream."""
MIXED = _fields("train", "precision")
"""Replicas that compute their own forward and backward passes (--precision)."""
QUORUM = _fields("cluster", "sync_fraction")
"""Rounds or steps that complete on the fastest fraction of the replicas (Project Adam)."""
PARTITIONS = _fields("model", "partitions split balance micro_batches")
"""Model parallelism: a replica cut into partitions."""


@dataclass(frozen=True, kw_only=True)
class Exchange:
    """What one replica step costs besides its compute, for the planner's cost model
    (`distbelief.planner.cost`). Fractions are of the model's parameters; steps are a
    replica's mini-batch steps (Sandblaster's: one portion)."""

    pull: float = 0.0
    """Parameters a replica fetches per step (Downpour: 1/n_fetch)."""
    push: float = 0.0
    """Parameters (or gradients) it sends per step."""
    allreduce: bool = False
    """The gradients are all-reduced across the replicas every step."""
    quorum: bool = False
    """Every step (or round) waits for the fastest ceil(F*R) replicas (--sync-fraction F)."""
    rounds_every: int = 1
    """Steps between two such waits (ADMM: its local steps)."""
    shard_rule: bool = False
    """The shards apply the update rule to every pushed element."""
    local_rule: bool = False
    """The replica applies the update rule to its own copy every step."""
    rule_state: int = 0
    """Tensors of update-rule state (per parameter) where the rule runs."""
    shared: bool = False
    """One parameter tensor in this host's memory (no transfer at all)."""
    full_batch: bool = False
    """Iterations over the whole training set (a step is a portion of one)."""
    store_ops: float = 0.0
    """Round trips to the job store per step (claiming work, announcing results)."""
    poll_seconds: float = 0.0
    """A wait on the store polled this often each step (half of it lost on average)."""
    local_passes: float = 0.0
    """Passes over the parameters per step besides the update rule (ADMM's proximal pull)."""


RULE_STATE = {"sgd": 0, "momentum": 1, "adagrad": 1, "adam": 2, "adamw": 2, None: 0}
"""Tensors of state per parameter each update rule keeps."""


@dataclass
class Watch:
    """What the coordinator knows about the replicas while they train.

    The watch loop fills it from the replicas' events; an algorithm that drives
    itself (`Algorithm.drive`) fills it as it goes. Coordinator thread only.
    """

    replicas: int
    done: set[int] = field(default_factory=set)
    lost: set[int] = field(default_factory=set)
    steps: dict[int, int] = field(default_factory=dict)
    last: dict[int, dict] = field(default_factory=dict)
    samples: int = 0
    dropped: int = 0  # late gradients a synchronous step did not wait for
    restarts: dict[int, int] = field(default_factory=dict)  # replacements started, by replica
    shards_lost: list[dict] = field(default_factory=list)  # shards restarted from a checkpoint
    dataservers_lost: list[dict] = field(default_factory=list)  # data servers replaced
    nonfinite: int = 0  # NaN/inf losses or steps the replicas reported
    last_event: float = field(default_factory=time.monotonic)
    extra: dict = field(default_factory=dict)  # the algorithm's own statistics
    note: str | None = None  # the algorithm's own words on the progress line

    @property
    def finished(self) -> bool:
        return len(self.done | self.lost) == self.replicas

    @property
    def leading_step(self) -> int:
        return max(self.steps.values(), default=0)


@dataclass
class Coordination:
    """What the coordinator lends an algorithm's coordinator-side hooks.

    `ps` is the coordinator's parameter-server client (None for shared
    parameters); the callables write a metrics event, show a message above the
    progress line, redraw the progress line (`show(step, loss=..., samples_per_second=...)`),
    tell whether replica r was lost, describe how it ended, wait for store keys
    (JobFailed when a role exits first or on timeout) and evaluate the current
    parameters on the split the run watches (`watched`: "val" with --val-fraction, else
    "test"; its metrics are events' ``<watched>_<metric>`` fields).
    """

    config: Any
    store: JobStore
    ps: Any
    watch: Watch
    start_time: float
    write_event: Callable[[dict], None]
    message: Callable[[str], None]
    show: Callable[..., None]
    is_lost: Callable[[int], bool]
    exit_detail: Callable[[int], str]
    wait_for: Callable[[list[str], str], None]
    evaluate: Callable[[], dict[str, float]]
    watched: str = "test"
    resume: dict | None = None
    """The manifest of the checkpoint the job continues from (None: a new job)."""


class Poller:
    """An algorithm's part of the generic watch loop, for one job. Coordinator thread only.

    The loop calls `poll` on every pass and `wait` between passes (instead of
    sleeping: an algorithm with work to do at once, such as closing an ADMM
    round, returns early). A checkpoint's manifest records `checkpoint_state()`
    under "algorithm_state"; the loop calls `close` when it ends, however it ends.
    """

    def poll(self, watch: Watch) -> None:
        """One pass's work (e.g. trimming old store keys)."""

    def wait(self, seconds: float) -> None:
        """Block until the next pass: `seconds`, or less when there is work."""
        time.sleep(seconds)

    def checkpoint_state(self) -> dict:
        """What a checkpoint must hold of this object's state (JSON)."""
        return {}

    def close(self) -> None:
        """The loop ended (normally or not)."""


class Algorithm:
    """One way of training; see the module docstring. Subclasses set the class attributes."""

    name: ClassVar[str]
    title: ClassVar[str]
    """One line for ``--help``: what it is."""
    section: ClassVar[type | None] = None
    honours: ClassVar[frozenset[str]] = COMMON
    defaults: ClassVar[dict[str, Any]] = {}
    """Shared fields (dotted) it fills when the user left them unset."""
    computed_defaults: ClassVar[dict[str, str]] = {}
    """Shared fields `resolve` fills when unset -> their default in words, for ``--help``."""
    refusal_fixes: ClassVar[dict[str, str]] = {}
    """Shared fields it refuses -> what to do instead (default: leave it out)."""
    parameters: ClassVar[str] = "served"
    shard_rule: ClassVar[bool] = True
    """Served parameters: the shards apply pushes with the job's update rule (False: the
    shards only hold vectors, e.g. ADMM's consensus, and keep no rule state)."""
    role_modules: ClassVar[tuple[str, ...]] = ()
    """Modules its replicas import: the role launcher imports them once, up front."""
    replica_noun: ClassVar[str] = "replica"
    """How messages name one of its replica processes."""
    replica_kind: ClassVar[str] = "replica"
    """Their kind in ``cluster.json``."""
    lost_replica: ClassVar[str | None] = None

    # ---- config -----------------------------------------------------------

    def validate(self, cfg: Any) -> None:
        """Check its own section and its combinations with shared ones; UserError if bad."""

    def resolve(self, data: dict) -> None:
        """Fill defaults that are computed, in the config's dict form (after `defaults`)."""

    # ---- launch -----------------------------------------------------------

    def replicas(self, cfg: Any) -> int:
        """The replica (worker) processes of one job, per partition."""
        return cfg.cluster.replicas

    def steps(self, cfg: Any, train_samples: int) -> int:
        """Steps (or iterations) each replica runs."""
        from distbelief.algorithms.schedule import steps_per_replica

        return steps_per_replica(steps=cfg.train.steps, epochs=cfg.train.resolved_epochs,
                                 train_samples=train_samples, replicas=self.replicas(cfg),
                                 batch_size=cfg.data.batch_size)

    def shard_updates(self, cfg: Any, steps: int) -> int:
        """The pushes a parameter shard applies in a whole job of `steps` steps per replica
        (one per replica step unless the algorithm says otherwise): the total by which
        --lr-schedule linear and cosine end at the shards."""
        return self.replicas(cfg) * steps

    def progress_total(self, cfg: Any, steps: int) -> int:
        """What the progress bar counts to."""
        return steps * self.replicas(cfg)

    def run_replica(self, ctx: RoleContext) -> None:
        """The body of a replica (worker) process. Blocks until its work is done."""
        raise NotImplementedError

    # ---- the coordinator --------------------------------------------------

    drives_itself: ClassVar[bool] = False
    """True: the coordinator calls `drive` instead of its watch loop."""
    trains_buffers: ClassVar[bool] = True
    """Its workers publish their modules' buffers (BatchNorm's running statistics) for the
    coordinator to average (`distbelief.model.buffers`); False: a model with buffers is
    refused."""

    def drive(self, co: Coordination) -> None:
        """Run the job from the coordinator until it ends, filling `co.watch`."""
        raise NotImplementedError

    def start(self, co: Coordination) -> None:
        """Before the watch loop, once every replica registered (a start barrier)."""

    def poller(self, co: Coordination) -> Poller | None:
        """Its part of the watch loop for one job (None: nothing to do but watch)."""
        return None

    def on_replica_lost(self, store: JobStore, replica: int) -> None:
        """A replica was lost and the others go on: release whatever waits for it."""

    # ---- planning ---------------------------------------------------------

    replicas_option: ClassVar[str] = "replicas"
    """The flat option that sets how many replica (worker) processes it runs."""

    def exchange(self, cfg: Any) -> Exchange:
        """How one replica step of this config moves parameters (cfg resolved)."""
        raise NotImplementedError

    def plan_variants(self, cfg: Any) -> tuple[dict[str, Any], ...]:
        """Flat options of its own worth trying on top of a layout (the planner crosses them
        with replicas, shards, partitions and data servers); ({},): only its defaults."""
        return ({},)

    # ---- results ----------------------------------------------------------

    def summary(self, cfg: Any, watch: Watch, done: list[dict]) -> dict:
        """Fields it adds to ``summary.json`` (`done`: each replica's final report)."""
        return {self.name: watch.extra} if watch.extra else {}

    def summary_config(self, cfg: Any) -> dict:
        """Its settings, recorded under ``summary.json``'s "config"."""
        return dataclasses.asdict(getattr(cfg, self.name)) if self.section else {}
