"""Typed configuration of a job: one dataclass per component, loaded from TOML.

A config file mirrors the dataclasses: top-level ``algorithm`` and one table per
component::

    algorithm = "downpour"
    [cluster]
    replicas = 2
    shards = 2
    [downpour]
    n_fetch = 1
    n_push = 1
    [optimizer]
    rule = "adagrad"
    lr = 0.02
    [data]
    dataset = "mnist1d"
    batch_size = 64
    [model]
    name = "cnn"
    [train]
    epochs = 4
    [augment]            # optional: random augmentation of every batch
    shift = 3

Sections that belong to one algorithm (``[downpour]``, ``[sync]``,
``[sandblaster]``, ``[hogwild]``) and the options that mean nothing for the chosen algorithm
(an update rule for L-BFGS, a fetch cadence for synchronous training) are
refused when set to anything but their default, rather than silently ignored.

Every value is checked by `JobConfig.validate`, which raises `UserError` with one
line naming the offending value and the fix. `JobConfig.resolved` then fills the
values whose default depends on the algorithm (the rule, the learning rate,
the number of portions).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from distbelief.errors import UserError

ALGORITHMS = ("downpour", "sync", "sandblaster", "hogwild")
RULES = ("sgd", "momentum", "adagrad", "adam")
LINE_SEARCHES = ("strong_wolfe", "none")
SPLITS = ("layers", "units")
ON_NONFINITE = ("skip", "stop")
MICRO_BATCHES_PER_STAGE = 1  # pipeline micro-batches per partition when --micro-batches is unset
DEFAULT_RULE, DEFAULT_LR, DEFAULT_LBFGS_LR = "adagrad", 0.02, 1.0
DEFAULT_HOGWILD_RULE = "sgd"
DEFAULT_ITERATIONS = 50  # L-BFGS iterations when --steps is not given
PORTIONS_PER_WORKER = 8  # Sandblaster's default number of portions per worker
TRANSPORTS = ("auto", "shm", "gloo")
SHARD_LAYOUTS = ("ranges", "chunks")
DEFAULT_CHUNK_BYTES = 1 << 20  # Project Adam's ~1 MB chunks
HOGWILD_RULES = ("sgd", "momentum", "adagrad")  # elementwise, no shared step count
DEFAULT_EPOCHS = 4.0


@dataclass(kw_only=True)
class ClusterConfig:
    replicas: int = 2
    """Model replicas (data parallelism); each trains on its own part of the data."""
    shards: int = 2
    """Parameter-server shards; each holds a slice of the parameters and its update rule's state."""
    host: str = "127.0.0.1"
    """Address the coordinator's store binds to (local mode binds loopback only)."""
    port: int = 0
    """The coordinator's port; 0 picks a free one."""
    transport: str = "auto"
    """How tensors move between replica and shard: shm (same host), gloo (TCP), auto (shm when on one host)."""
    timeout: float = 120.0
    """Seconds any single wait (connect, pull, push, join) may block before the job fails."""
    slow_worker: str | None = None
    """ID:FACTOR makes replica (worker) ID FACTOR times slower by sleeping in proportion to its compute (tests, benchmarks)."""
    restart_replicas: bool = False
    """Start a replacement for a lost replica (downpour, local cluster); it joins through the store, pulls fresh parameters and goes on with the lost one's remaining steps."""
    threads: int | None = None
    """Torch threads of each replica (or partition) process; default: this host's cores shared among them."""
    shard_layout: str = "ranges"
    """How parameters are cut into shards: ranges (one contiguous range per shard) or chunks (Project Adam: chunk_bytes pieces hashed to the shards with bounded loads)."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Bytes per chunk with shard_layout = chunks (a positive multiple of 4: float32)."""
    data_servers: int = 0
    """Data-serving processes (Project Adam) that read, shuffle and augment the data and stream ready batches to the replicas; 0: each replica loads its data itself."""

    def threads_per_process(self, processes: int) -> int:
        """The compute threads one of `processes` replica processes on this host should use."""
        if self.threads is not None:
            return self.threads
        return max(1, (os.cpu_count() or 1) // processes)

    @property
    def slowdown(self) -> tuple[int, float] | None:
        """The parsed slow_worker, (id, factor), or None."""
        if self.slow_worker is None:
            return None
        ident, _, factor = self.slow_worker.partition(":")
        return int(ident), float(factor)


@dataclass(kw_only=True)
class DownpourConfig:
    n_fetch: int = 1
    """A replica fetches fresh parameters every n_fetch steps."""
    n_push: int = 1
    """A replica pushes its accumulated gradient every n_push steps."""
    warm_start_steps: int = 0
    """Replica 0 trains alone for this many steps before the other replicas join."""
    replica_workers: int = 1
    """Threads of a replica (Project Adam): each takes its own batches, adds its gradient into the push buffer and applies it to the replica's local copy with plain SGD, lock-free; a step is one batch per thread."""


@dataclass(kw_only=True)
class SyncConfig:
    fraction: float = 1.0
    """A step completes once the fastest fraction of the replicas reported; the rest are dropped (Project Adam)."""


@dataclass(kw_only=True)
class SandblasterConfig:
    portions: int | None = None
    """Pieces the training data is cut into for each gradient evaluation (default 8 per worker)."""
    backups: bool = True
    """Hand idle workers backup copies of the portions still outstanding; the first answer wins."""
    push_every: int = 4
    """A worker sends its accumulated gradient to the shards every this many accepted portions."""
    history: int = 10
    """L-BFGS history size: the (s, y) pairs the shards keep."""
    line_search: str = "strong_wolfe"
    """strong_wolfe, or none (a fixed step of lr)."""
    tolerance_grad: float = 1e-7
    """Stop when the largest gradient component is at most this."""
    tolerance_change: float = 1e-9
    """Stop when the loss or the step changes by less than this."""


@dataclass(kw_only=True)
class HogwildConfig:
    workers: int = 2
    """Processes on this host that update one shared parameter tensor without locks (Hogwild!)."""


@dataclass(kw_only=True)
class OptimizerConfig:
    rule: str | None = None
    """Update rule: sgd, momentum, adagrad or adam (default adagrad; L-BFGS takes none)."""
    lr: float | None = None
    """Learning rate (default 0.02 for the rules; 1.0, the L-BFGS step scale, for sandblaster)."""
    momentum: float = 0.9
    """Momentum factor (rule momentum only)."""
    beta1: float = 0.9
    """Adam's first-moment decay (rule adam only)."""
    beta2: float = 0.999
    """Adam's second-moment decay (rule adam only)."""
    eps: float | None = None
    """Numerical epsilon; None means the rule's PyTorch default (adagrad 1e-10, adam 1e-8)."""
    weight_decay: float = 0.0
    """L2 penalty added to the gradient inside the shard."""


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "mnist1d"
    """digits, mnist1d, synthetic, a PATH.npz (arrays x, y) or MODULE:FUNCTION."""
    batch_size: int = 64
    """Samples per replica step."""
    num_samples: int | None = None
    """Samples to generate for mnist1d/synthetic (None: the dataset's default)."""
    prefetch: int = 4
    """Batches a data server may have in flight to one replica (sent, not yet trained on); bounds their memory."""


@dataclass(kw_only=True)
class AugmentConfig:
    """Random augmentation of each training batch, off by default (`distbelief.data.augment`).

    Signals are samples of shape (L,) or (C, L); images (C, H, W). Every draw
    comes from a generator seeded by (seed, replica, step), so a data server and
    a replica augmenting inline produce the same batches.
    """

    shift: int = 0
    """Signals and images: roll each sample by a random offset in -shift..shift (images: along H and W)."""
    scale: float = 0.0
    """Multiply each sample by a random factor in [1 - scale, 1 + scale]."""
    noise: float = 0.0
    """Add Gaussian noise with this standard deviation."""
    flip: bool = False
    """Images: flip each sample horizontally with probability 1/2."""
    crop: int = 0
    """Images: pad by this many zero pixels on every side, then crop back to H x W at a random offset."""
    warp: float = 0.0
    """Signals and images: elastic distortion; the largest displacement, in samples or pixels (Simard et al. 2003)."""
    warp_smooth: int = 4
    """Passes of a [1, 2, 1]/4 filter smoothing the random displacement field: more passes give smoother distortions and cost proportionally more."""

    @property
    def enabled(self) -> bool:
        return bool(self.shift or self.scale or self.noise or self.flip or self.crop or self.warp)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "cnn"
    """mlp, cnn, lcnn, speech, or MODULE:FACTORY returning an nn.Module."""
    partitions: int = 1
    """Processes per model replica (model parallelism); each holds part of the model."""
    split: str = "layers"
    """How a replica is cut: layers (contiguous layers per partition, pipelined) or units (every Linear by output units, every locally connected layer spatially)."""
    balance: str | None = None
    """Layers per partition for split = layers, e.g. "3,2" (default: balanced by measured compute time and parameter bytes)."""
    micro_batches: int | None = None
    """Micro-batches a batch is cut into for the pipeline (split = layers; default one per partition, at most the batch size)."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int | None = None
    """Steps per replica; mutually exclusive with epochs."""
    epochs: float | None = None
    """Passes over the training data (all replicas together); default 4 when steps is unset."""
    seed: int = 0
    """Seed of model initialisation, data split and shuffling."""
    eval_every: int = 0
    """Evaluate the test split every K steps of the leading replica; 0 = only at the end."""
    log_every: int = 10
    """Replicas report loss and staleness every this many steps."""
    run_dir: str | None = None
    """Directory for config, metrics, checkpoint and plots; default runs/<algorithm>-<time>."""
    checkpoint_every: str | None = None
    """Write a checkpoint every N steps of the leading replica ("200") or every N seconds ("60s"); `--resume RUN_DIR` continues from the last one."""
    on_nonfinite: str = "skip"
    """A gradient (or loss) with NaN/inf: skip (refuse it, count it, go on) or stop (end the job with a clear error)."""

    @property
    def resolved_epochs(self) -> float | None:
        """The epochs to run: as given, DEFAULT_EPOCHS when neither steps nor epochs is set."""
        if self.steps is None and self.epochs is None:
            return DEFAULT_EPOCHS
        return self.epochs


@dataclass(kw_only=True)
class JobConfig:
    algorithm: str = "downpour"
    """Training algorithm: downpour, sync, sandblaster or hogwild."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    downpour: DownpourConfig = field(default_factory=DownpourConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    sandblaster: SandblasterConfig = field(default_factory=SandblasterConfig)
    hogwild: HogwildConfig = field(default_factory=HogwildConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    # ---- conversion -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> JobConfig:
        """Build a config from nested dicts, refusing unknown keys and wrong types."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a table of settings, got {type(data).__name__}")
        kwargs: dict[str, Any] = {}
        sections = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in data.items():
            if key not in sections:
                raise UserError(
                    f"{source}: unknown key {key!r}; valid keys are {', '.join(sections)}")
            f = sections[key]
            if key == "algorithm":
                kwargs[key] = _coerce(value, str, f"{source}: algorithm")
                continue
            section_cls = f.default_factory  # type: ignore[misc]
            kwargs[key] = _section_from_dict(section_cls, value, f"{source}: [{key}]")
        return cls(**kwargs)

    def with_overrides(self, overrides: dict[str, Any]) -> JobConfig:
        """Return a copy with ``{"section.field": value}`` overrides applied (None = keep)."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            if value is None:
                continue
            if isinstance(value, _Unset):
                value = None
            if "." in dotted:
                section, name = dotted.split(".", 1)
                data[section][name] = value
            else:
                data[dotted] = value
        return JobConfig.from_dict(data, source="options")

    def to_toml(self) -> str:
        """The resolved config as TOML (None values are left out: they mean 'default')."""
        return tomli_w.dumps(_drop_none(self.to_dict()))

    # ---- validation -------------------------------------------------------

    def validate(self) -> JobConfig:
        """Check every value; raise UserError naming the first bad one and the fix."""
        c, d, o, t = self.cluster, self.downpour, self.optimizer, self.train
        _choice("algorithm", self.algorithm, ALGORITHMS, "--algorithm")
        self._refuse_foreign_options()
        if o.rule is not None:
            _choice("rule", o.rule, RULES, "--rule")
        _choice("transport", c.transport, TRANSPORTS, "--transport")
        _choice("on_nonfinite", t.on_nonfinite, ON_NONFINITE, "--on-nonfinite")
        if t.checkpoint_every is not None:
            from distbelief.checkpoint import parse_every

            parse_every(t.checkpoint_every)
        _at_least("--replicas", c.replicas, 1, "give at least one model replica")
        _at_least("--shards", c.shards, 1, "give at least one parameter shard")
        if c.threads is not None:
            _at_least("--threads", c.threads, 1, "leave it out to share this host's cores")
        _at_least("--n-fetch", d.n_fetch, 1, "fetch at least every step (1) or less often (>1)")
        _at_least("--n-push", d.n_push, 1, "push at least every step (1) or less often (>1)")
        _at_least("--warm-start-steps", d.warm_start_steps, 0, "use 0 to start all replicas together")
        _at_least("--batch-size", self.data.batch_size, 1, "use a positive batch size")
        _at_least("--eval-every", t.eval_every, 0, "use 0 to evaluate only at the end")
        _at_least("--log-every", t.log_every, 1, "report at least every step (1)")
        if not 0 <= c.port <= 65535:
            raise UserError(f"--port must be in 0..65535, got {c.port}: use 0 for a free port")
        if not 0 < c.timeout < math.inf:
            raise UserError(f"--timeout must be a finite number of seconds > 0, got {c.timeout}: "
                            "try 120")
        if o.lr is not None and not 0 < o.lr < math.inf:
            raise UserError(f"--lr must be a finite number > 0, got {o.lr}: "
                            "try 0.02 for adagrad, 1e-3 for adam")
        if not 0 <= o.momentum < math.inf:
            raise UserError(f"--momentum must be >= 0, got {o.momentum}: try 0.9")
        if not 0 <= o.weight_decay < math.inf:
            raise UserError(f"--weight-decay must be >= 0, got {o.weight_decay}: use 0 for none")
        for name, beta in (("beta1", o.beta1), ("beta2", o.beta2)):
            if not 0 <= beta < 1:
                raise UserError(f"optimizer.{name} must be in [0, 1), got {beta}: "
                                "try 0.9 for beta1, 0.999 for beta2")
        if o.eps is not None and not 0 <= o.eps < math.inf:
            raise UserError(f"optimizer.eps must be >= 0, got {o.eps}: "
                            "leave it out for the rule's default")
        if t.steps is not None and t.epochs is not None:
            raise UserError(f"train.steps = {t.steps} and train.epochs = {t.epochs} are both set: "
                            "give either steps or epochs, not both")
        if t.steps is not None and t.steps < 1:
            raise UserError(f"--steps must be >= 1, got {t.steps}: give the steps per replica")
        if t.epochs is not None and not 0 < t.epochs < math.inf:
            raise UserError(f"--epochs must be a finite number > 0, got {t.epochs}: "
                            f"try {DEFAULT_EPOCHS:g}")
        if d.warm_start_steps and t.steps is not None and d.warm_start_steps >= t.steps:
            raise UserError(
                f"--warm-start-steps {d.warm_start_steps} must be smaller than --steps {t.steps}: "
                "lower --warm-start-steps or raise --steps")
        if self.data.num_samples is not None and self.data.num_samples < 10:
            raise UserError(f"--num-samples must be >= 10, got {self.data.num_samples}: "
                            "leave it out for the dataset's own size")
        self._validate_cluster_extras()
        self._validate_shard_layout()
        self._validate_sync_and_sandblaster()
        self._validate_partitions()
        self._validate_workers()
        self._validate_data_serving()
        return self

    def _validate_workers(self) -> None:
        """Hogwild's workers, and Downpour's threads per replica."""
        _at_least("--workers", self.hogwild.workers, 1, "give at least one worker process")
        t = self.downpour.replica_workers
        _at_least("--replica-workers", t, 1, "use 1 for one gradient at a time per replica")
        if t > 1 and self.model.partitions > 1:
            raise UserError(f"--replica-workers {t} does not work with --partitions "
                            f"{self.model.partitions}: the threads share one whole local copy; "
                            "use --replica-workers 1 or --partitions 1")
        rule = self.optimizer.rule
        if self.algorithm == "hogwild" and rule is not None and rule not in HOGWILD_RULES:
            raise UserError(f"--rule {rule} does not work with --algorithm hogwild: its bias "
                            "correction needs one step count shared by every update, which "
                            f"lock-free workers do not keep; use {', '.join(HOGWILD_RULES)}")

    def _validate_data_serving(self) -> None:
        c, a = self.cluster, self.augment
        _at_least("--data-servers", c.data_servers, 0, "use 0 to let each replica load its data")
        _at_least("--prefetch", self.data.prefetch, 1, "let at least one batch be in flight")
        if c.data_servers == 0 and self.data.prefetch != DataConfig().prefetch:
            raise UserError(f"--prefetch {self.data.prefetch} applies to data servers only: "
                            "add --data-servers 1 (or more) or leave --prefetch out")
        if c.data_servers and self.model.partitions > 1:
            raise UserError(f"--data-servers {c.data_servers} feeds unpartitioned replicas "
                            f"only, but --partitions is {self.model.partitions}: use "
                            "--partitions 1 or leave --data-servers out (augmentation still "
                            "works inline)")
        for name, value in (("shift", a.shift), ("crop", a.crop)):
            _at_least(f"augment.{name}", value, 0, "give a number of samples or pixels, 0 for none")
        if not 0 <= a.scale < 1:
            raise UserError(f"augment.scale must be in [0, 1), got {a.scale}: the factor is "
                            "drawn from [1 - scale, 1 + scale]; try 0.1")
        for name, value in (("noise", a.noise), ("warp", a.warp)):
            if not 0 <= value < math.inf:
                raise UserError(f"augment.{name} must be a finite number >= 0, got {value}: "
                                "use 0 for none")
        _at_least("augment.warp_smooth", a.warp_smooth, 1, "try 4")

    def _validate_partitions(self) -> None:
        m, k = self.model, self.model.partitions
        _at_least("--partitions", k, 1, "use 1 for unpartitioned replicas")
        _choice("split", m.split, SPLITS, "--split")
        if k > 1 and self.algorithm != "downpour":
            raise UserError(f"--partitions {k} works with --algorithm downpour only: "
                            f"{self.algorithm} runs unpartitioned replicas; use --partitions 1 "
                            "or --algorithm downpour")
        if k > self.cluster.shards:
            raise UserError(f"--shards {self.cluster.shards} is fewer than --partitions {k}: "
                            "shards are laid out by partition, so give at least one shard per "
                            f"partition (--shards {k})")
        if m.balance is not None:
            from distbelief.model.balance import parse_balance

            parse_balance(m.balance)
            if k == 1 or m.split != "layers":
                raise UserError(f"--balance {m.balance} applies to --split layers with "
                                "--partitions of 2 or more: leave it out or use them")
        if m.micro_batches is not None:
            _at_least("--micro-batches", m.micro_batches, 1, "use 1 for no pipelining")
            if m.micro_batches > 1 and (k == 1 or m.split != "layers"):
                raise UserError(f"--micro-batches {m.micro_batches} applies to --split layers "
                                "with --partitions of 2 or more (the pipeline): leave it out")
            if m.micro_batches > self.data.batch_size:
                raise UserError(f"--micro-batches {m.micro_batches} is more than --batch-size "
                                f"{self.data.batch_size}: each micro-batch needs at least one "
                                "sample")

    def _validate_cluster_extras(self) -> None:
        spec = self.cluster.slow_worker
        if spec is None:
            return
        ident, sep, factor = spec.partition(":")
        try:
            parsed = (int(ident), float(factor)) if sep else None
        except ValueError:
            parsed = None
        if parsed is None:
            raise UserError(f"--slow-worker {spec!r} is not ID:FACTOR: give e.g. 1:4 to make "
                            "replica 1 four times slower")
        if not 0 <= parsed[0] < self.cluster.replicas:
            raise UserError(f"--slow-worker {spec!r} names replica {parsed[0]}, but there are "
                            f"{self.cluster.replicas} (0..{self.cluster.replicas - 1}): pick one of them")
        if not 1 <= parsed[1] < math.inf:
            raise UserError(f"--slow-worker {spec!r}: the factor must be a finite number >= 1 "
                            "(how many times slower), e.g. 4")

    def _validate_shard_layout(self) -> None:
        c = self.cluster
        _choice("shard_layout", c.shard_layout, SHARD_LAYOUTS, "--shard-layout")
        if c.chunk_bytes < 4 or c.chunk_bytes % 4:
            raise UserError(f"--chunk-bytes must be a positive multiple of 4 (float32), got "
                            f"{c.chunk_bytes}: try {DEFAULT_CHUNK_BYTES} (1 MB, Project Adam's)")
        if c.shard_layout == "ranges" and c.chunk_bytes != DEFAULT_CHUNK_BYTES:
            raise UserError(f"--chunk-bytes {c.chunk_bytes} applies to --shard-layout chunks "
                            "only: add --shard-layout chunks or leave --chunk-bytes out")

    def _validate_sync_and_sandblaster(self) -> None:
        f, b = self.sync.fraction, self.sandblaster
        if not 0 < f <= 1:
            raise UserError(f"--sync-fraction must be in (0, 1], got {f}: a step completes once "
                            "this fraction of the replicas reported; 1 waits for all, 0.75 is "
                            "Project Adam's choice")
        if b.portions is not None and b.portions < self.cluster.replicas:
            raise UserError(f"--portions {b.portions} is smaller than the {self.cluster.replicas} "
                            "workers (--replicas): give at least one portion per worker, "
                            "ideally several")
        _choice("line_search", b.line_search, LINE_SEARCHES, "--line-search")
        _at_least("--push-every", b.push_every, 1, "push after every portion (1) or less often")
        _at_least("--history", b.history, 1, "keep at least one (s, y) pair; 10 is usual")
        for option, value in (("--tolerance-grad", b.tolerance_grad),
                              ("--tolerance-change", b.tolerance_change)):
            if not 0 <= value < math.inf:
                raise UserError(f"{option} must be a finite number >= 0, got {value}: "
                                "use 0 to never stop early")

    def _refuse_foreign_options(self) -> None:
        """An option set for another algorithm is a mistake worth one clear line."""
        defaults = JobConfig()
        for dotted, owners in ONLY_FOR.items():
            if self.algorithm in owners:
                continue
            section, name = dotted.split(".")
            value = getattr(getattr(self, section), name)
            if value != getattr(getattr(defaults, section), name):
                option = _option_name(dotted)
                raise UserError(
                    f"{option} {value!r} means nothing for --algorithm {self.algorithm} "
                    f"(it is used by {' and '.join(owners)}): "
                    f"{_FOREIGN_FIX.get(dotted, 'leave it out')}")

    def resolved(self) -> JobConfig:
        """A copy with the algorithm-dependent defaults filled in (after `validate`)."""
        data = self.to_dict()
        opt, blaster = data["optimizer"], data["sandblaster"]
        if self.algorithm == "sandblaster":
            opt["lr"] = DEFAULT_LBFGS_LR if opt["lr"] is None else opt["lr"]
            if blaster["portions"] is None:
                blaster["portions"] = PORTIONS_PER_WORKER * self.cluster.replicas
            if data["train"]["steps"] is None:
                data["train"]["steps"] = DEFAULT_ITERATIONS
        elif self.algorithm == "hogwild":  # Hogwild's maths is plain SGD
            opt["rule"] = opt["rule"] or DEFAULT_HOGWILD_RULE
            opt["lr"] = DEFAULT_LR if opt["lr"] is None else opt["lr"]
        else:
            opt["rule"] = opt["rule"] or DEFAULT_RULE
            opt["lr"] = DEFAULT_LR if opt["lr"] is None else opt["lr"]
        model = data["model"]
        if model["micro_batches"] is None:
            pipelined = model["partitions"] > 1 and model["split"] == "layers"
            model["micro_batches"] = (min(self.data.batch_size,
                                          MICRO_BATCHES_PER_STAGE * model["partitions"])
                                      if pipelined else 1)
        return JobConfig.from_dict(data, source="config")


def load_config(path: str | Path | None) -> JobConfig:
    """Read a TOML config file (None: all defaults). Raises UserError on any problem."""
    if path is None:
        return JobConfig()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} not found: give the path of a TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config file {str(path)!r} is not valid TOML ({exc}): fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text: give a TOML file") from None
    return JobConfig.from_dict(data, source=str(path))


# ---- helpers --------------------------------------------------------------

def _section_from_dict(section_cls: type, value: Any, where: str) -> Any:
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a table, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    kwargs = {}
    for key, item in value.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r}; valid keys are {', '.join(fields)}")
        kwargs[key] = _coerce(item, fields[key].type, f"{where} {key}")
    return section_cls(**kwargs)


