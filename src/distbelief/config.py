"""The shared sections of a job's configuration, and the tools every section uses.

A job's configuration (`distbelief.job.JobConfig`) is the chosen algorithm,
that algorithm's own section (`[downpour]`, `[sync]`, ... declared by the
algorithm, see `distbelief.algorithms`) and the sections every algorithm shares,
defined here: ``[cluster]``, ``[optimizer]``, ``[data]``, ``[model]``,
``[train]``, ``[augment]`` and ``[task]``.

Every field is documented once, by the string under it: the command line's
``--help`` is read from those strings (`field_docs`). A field's metadata, set
with `option`, says how it appears on the command line (its flat name, its
choices, what its unset default means) or that it is a TOML-only setting.

This module sits at the bottom of the package: it imports nothing from
distbelief but `errors`. The checks of one concern live next to it
(`ps.layout`, `model.options`, `data.options`); `validate_shared` holds the
checks of single values that belong to no other concern.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import inspect
import math
import os
import textwrap
from dataclasses import dataclass, field
from typing import Any

from distbelief.errors import UserError

RULES = ("sgd", "momentum", "adagrad", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine", "step")
SPLITS = ("layers", "units")
ON_NONFINITE = ("skip", "stop")
PRECISIONS = ("fp32", "bf16")
TRANSPORTS = ("auto", "shm", "gloo")
SHARD_LAYOUTS = ("ranges", "chunks")
TASKS = ("classify", "regress", "sequence")
DEFAULT_CHUNK_BYTES = 1 << 20  # Project Adam's ~1 MB chunks
DEFAULT_EPOCHS = 4.0
DEFAULT_PROGRESS_TIMEOUT = 300.0
"""--progress-timeout: ~1000 steps of the speech model (batch 64, one thread), 2.5x --timeout."""
MICRO_BATCHES_PER_STAGE = 1  # pipeline micro-batches per partition when --micro-batches is unset


def option(default: Any = dataclasses.MISSING, *, name: str | None = None,
           choices: tuple[str, ...] | None = None, unset: str | None = None,
           toml_only: bool = False, refusal: str | None = None) -> Any:
    """A section field with what the command line needs to know about it.

    `name`: its flat option name when not the field's own (``model``);
    `choices`: the values it takes; `unset`: what a None default means, for
    ``--help``; `toml_only`: set in the config file only, no flag; `refusal`: the
    sentence that refuses it for an algorithm that does not use it (format
    fields: option, value, algorithm, users, first).
    """
    meta = {"option": None if toml_only else name, "toml_only": toml_only,
            "choices": choices, "unset": unset, "refusal": refusal}
    return field(default=default, metadata=meta)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: the string under it in the class body}, one line each; {} without source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # pragma: no cover - no source shipped
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclass(kw_only=True)
class ClusterConfig:
    replicas: int = 2
    """Model replicas (data parallelism), each training on its own part of the data."""
    shards: int = 2
    """Parameter-server shards, each holding a slice of the parameters and its update rule's state."""
    host: str = "127.0.0.1"
    """Address the coordinator's store binds to (local mode binds loopback only)."""
    port: int = 0
    """The coordinator's port (0: a free one)."""
    transport: str = option("auto", choices=TRANSPORTS)
    """How tensors move between replica and shard: shm (same host), gloo (TCP), auto (shm when on one host)."""
    timeout: float = 120.0
    """Seconds any single wait (connect, pull, push, join) may block before the job fails."""
    progress_timeout: float = DEFAULT_PROGRESS_TIMEOUT
    """Seconds a role's main loop may go without progress (a replica's step, a shard's or data server's pass over its requests) before the role is declared lost like a dead one, though its process lives on: replaced with --restart-replicas, counted, or the end of the job. Waits for slower peers (a staleness barrier, an all-reduce, a checkpoint pause) do not count. Keep it far above your slowest step: one step of the 42M-parameter speech model takes about 0.3 s on one core (batch 64)."""
    token_file: str | None = option(None, unset="none: a multi-host job reads DISTBELIEF_TOKEN")
    """A file holding the job's secret token (16 characters or more, e.g. from python -c 'import secrets; print(secrets.token_hex(16))'), read on every host of a multi-host job in place of DISTBELIEF_TOKEN: give the same file, readable by you only, on every host. A job on one host checks the file the same way but keeps a fresh random token of its own (its store listens on loopback only)."""
    slow_worker: str | None = option(None, unset="none")
    """ID:FACTOR makes replica ID FACTOR times slower (it sleeps in proportion to its compute), for tests and benchmarks."""
    restart_replicas: bool = False
    """Start a replacement for a lost replica (local cluster): it pulls fresh parameters and takes over the lost one's remaining steps."""
    threads: int | None = option(None, unset="this host's cores shared among the replica processes")
    """Torch threads of each replica (or partition) process."""
    device: str = "cpu"
    """Where each replica (or partition) process of downpour or sync computes: cpu, cuda (GPU N = its local rank on the host modulo the GPUs it sees: the replica index, or replica*K+partition, on a local cluster; LOCAL_RANK under torchrun, SLURM_LOCALID under SLURM) or cuda:N. The shards always keep the parameters on the CPU; gradients and parameters cross through pinned host memory."""
    shard_layout: str = option("ranges", choices=SHARD_LAYOUTS)
    """How parameters are cut into shards: ranges (one contiguous range each) or chunks (Project Adam: --chunk-bytes pieces hashed to the shards, bytes balanced within 1.2x from 11 chunks per shard)."""
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """--shard-layout chunks: bytes per chunk, a positive multiple of 4 (float32)."""
    sync_fraction: float = 1.0
    """A synchronous step (sync) or round (admm) completes once this fraction of the replicas reported, the fastest (Project Adam); sync drops the late gradients and counts them, admm rolls a late contribution into the next round."""
    data_servers: int = 0
    """Data-serving processes (Project Adam) that read, shuffle and augment the data (the [augment] table of the config) and stream ready batches to the replicas; 0: each replica loads its own data."""

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
class OptimizerConfig:
    rule: str | None = option(None, choices=RULES)
    """Update rule: sgd, momentum, adagrad, adam or adamw (Adam with decoupled --weight-decay; hogwild takes sgd, momentum or adagrad, admm --partitions K > 1 adam only); applied inside the shards (downpour), by every replica to the all-reduced gradient (sync), by each worker to the shared parameters (hogwild), or as each replica's local optimizer (easgd, admm)."""
    lr: float | None = None
    """Learning rate of the update rule (--rule; sandblaster: the L-BFGS step scale)."""
    momentum: float = 0.9
    """Momentum factor (--rule momentum)."""
    nesterov: bool = False
    """Nesterov momentum, as torch.optim.SGD(nesterov=True): params -= lr * (g + momentum * buf) (--rule momentum only)."""
    beta1: float = option(0.9, toml_only=True)
    """Adam's first-moment decay (rules adam and adamw only)."""
    beta2: float = option(0.999, toml_only=True)
    """Adam's second-moment decay (rules adam and adamw only)."""
    eps: float | None = option(None, toml_only=True)
    """Numerical epsilon; None means the rule's PyTorch default (adagrad 1e-10, adam and adamw 1e-8)."""
    weight_decay: float = 0.0
    """L2 penalty added to the gradient by the update rule, wherever --rule applies it (see --rule); for adamw, decoupled weight decay instead (params *= 1 - lr * weight_decay before each step)."""
    lr_schedule: str = option("constant", choices=SCHEDULES)
    """Learning rate by update, after --warmup-steps: constant, linear (down to 0), cosine (down to 0) or step (times --lr-gamma every --lr-step-every updates); torch.optim.lr_scheduler's LinearLR, CosineAnnealingLR, StepLR. Counted where the rule runs: downpour's shards by the pushes each applied, of replicas * ceil(steps / n_push) in all (its --replica-workers' local SGD keeps --lr); sync, hogwild, easgd and admm by each replica's (or worker's) own steps, of its --steps in all (admm --partitions K > 1: refused, each partition's Adam decays its own)."""
    warmup_steps: int = 0
    """Updates whose learning rate rises linearly to --lr before --lr-schedule starts: update k uses lr * (k + 1) / (warmup_steps + 1)."""
    lr_step_every: int | None = option(None, unset="unset; needed by --lr-schedule step")
    """--lr-schedule step: updates between two multiplications by --lr-gamma."""
    lr_gamma: float = 0.1
    """--lr-schedule step: the factor applied every --lr-step-every updates."""
    clip_grad_norm: float | None = option(None, unset="no clipping")
    """Scale a step's gradient down so that its L2 norm is at most this, as torch.nn.utils.clip_grad_norm_: each replica step's gradient before it joins the push, without --partitions or --replica-workers (downpour); the step's all-reduced gradient, the same on every replica, so its global norm (sync); each worker's step (hogwild); each local step's loss gradient, before ADMM's pull towards the consensus and without --partitions (easgd, admm)."""


