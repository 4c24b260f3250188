"""The `distbelief` command: train, predict, plot.

User errors print one line ``distbelief: error: ...`` and exit with code 2;
a job that fails exits with code 1; Ctrl-C exits with 130. Every child process
is gone when the command returns.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Sequence

from distbelief.config import (ALGORITHMS, DEFAULT_EPOCHS, DEFAULT_ITERATIONS, DEFAULT_LBFGS_LR,
                               DEFAULT_HOGWILD_RULE, DEFAULT_LR, DEFAULT_RULE, LINE_SEARCHES,
                               ON_NONFINITE,
                               PORTIONS_PER_WORKER, RULES, SPLITS, TRANSPORTS, default_of)
from distbelief.config import SHARD_LAYOUTS
from distbelief.errors import UserError

# option -> (type, help); the default shown is read from the config dataclasses
# (or from UNSET_DEFAULTS where the dataclass default is None)
TRAIN_OPTIONS: dict[str, tuple[type, str]] = {
    "algorithm": (str, f"training algorithm: {', '.join(ALGORITHMS)}"),
    "replicas": (int, "model replicas, each training on its own part of the data"),
    "shards": (int, "parameter-server shards, each holding a slice of the parameters"),
    "n_fetch": (int, "a replica fetches parameters every N steps"),
    "n_push": (int, "a replica pushes its accumulated gradient every N steps"),
    "rule": (str, f"update rule applied inside the shards: {', '.join(RULES)}"),
    "lr": (float, "learning rate (sandblaster: the L-BFGS step scale)"),
    "momentum": (float, "momentum factor (--rule momentum)"),
    "weight_decay": (float, "L2 penalty applied inside the shards"),
    "batch_size": (int, "samples per replica step"),
    "steps": (int, "steps per replica (replaces --epochs); sandblaster: L-BFGS iterations"),
    "epochs": (float, "passes over the training data, all replicas together (replaces --steps)"),
    "dataset": (str, "digits, mnist1d, synthetic, PATH.npz (arrays x, y) or MODULE:FUNCTION"),
    "num_samples": (int, "samples to generate for mnist1d/synthetic; "
                         "for other datasets, a cap on the training samples"),
    "model": (str, "mlp, cnn, lcnn (locally connected), speech (DistBelief's speech model, "
                   "42M parameters), or MODULE:FACTORY (or FILE.py:FACTORY) returning an "
                   "nn.Module"),
    "partitions": (int, "processes per replica, each holding part of the model (model "
                        "parallelism; downpour). Worth it when one replica's compute is the "
                        "bottleneck and each partition gets its own cores"),
    "split": (str, "how a replica is cut: layers (contiguous layers of an nn.Sequential "
                   "per partition, pipelined) or units (each Linear by output units, each "
                   "locally connected layer spatially)"),
    "balance": (str, "--split layers: layers per partition, e.g. 3,2"),
    "micro_batches": (int, "--split layers: micro-batches per batch in the pipeline; more "
                           "fill the pipeline better, fewer keep each matmul larger"),
    "warm_start_steps": (int, "replica 0 trains alone for W steps before the others join"),
    "replica_workers": (int, "downpour: threads per replica (Project Adam), each on its own "
                             "batches, updating the replica's local copy lock-free with plain "
                             "SGD between fetches; a step is one batch per thread"),
    "workers": (int, "hogwild: processes on this host updating one shared parameter tensor "
                     "without locks"),
    "seed": (int, "seed of initialisation, data split and shuffling"),
    "run_dir": (str, "where config, metrics, checkpoint and plots go"),
    "eval_every": (int, "evaluate the test split every K steps (0: only at the end)"),
    "log_every": (int, "replicas report loss and staleness every K steps"),
    "port": (int, "the coordinator's port (0: a free one)"),
    "host": (str, "address the coordinator binds to"),
    "transport": (str, f"tensor transport replica<->shard: {', '.join(TRANSPORTS)}"),
    "timeout": (float, "seconds any single wait may block before the job fails"),
    "shard_layout": (str, "how parameters are cut into shards: ranges (one contiguous range "
                          "each) or chunks (Project Adam: --chunk-bytes pieces hashed to the "
                          "shards, bytes balanced within 1.2x from 11 chunks per shard)"),
    "chunk_bytes": (int, "--shard-layout chunks: bytes per chunk, a multiple of 4"),
    "slow_worker": (str, "ID:FACTOR makes replica ID FACTOR times slower (it sleeps in "
                         "proportion to its compute), for tests and benchmarks"),
    "checkpoint_every": (str, "write a checkpoint every N steps of the leading replica (200) "
                              "or every N seconds (60s); resume with --resume RUN_DIR"),
    "on_nonfinite": (str, "a NaN/inf gradient or loss: skip (the shards refuse it, it is "
                          "counted, training goes on) or stop (the job ends with an error)"),
    "threads": (int, "torch threads of each replica (or partition) process"),
    "restart_replicas": (bool, "start a replacement for a lost replica (downpour, local "
                               "cluster): it pulls fresh parameters and takes over the lost "
                               "one's remaining steps"),
    "data_servers": (int, "data-serving processes that read, shuffle and augment the data "
                          "(the [augment] table of the config) and stream ready batches to "
                          "the replicas (Project Adam); 0: each replica loads its own data"),
    "prefetch": (int, "with --data-servers: batches in flight to each replica"),
    "sync_fraction": (float, "sync: a step completes once this fraction of the replicas "
                             "reported; late gradients are dropped and counted"),
    "portions": (int, "sandblaster: pieces the data is cut into per gradient evaluation, "
                      "handed out as workers free up"),
    "backups": (bool, "sandblaster: give idle workers backup copies of outstanding portions"),
    "push_every": (int, "sandblaster: a worker sends its gradient every K accepted portions"),
    "history": (int, "sandblaster: L-BFGS history size, kept in the shards"),
    "line_search": (str, f"sandblaster: {', '.join(LINE_SEARCHES)} (none: fixed step --lr)"),
    "tolerance_grad": (float, "sandblaster: stop when max |gradient| is at most this"),
    "tolerance_change": (float, "sandblaster: stop when loss or step change less than this"),
}
CHOICES = {"algorithm": ALGORITHMS, "rule": RULES, "transport": TRANSPORTS,
           "line_search": LINE_SEARCHES, "split": SPLITS, "on_nonfinite": ON_NONFINITE}
CHOICES["shard_layout"] = SHARD_LAYOUTS
# what a None default means, shown in --help instead of "None"
UNSET_DEFAULTS = {
    "steps": f"unset, --epochs decides; sandblaster {DEFAULT_ITERATIONS}",
    "rule": f"{DEFAULT_RULE}; {DEFAULT_HOGWILD_RULE} for hogwild; none for sandblaster",
    "lr": f"{DEFAULT_LR:g}; {DEFAULT_LBFGS_LR:g} for sandblaster",
    "portions": f"{PORTIONS_PER_WORKER} per worker",
    "slow_worker": "none",
    "threads": "this host's cores shared among the replica processes",
    "checkpoint_every": "no checkpoints",
    "epochs": f"{DEFAULT_EPOCHS:g} when --steps is not given",
    "num_samples": "the dataset's own size",
    "run_dir": "runs/<algorithm>-<time>",
    "balance": "balanced by measured compute time and parameter bytes",
    "micro_batches": "one per partition, at most the batch size",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distbelief",
                     description="DistBelief-style distributed training on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser(
        "train", help="train a model on a local cluster of processes (or one role per host)",
        description="Train with Downpour SGD (R model replicas push gradients to and fetch "
                    "parameters from S parameter shards, each its own process), synchronous "
                    "all-reduce (sync), Sandblaster L-BFGS (sandblaster) or lock-free "
                    "Hogwild! (W worker processes updating one shared tensor). Options "
                    "override the TOML file. Under torchrun/SLURM (RANK, WORLD_SIZE, "
                    "MASTER_ADDR, MASTER_PORT set) each process runs one role: rank 0 the "
                    "coordinator, then the shards, then the replicas (K ranks each with "
                    "--partitions K).",
        epilog="Model parallelism (downpour): --partitions K makes each replica K "
               "processes that exchange only boundary activations and gradients and pull/"
               "push only their own shards (give --shards >= K). --split layers pipelines "
               "contiguous layers in --micro-batches M pieces (idle fraction (K-1)/(M+K-1); "
               "the deferred weight gradients fill the bubbles, so one per partition is a good "
               "start on CPUs; more only while micro-batches stay large), balanced by measured "
               "time and parameter "
               "bytes or by --balance; --split units cuts each Linear by output units and "
               "each locally connected layer spatially. Pays when a replica's compute is "
               "the bottleneck and each partition has its own cores (--threads). Example: "
               "distbelief train --model lcnn --partitions 2 --split units --shards 4 "
               "--epochs 1")
    train.add_argument("config", nargs="?", help="TOML config file (optional)")
    for name, (type_, help_) in TRAIN_OPTIONS.items():
        default = default_of(name)
        if default is None:
            default = UNSET_DEFAULTS[name]
        flag = f"--{name.replace('_', '-')}"
        if type_ is bool:  # --backups / --no-backups
            train.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=f"{help_} (default: {default})")
            continue
        train.add_argument(flag, dest=name, type=type_, default=None,
                           choices=CHOICES.get(name), metavar=name.upper(),
                           help=f"{help_} (default: {default})")
    train.add_argument("--quiet", action="store_true", help="no progress display")
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR from its last complete checkpoint, "
                            "with its own config (see --checkpoint-every)")

    pred = sub.add_parser(
        "predict", help="run a trained model (whole or partitioned) over an .npz of inputs",
        description="Predict with the model of a finished run. With --partitions K the model "
                    "is cut as in training (--split layers: contiguous layers, pipelined in "
                    "micro-batches; --split units: a block of every Linear and locally "
                    "connected layer per process) and run by K processes on this host; only "
                    "boundary activations travel between them. Writes logits, predictions "
                    "and, when the input has labels y, accuracy.")
    pred.add_argument("run_dir", help="the run directory a train command printed")
    pred.add_argument("--input", required=True, help=".npz file with inputs x (and labels y)")
    pred.add_argument("-o", "--output", required=True, help=".npz file to write")
    pred.add_argument("--partitions", type=int, default=1, metavar="K",
                      help="processes the model is cut across (default: 1)")
    pred.add_argument("--split", choices=SPLITS, default="layers",
                      help="layers or units (default: layers)")
    pred.add_argument("--balance", default=None,
                      help="--split layers: layers per partition, e.g. 3,2 (default: balanced "
                           "by measured compute time and parameter bytes)")
    pred.add_argument("--micro-batches", type=int, default=None, metavar="M",
                      help="--split layers: micro-batches per batch (default: one per partition)")
    pred.add_argument("--batch-size", type=int, default=256, metavar="B",
                      help="samples per batch (default: 256)")
    pred.add_argument("--timeout", type=float, default=120.0,
                      help="seconds the whole prediction may take (default: 120)")

    plot = sub.add_parser("plot", help="draw one or more runs' curves on one figure")
    plot.add_argument("run_dirs", nargs="+", help="run directories to compare")
    plot.add_argument("-o", "--output", required=True, help="image file to write (.png, .pdf, .svg)")
    return parser


class Terminated(Exception):
    """SIGTERM arrived (e.g. from SLURM or `kill`): unwind so every child is reaped."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    from distbelief.runtime.launch import QUICK_RESOLVER

    os.environ.setdefault("RES_OPTIONS", QUICK_RESOLVER)  # read at this process's first lookup
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # argparse would blame the top-level parser and point at its --help
            raise UserError(f"unrecognized arguments: {' '.join(extra)} "
                            f"(see 'distbelief {args.command} --help')")
        if args.command == "train":
            return _train(args)
        if args.command == "plot":
            return _plot(args)
        if args.command == "predict":
            return _predict(args)
        raise UserError(f"unknown command {args.command!r}")
    except UserError as exc:
        print(f"distbelief: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distbelief: interrupted; every process of the job was stopped", file=sys.stderr)
        return 130
    except Terminated:
        print("distbelief: terminated; every process of the job was stopped", file=sys.stderr)
        return 143