def _coerce(value: Any, type_: Any, where: str) -> Any:
    """Check one value against its annotated type (given as a string by __future__)."""
    text = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise UserError(f"{where} must not be empty")
    if text.startswith("bool"):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where} must be an integer, got {value!r}")
        return value
    if text.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where} must be a number, got {value!r}")
        return float(value)
    if text.startswith("str"):
        if not isinstance(value, str):
            raise UserError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _choice(name: str, value: str, choices: tuple[str, ...], option: str) -> None:
    if value not in choices:
        raise UserError(f"{option} {value!r} is not one of {', '.join(choices)}: pick one of those")


def _at_least(option: str, value: int, low: int, fix: str) -> None:
    if value < low:
        raise UserError(f"{option} must be >= {low}, got {value}: {fix}")


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    return data


# Flat option names (command line, `distbelief.train(**options)`) -> config fields.
OPTION_FIELDS = {
    "algorithm": "algorithm",
    "replicas": "cluster.replicas", "shards": "cluster.shards", "port": "cluster.port",
    "host": "cluster.host", "transport": "cluster.transport", "timeout": "cluster.timeout",
    "slow_worker": "cluster.slow_worker", "threads": "cluster.threads",
    "restart_replicas": "cluster.restart_replicas", "data_servers": "cluster.data_servers",
    "shard_layout": "cluster.shard_layout", "chunk_bytes": "cluster.chunk_bytes",
    "n_fetch": "downpour.n_fetch", "n_push": "downpour.n_push",
    "warm_start_steps": "downpour.warm_start_steps",
    "replica_workers": "downpour.replica_workers", "workers": "hogwild.workers",
    "sync_fraction": "sync.fraction",
    "portions": "sandblaster.portions", "backups": "sandblaster.backups",
    "push_every": "sandblaster.push_every", "history": "sandblaster.history",
    "line_search": "sandblaster.line_search", "tolerance_grad": "sandblaster.tolerance_grad",
    "tolerance_change": "sandblaster.tolerance_change",
    "rule": "optimizer.rule", "lr": "optimizer.lr", "momentum": "optimizer.momentum",
    "weight_decay": "optimizer.weight_decay",
    "dataset": "data.dataset", "batch_size": "data.batch_size", "num_samples": "data.num_samples",
    "prefetch": "data.prefetch",
    "model": "model.name", "partitions": "model.partitions", "split": "model.split",
    "balance": "model.balance", "micro_batches": "model.micro_batches",
    "steps": "train.steps", "epochs": "train.epochs", "seed": "train.seed",
    "eval_every": "train.eval_every", "log_every": "train.log_every", "run_dir": "train.run_dir",
    "on_nonfinite": "train.on_nonfinite", "checkpoint_every": "train.checkpoint_every",
}