@dataclass(kw_only=True)
class DataConfig:
    dataset: str = "mnist1d"
    """digits, mnist1d, synthetic, PATH.npz (arrays x, y), DIR (x.npy, y.npy, memory-mapped), text:PATH (text files, a directory of .py/.txt/.md files, a glob, or text:stdlib, as byte windows of --seq-len for --task sequence) or MODULE:FUNCTION (arrays or a torch Dataset)."""
    batch_size: int = 64
    """Samples per replica step."""
    num_samples: int | None = option(None, unset="the dataset's own size")
    """Samples to generate for mnist1d/synthetic; for other datasets, a cap on the training samples."""
    prefetch: int = 4
    """With --data-servers: batches in flight to each replica (sent, not yet trained on); bounds their memory."""
    seq_len: int = 128
    """For --dataset text:PATH: bytes per sample window (the targets are the window shifted by one byte)."""
    val_fraction: float = 0.0
    """Hold out this seeded fraction of the training split for validation: the evaluations during the run (--eval-every) read it, and the test split is read once, at the end (summary.json has both). 0: no validation split; the evaluations during the run read the test split."""


@dataclass(kw_only=True)
class AugmentConfig:
    """Random augmentation of each training batch, off by default (`distbelief.data.augment`).

    Signals are samples of shape (L,) or (C, L); images (C, H, W). Every draw
    comes from a generator seeded by (seed, replica, step), so a data server and
    a replica augmenting inline produce the same batches.
    """

    shift: int = option(0, toml_only=True)
    """Signals and images: roll each sample by a random offset in -shift..shift (images: along H and W)."""
    scale: float = option(0.0, toml_only=True)
    """Multiply each sample by a random factor in [1 - scale, 1 + scale]."""
    noise: float = option(0.0, toml_only=True)
    """Add Gaussian noise with this standard deviation."""
    flip: bool = option(False, toml_only=True)
    """Images: flip each sample horizontally with probability 1/2."""
    crop: int = option(0, toml_only=True)
    """Images: pad by this many zero pixels on every side, then crop back to H x W at a random offset."""
    warp: float = option(0.0, toml_only=True)
    """Signals and images: elastic distortion; the largest displacement, in samples or pixels (Simard et al. 2003)."""
    warp_smooth: int = option(4, toml_only=True)
    """Passes of a [1, 2, 1]/4 filter smoothing the random displacement field: more passes give smoother distortions and cost proportionally more."""

    @property
    def enabled(self) -> bool:
        return bool(self.shift or self.scale or self.noise or self.flip or self.crop or self.warp)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = option("cnn", name="model")
    """linear (logistic regression), mlp, cnn, lcnn (locally connected), speech (DistBelief's speech model, 42M parameters), transformer or transformer:LAYERS:WIDTH:HEADS (a decoder-only transformer for --task sequence; default 2:128:4), or MODULE:FACTORY (or FILE.py:FACTORY) returning an nn.Module."""
    partitions: int = option(1, refusal="{option} {value} works with --algorithm {users} only: "
                                        "{algorithm} runs unpartitioned replicas; use "
                                        "--partitions 1 or --algorithm {first}")
    """Processes per replica, each holding part of the model (model parallelism). Worth it when one replica's compute is the bottleneck and each partition gets its own cores."""
    split: str = option("layers", choices=SPLITS)
    """How a replica is cut: layers (contiguous layers of an nn.Sequential per partition, pipelined) or units (each Linear by output units, each locally connected layer spatially)."""
    balance: str | None = option(None, unset="balanced by measured compute time and parameter bytes")
    """--split layers: layers per partition, e.g. 3,2."""
    micro_batches: int | None = option(None, unset="one per partition, at most the batch size")
    """--split layers: micro-batches per batch in the pipeline; more fill the pipeline better, fewer keep each matmul larger."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int | None = option(None, unset="unset, --epochs decides")
    """Steps per replica (replaces --epochs)."""
    epochs: float | None = option(None, unset=f"{DEFAULT_EPOCHS:g} when --steps is not given")
    """Passes over the training data, all replicas together (replaces --steps)."""
    seed: int = 0
    """Seed of model initialisation, data split and shuffling."""
    eval_every: int = 0
    """Evaluate the test split (the validation split with --val-fraction) every K steps of the leading replica (0: only at the end)."""
    log_every: int = 10
    """Replicas report loss and staleness every K steps."""
    run_dir: str | None = option(None, unset="runs/<algorithm>-<time>")
    """Where config, metrics, checkpoint and plots go."""
    checkpoint_every: str | None = option(None, unset="no checkpoints")
    """Write a checkpoint every N steps of the leading replica (200) or every N seconds (60s); resume with --resume RUN_DIR."""
    on_nonfinite: str | None = option(None, choices=ON_NONFINITE)
    """A NaN/inf gradient or loss: skip (refuse it, count it, go on) or stop (end the job with a clear error). Sandblaster's L-BFGS cannot skip a batch: a NaN/inf loss always ends its job."""
    tensorboard: bool = False
    """Also write every metrics event as TensorBoard scalars (and the config as text) under RUN_DIR/tensorboard (needs pip install 'distbelief[tensorboard]'). Off by default so that the same command writes the same run directory whatever packages are installed; metrics.jsonl and curves.png are always written."""
    precision: str = option("fp32", choices=PRECISIONS)
    """The replicas' forward and backward passes: fp32, or bf16 (autocast to bfloat16, on the CPU or a GPU) while the parameters, their gradients, the update rule and evaluation stay float32 (the shards keep fp32 master parameters). Not with --partitions K > 1."""
    init_from: str | None = option(None, unset="none: the seeded initialisation")
    """Fine-tuning: start from the weights of RUN_DIR's model.pt, or of a model.pt file, instead of the seeded initialisation: every algorithm's replicas start from its parameters, and its buffers (BatchNorm's running statistics) go into the model the job evaluates and saves. Unlike --resume, a new job: its own run directory, step 0, fresh update-rule state. The model built (--model, data shapes) must match the saved one."""

    @property
    def resolved_epochs(self) -> float | None:
        """The epochs to run: as given, DEFAULT_EPOCHS when neither steps nor epochs is set."""
        if self.steps is None and self.epochs is None:
            return DEFAULT_EPOCHS
        return self.epochs