def _train(args: argparse.Namespace) -> int:
    from distbelief.api import train
    from distbelief.errors import JobFailed

    options = {name: getattr(args, name) for name in TRAIN_OPTIONS}
    try:
        summary = train(args.config, show_progress=not args.quiet, resume=args.resume,
                        **options)
    except JobFailed as exc:
        print(f"distbelief: job failed: {exc}", file=sys.stderr)
        return 1
    if summary is None:  # this process ran a shard or replica of a multi-host job
        return 0
    lost = summary["replicas_lost"]
    print(f"test accuracy {summary['test_accuracy']:.4f} on {summary['test_samples']} held-out "
          f"samples; {summary['samples_per_second']:,.0f} samples/s; "
          f"{summary['wall_seconds']:.1f} s" + (f"; {lost} replica(s) lost" if lost else ""))
    print(f"run directory: {summary['run_dir']}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from distbelief.inference import predict

    try:
        result = predict(args.run_dir, args.input, args.output, partitions=args.partitions,
                         split=args.split, balance=args.balance,
                         micro_batches=args.micro_batches, batch_size=args.batch_size,
                         timeout=args.timeout)
    except RuntimeError as exc:
        print(f"distbelief: prediction failed: {exc}", file=sys.stderr)
        return 1
    accuracy = result["accuracy"]
    print(f"wrote {result['output']}: {result['samples']} predictions by "
          f"{result['partitions']} partition(s) in {result['seconds']:.2f} s"
          + (f"; accuracy {accuracy:.4f}" if accuracy is not None else ""))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distbelief.metrics.plot import plot_runs

    out = plot_runs([Path(d) for d in args.run_dirs], Path(args.output))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