# Fields that mean something for some algorithms only: dotted field -> those algorithms.
_RULE_USERS = ("downpour", "sync")
ONLY_FOR: dict[str, tuple[str, ...]] = {
    **{f"downpour.{f.name}": ("downpour",) for f in dataclasses.fields(DownpourConfig)},
    **{f"sync.{f.name}": ("sync",) for f in dataclasses.fields(SyncConfig)},
    **{f"sandblaster.{f.name}": ("sandblaster",) for f in dataclasses.fields(SandblasterConfig)},
    **{f"hogwild.{f.name}": ("hogwild",) for f in dataclasses.fields(HogwildConfig)},
    **{f"optimizer.{f.name}": _RULE_USERS for f in dataclasses.fields(OptimizerConfig)
       if f.name != "lr"},
    "data.batch_size": _RULE_USERS,  # Sandblaster's batch is all of the data, cut in portions
    "train.epochs": _RULE_USERS,     # Sandblaster counts L-BFGS iterations (--steps)
    "train.checkpoint_every": _RULE_USERS,  # L-BFGS state lives in the coordinator
    "cluster.restart_replicas": ("downpour",),  # sync's all-reduce group cannot take a newcomer
    # Sandblaster's workers read portions of the data, not a stream of batches
    "cluster.data_servers": _RULE_USERS, "data.prefetch": _RULE_USERS,
    **{f"augment.{f.name}": _RULE_USERS for f in dataclasses.fields(AugmentConfig)},
}
# Hogwild has no parameter server and no replicas: its workers share one tensor on this host
_SERVED = ("downpour", "sync", "sandblaster")
ONLY_FOR.update({
    **{f"optimizer.{f.name}": (*_RULE_USERS, "hogwild") for f in dataclasses.fields(OptimizerConfig)
       if f.name != "lr"},
    "data.batch_size": (*_RULE_USERS, "hogwild"), "train.epochs": (*_RULE_USERS, "hogwild"),
    "cluster.replicas": _SERVED, "cluster.shards": _SERVED, "cluster.transport": _SERVED,
    "cluster.slow_worker": _SERVED, "cluster.shard_layout": _SERVED,
    "cluster.chunk_bytes": _SERVED,
})