@dataclass(kw_only=True)
class TaskConfig:
    """What the job learns: the loss, the form of the targets and the metrics (`distbelief.task`)."""

    name: str = option("classify", name="task", choices=TASKS)
    """What is learned: classify (targets are class ids; cross-entropy; accuracy), regress (float targets of any shape per sample; --loss mse or l1; RMSE and MAE) or sequence (token ids of shape (N, T), logits (N, T, V); per-token cross-entropy; perplexity and token accuracy)."""
    loss: str | None = option(None, unset="the task's own: cross-entropy, or mse for regress")
    """The loss: mse or l1 for --task regress, or your own as MODULE:FUNCTION or FILE.py:FUNCTION, called as loss(output, target) and returning the batch's mean loss as a 0-d tensor."""
    metrics: str | None = option(None, unset="the task's own only")
    """Your own metrics as MODULE:FUNCTION or FILE.py:FUNCTION, called as metrics(output, target) and returning {name: the batch's mean}; evaluation reports each as test_<name>, a mean over the whole split."""


SHARED_SECTIONS: dict[str, type] = {
    "cluster": ClusterConfig, "optimizer": OptimizerConfig, "data": DataConfig,
    "model": ModelConfig, "train": TrainConfig, "augment": AugmentConfig,
    "task": TaskConfig}
