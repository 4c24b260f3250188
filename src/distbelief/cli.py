"""The `distbelief` command: train, plan, predict, plot.

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

from distbelief.config import SPLITS
from distbelief.errors import UserError
from distbelief.job import OPTIONS

TRAIN_OPTIONS = OPTIONS
"""The train command's options: one per config field (help from the field's docstring)."""


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
        description="Train a model with one of the algorithms of --algorithm, against a "
                    "sharded parameter server (or one shared tensor). Options override the "
                    "TOML file; each one is a field of the config file. Under torchrun/SLURM "
                    "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set) each process runs one "
                    "role: rank 0 the coordinator, then the shards, then the replicas (K ranks "
                    "each with --partitions K).",
        epilog="Model parallelism: --partitions K makes each replica K "
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
    _add_job_options(train)
    train.add_argument("--quiet", action="store_true", help="no progress display")
    train.add_argument("--resume", metavar="RUN_DIR", default=None,
                       help="continue the run in RUN_DIR from its last complete checkpoint, "
                            "with its own config (see --checkpoint-every)")
    train.add_argument("--strategy", choices=("manual", "auto"), default="manual",
                       help="auto: plan first (as 'distbelief plan' with its defaults) and "
                            "train with the choice; the options given are kept, the planner "
                            "chooses the rest (default: manual)")
    train.add_argument("--trials", type=int, default=None, metavar="N",
                       help="--strategy auto: candidates tried (default: 3)")
    train.add_argument("--trial-seconds", type=float, default=None, metavar="S",
                       help="--strategy auto: seconds of training per trial (default: 4)")

    plan = sub.add_parser(
        "plan", help="choose the algorithm and layout for a job: profile, predict, try",
        description="Profile the model and data on this host, enumerate every layout the "
                    "algorithms accept (replicas, shards, partitions and split, data servers, "
                    "fetch/push cadence), predict each one's samples/s and memory, run the "
                    "most promising for a few seconds each through the real launcher, and "
                    "choose the one whose training loss falls fastest per second. Options "
                    "given are kept; the planner chooses the rest. Writes OUTPUT/plan.json and "
                    "OUTPUT/plan.toml, a config 'distbelief train' accepts.",
        epilog="Planning for a cluster you do not have: --hosts 8 --cores-per-host 32 "
               "--memory-per-host 256GB --link-bandwidth 10Gbit (no trials then; the choice "
               "is the cost model's, and plan.json holds the command each host runs).")
    plan.add_argument("config", nargs="?", help="TOML config file (optional)")
    _add_job_options(plan)
    plan.add_argument("--trials", type=int, default=3, metavar="N",
                      help="candidates tried for --trial-seconds each (0: choose by the cost "
                           "model alone; default: 3)")
    plan.add_argument("--trial-seconds", type=float, default=4.0, metavar="S",
                      help="seconds of training per trial, after its start-up (default: 4)")
    plan.add_argument("--hosts", type=int, default=None, metavar="H",
                      help="plan for H hosts (default: this one)")
    plan.add_argument("--cores-per-host", type=int, default=None, metavar="C",
                      help="cores of each host (default: this host's)")
    plan.add_argument("--memory-per-host", default=None, metavar="SIZE",
                      help="memory a job may use on each host, e.g. 256GB (default: this "
                           "host's available memory)")
    plan.add_argument("--link-bandwidth", default=None, metavar="RATE",
                      help="bandwidth between processes over TCP, e.g. 10Gbit (default: "
                           "measured over loopback here)")
    plan.add_argument("-o", "--output", default="plan", metavar="DIR",
                      help="folder for plan.json and plan.toml (default: plan)")
    plan.add_argument("--quiet", action="store_true", help="no progress messages")

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


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    """One option per config field (help from the field's docstring)."""
    for option in TRAIN_OPTIONS.values():
        default = option.default if option.default is not None else option.unset
        text = option.help.replace("%", "%%")
        if option.type is bool:  # --backups / --no-backups
            parser.add_argument(option.flag, dest=option.name,
                                action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: {default})")
            continue
        parser.add_argument(option.flag, dest=option.name, type=option.type, default=None,
                            choices=option.choices, metavar=option.name.upper(),
                            help=f"{text} (default: {default})")


class Terminated(Exception):
    """SIGTERM arrived (e.g. from SLURM or `kill`): unwind so every child is reaped."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    from distbelief.runtime.launch import QUICK_RESOLVER

    os.environ.setdefault("RES_OPTIONS", QUICK_RESOLVER)  # read at this process's first lookup
    # c10d warns on every connection whose peer's name has no reverse DNS entry: noise
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args, extra = build_parser().parse_known_args(argv)
        if extra:  # argparse would blame the top-level parser and point at its --help
            raise UserError(f"unrecognized arguments: {' '.join(extra)} "
                            f"(see 'distbelief {args.command} --help')")
        if args.command == "train":
            return _train(args)
        if args.command == "plan":
            return _plan(args)
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
                        strategy=args.strategy, trials=args.trials,
                        trial_seconds=args.trial_seconds,
                        **options)
    except JobFailed as exc:
        print(f"distbelief: job failed: {exc}", file=sys.stderr)
        return 1
    if summary is None:  # this process ran a shard or replica of a multi-host job
        return 0
    lost = summary["replicas_lost"]
    headline = summary["task"]["headline"]
    val = (f" (validation {summary['val_' + headline]:.4f} on {summary['val_samples']})"
           if "val_samples" in summary else "")
    print(f"test {headline.replace('_', ' ')} {summary['test_' + headline]:.4f} on "
          f"{summary['test_samples']} held-out samples{val}; "
          f"{summary['samples_per_second']:,.0f} samples/s; "
          f"{summary['wall_seconds']:.1f} s" + (f"; {lost} replica(s) lost" if lost else ""))
    print(f"run directory: {summary['run_dir']}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from distbelief.api import plan

    options = {name: getattr(args, name) for name in TRAIN_OPTIONS}
    result = plan(args.config, trials=args.trials, trial_seconds=args.trial_seconds,
                  hosts=args.hosts, cores_per_host=args.cores_per_host,
                  memory_per_host=args.memory_per_host, link_bandwidth=args.link_bandwidth,
                  output=args.output, show_progress=not args.quiet, **options)
    if result.get("role") == "peer":
        print(f"rank {result['rank']}: measured the links for rank 0's plan")
        return 0
    print(result["table"])
    print(f"wrote {result['files'][0]} and {result['files'][1]}; run:")
    for command in result["commands"]:
        print(command)
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
    metric = result["metrics"].get(result["headline"])
    print(f"wrote {result['output']}: {result['samples']} predictions by "
          f"{result['partitions']} partition(s) in {result['seconds']:.2f} s"
          + (f"; {result['headline'].replace('_', ' ')} {metric:.4f}" if metric is not None
             else ""))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distbelief.metrics.plot import plot_runs

    out = plot_runs([Path(d) for d in args.run_dirs], Path(args.output))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