_FOREIGN_FIX = {
    "train.epochs": "leave it out and give --steps, the number of L-BFGS iterations",
    "data.batch_size": "leave it out; --portions sets how finely the data is cut",
    "cluster.replicas": "use --workers W for the processes that share the parameters",
    "cluster.shards": "the workers share one tensor in this host's memory; leave it out",
    "cluster.transport": "the workers share one tensor in this host's memory; leave it out",
}


def _option_name(dotted: str) -> str:
    """The command-line spelling of a config field, or its dotted name if it has none."""
    for option, field_name in OPTION_FIELDS.items():
        if field_name == dotted:
            return "--" + option.replace("_", "-")
    return dotted


def default_of(option: str) -> Any:
    """The real default value of a flat option (for help texts)."""
    value: Any = JobConfig()
    for part in OPTION_FIELDS[option].split("."):
        value = getattr(value, part)
    return value


def apply_options(cfg: JobConfig, options: dict[str, Any]) -> JobConfig:
    """Apply flat options (None = not given); unknown names raise UserError."""
    unknown = sorted(set(options) - set(OPTION_FIELDS))
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r}: valid options are "
                        f"{', '.join(OPTION_FIELDS)}")
    if options.get("steps") is not None and options.get("epochs") is not None:
        raise UserError(f"--steps {options['steps']} and --epochs {options['epochs']} were both "
                        "given: give only one (steps per replica, or passes over the data)")
    overrides = {OPTION_FIELDS[k]: v for k, v in options.items()}
    # --steps and --epochs replace each other when the other one came from the config file
    if options.get("steps") is not None:
        overrides["train.epochs"] = _UNSET
    if options.get("epochs") is not None:
        overrides["train.steps"] = _UNSET
    return cfg.with_overrides(overrides)


class _Unset:
    """Marks an override that clears a field back to None."""


_UNSET = _Unset()