"""The sections every job has, by their TOML table name."""


def validate_shared(cfg: Any) -> None:
    """Check the single values of the shared sections; UserError naming the first bad one."""
    c, o, t, d = cfg.cluster, cfg.optimizer, cfg.train, cfg.data
    if o.rule is not None:
        choice("rule", o.rule, RULES, "--rule")
    choice("transport", c.transport, TRANSPORTS, "--transport")
    choice("task", cfg.task.name, TASKS, "--task")
    if t.on_nonfinite is not None:
        choice("on_nonfinite", t.on_nonfinite, ON_NONFINITE, "--on-nonfinite")
    parse_every(t.checkpoint_every)
    at_least("--replicas", c.replicas, 1, "give at least one model replica")
    at_least("--shards", c.shards, 1, "give at least one parameter shard")
    if c.threads is not None:
        at_least("--threads", c.threads, 1, "leave it out to share this host's cores")
    if not 0 < c.sync_fraction <= 1:
        raise UserError(f"--sync-fraction must be in (0, 1], got {c.sync_fraction}: a step or "
                        "round completes once this fraction of the replicas reported; 1 waits "
                        "for all, 0.75 is Project Adam's choice")
    at_least("--batch-size", d.batch_size, 1, "use a positive batch size")
    at_least("--seq-len", d.seq_len, 1, "give the bytes per window of a text: dataset, e.g. 128")
    choice("precision", t.precision, PRECISIONS, "--precision")
    if t.precision != "fp32" and cfg.model.partitions > 1:
        raise UserError(f"--precision {t.precision} does not work with --partitions "
                        f"{cfg.model.partitions} yet (the pipeline's boundary activations and "
                        "gradients are float32): leave --precision out, or train the whole "
                        "model in each replica")
    if not 0 <= d.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {d.val_fraction}: the share of "
                        "the training split held out for validation, e.g. 0.1 (0: none)")
    at_least("--eval-every", t.eval_every, 0, "use 0 to evaluate only at the end")
    at_least("--log-every", t.log_every, 1, "report at least every step (1)")
    if not 0 <= c.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {c.port}: use 0 for a free port")
    if not 0 < c.timeout < math.inf:
        raise UserError(f"--timeout must be a finite number of seconds > 0, got {c.timeout}: "
                        "try 120")
    if not 1 <= c.progress_timeout < math.inf:
        raise UserError(f"--progress-timeout must be a finite number of seconds >= 1 (the "
                        f"heartbeat's period), got {c.progress_timeout}: keep it far above the "
                        f"slowest step, e.g. {DEFAULT_PROGRESS_TIMEOUT:g}")
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
    if o.nesterov and o.rule != "momentum":
        raise UserError(f"--nesterov works with --rule momentum only, got --rule "
                        f"{o.rule or '(the algorithm default)'}: add --rule momentum or leave "
                        "--nesterov out")
    choice("lr_schedule", o.lr_schedule, SCHEDULES, "--lr-schedule")
    at_least("--warmup-steps", o.warmup_steps, 0, "use 0 for no warmup")
    if o.lr_schedule == "step":
        if o.lr_step_every is None or o.lr_step_every < 1:
            raise UserError(f"--lr-schedule step needs --lr-step-every N >= 1, got "
                            f"{o.lr_step_every}: give the updates between two decays, e.g. 1000")
        if not 0 < o.lr_gamma <= 1:
            raise UserError(f"--lr-gamma must be in (0, 1], got {o.lr_gamma}: try 0.1")
    elif (o.lr_schedule in ("linear", "cosine") and t.steps is not None
          and o.warmup_steps >= t.steps):
        raise UserError(f"--warmup-steps {o.warmup_steps} with --lr-schedule {o.lr_schedule} "
                        f"and --steps {t.steps}: the warmup leaves no steps to decay over; use "
                        "fewer warmup steps")
    if o.clip_grad_norm is not None and not 0 < o.clip_grad_norm < math.inf:
        raise UserError(f"--clip-grad-norm must be a finite number > 0, got "
                        f"{o.clip_grad_norm}: try 1.0")
    if o.lr_schedule != "step" and (o.lr_step_every is not None or o.lr_gamma != 0.1):
        raise UserError(f"--lr-step-every and --lr-gamma work with --lr-schedule step only, got "
                        f"--lr-schedule {o.lr_schedule}: add --lr-schedule step or leave them out")
    if t.steps is not None and t.epochs is not None:
        raise UserError(f"train.steps = {t.steps} and train.epochs = {t.epochs} are both set: "
                        "give either steps or epochs, not both")
    if t.steps is not None and t.steps < 1:
        raise UserError(f"--steps must be >= 1, got {t.steps}: give the steps per replica")
    if t.epochs is not None and not 0 < t.epochs < math.inf:
        raise UserError(f"--epochs must be a finite number > 0, got {t.epochs}: "
                        f"try {DEFAULT_EPOCHS:g}")
    if d.num_samples is not None and d.num_samples < 10:
        raise UserError(f"--num-samples must be >= 10, got {d.num_samples}: "
                        "leave it out for the dataset's own size")
    _validate_slow_worker(c)
    parse_device(c.device, check=True)
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: "
                        "pip install 'distbelief[tensorboard]'")


def _validate_slow_worker(c: ClusterConfig) -> None:
    spec = c.slow_worker
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
    if not 0 <= parsed[0] < c.replicas:
        raise UserError(f"--slow-worker {spec!r} names replica {parsed[0]}, but there are "
                        f"{c.replicas} (0..{c.replicas - 1}): pick one of them")
    if not 1 <= parsed[1] < math.inf:
        raise UserError(f"--slow-worker {spec!r}: the factor must be a finite number >= 1 "
                        "(how many times slower), e.g. 4")


def parse_device(spec: str, *, check: bool = False) -> int | None:
    """The CUDA index of a --device value: None for "cpu" and for "cuda" (the process picks by
    its local rank), N for "cuda:N". UserError for anything else; with `check`, also when
    this machine has no CUDA device, or not device N (torch is imported only then).

    Example::

        parse_device("cuda:1")   # 1
    """
    kind, sep, index = spec.partition(":")
    if kind == "cpu" and not sep:
        return None
    number = int(index) if sep and index.isascii() and index.isdigit() else None
    if kind != "cuda" or (sep and number is None):
        raise UserError(f"--device {spec!r} is not cpu, cuda or cuda:N: give cpu (the default), "
                        "cuda (one GPU per replica process) or cuda:N (GPU N for all)")
    if check:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: this machine has no CUDA device "
                            "(torch.cuda.is_available() is False): leave --device out to train "
                            "on CPU")
        count = torch.cuda.device_count()
        if number is not None and number >= count:
            raise UserError(f"--device {spec}: this machine has {count} CUDA device"
                            f"{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1}): pick one "
                            "of them, or give --device cuda to spread the replicas over all")
    return number


def parse_every(text: str | None) -> tuple[int | None, float | None]:
    """"200" -> (200 steps, None); "30s" -> (None, 30.0 seconds); None -> (None, None)."""
    if text is None:
        return None, None
    value = text.strip().lower()
    try:
        if value.endswith("s"):
            seconds = float(value[:-1])
            if seconds > 0:
                return None, seconds
        else:
            steps = int(value)
            if steps > 0:
                return steps, None
    except ValueError:
        pass
    raise UserError(f"--checkpoint-every {text!r} is neither a number of steps nor of seconds: "
                    "give e.g. 200 (steps) or 60s (seconds)")


# ---- helpers shared by every section ---------------------------------------

def section_from_dict(section_cls: type, value: Any, where: str) -> Any:
    """A section built from a TOML table, refusing unknown keys and values of the wrong type."""
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a table, got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    kwargs = {}
    for key, item in value.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r}; valid keys are {', '.join(fields)}")
        kwargs[key] = coerce(item, fields[key].type, f"{where} {key}")
    return section_cls(**kwargs)


def coerce(value: Any, type_: Any, where: str) -> Any:
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


def choice(name: str, value: str, choices: tuple[str, ...], option: str) -> None:
    """UserError unless `value` is one of `choices`."""
    if value not in choices:
        raise UserError(f"{option} {value!r} is not one of {', '.join(choices)}: pick one of those")


def at_least(option: str, value: int, low: int, fix: str) -> None:
    """UserError unless `value` >= `low`; `fix` says what to give instead."""
    if value < low:
        raise UserError(f"{option} must be >= {low}, got {value}: {fix}")
