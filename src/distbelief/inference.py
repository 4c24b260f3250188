"""Inference with a trained model, whole or partitioned across K processes.

``distbelief predict RUN_DIR --input X.npz -o OUT.npz --partitions K`` rebuilds
the run's model from its config and checkpoint, cuts it as asked (the same
`plan_partitions` as training: ``--split layers`` pipelines micro-batches
through contiguous layers, ``--split units`` gives each process a block of every
Linear and locally connected layer), starts one process per partition on this
host, and streams the input through them batch by batch. Only the activations
at the partition boundaries travel between the processes.

The output file holds the model's raw ``outputs`` (float32; a classifier's
logits, also saved as ``logits``) and ``predictions`` (`Task.predict`: class ids
for classify, token ids for sequence, the outputs in the targets' shape for
regress); when the input has targets ``y``, also the run's task's metrics (for
classify ``accuracy``). The partitioned result equals the whole model's
(tests/test_predict.py).

Example::

    summary = predict("runs/downpour-...", "test.npz", "out.npz", partitions=2)
    summary["accuracy"]        # None when the input has no labels (or the task is not classify)
    summary["metrics"]         # the task's metrics, {} without targets
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distbelief.errors import UserError
from distbelief.rundir import write_atomic

DONE_KEY = "predict/done"


def predict(run_dir: str | Path, input_path: str | Path, output_path: str | Path, *,
            partitions: int = 1, split: str = "layers", balance: str | None = None,
            micro_batches: int | None = None, batch_size: int = 256,
            timeout: float = 120.0) -> dict:
    """Predict every sample of `input_path` (npz with ``x``, optional ``y``); write
    `output_path`. Blocks; every process it started is gone when it returns.

    Raises:
        UserError: a missing or unfinished run, an input of the wrong shape, bad options.
        RuntimeError: a partition process failed (the message holds its log's tail).
    """
    from distbelief.config import SPLITS
    from distbelief.model.partition import plan_partitions

    if partitions < 1:
        raise UserError(f"--partitions must be >= 1, got {partitions}: use 1 for the whole model")
    if split not in SPLITS:
        raise UserError(f"--split {split!r} is not one of {', '.join(SPLITS)}: pick one of those")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}: try 256")
    from distbelief.data.feed import known_shapes
    from distbelief.job import load_config
    from distbelief.task import task_of

    model = load_model(run_dir)
    model.eval()
    # the summary describes the data as the job description did (`describe_data`)
    input_shape, targets = known_shapes(json.loads(
        (Path(run_dir) / "summary.json").read_text())["model"])
    task = task_of(load_config(Path(run_dir) / "config.toml"))
    x, y = _read_input(Path(input_path), input_shape, task)
    output_path = Path(output_path)
    if not output_path.parent.is_dir():
        raise UserError(f"cannot write {str(output_path)!r}: its directory does not exist")
    micro = micro_batches or (min(batch_size, 4 * partitions) if split == "layers" else 1)
    # (inference has no backward pass: more micro-batches only fill the pipeline better)
    plan = plan_partitions(model, partitions=partitions, split=split, balance=balance,
                           micro_batches=micro, sample=x[:batch_size])
    start = time.perf_counter()
    if plan.partitions == 1:
        with torch.no_grad():
            logits = torch.cat([model(xb) for xb in torch.split(x, batch_size)])
        boundary = 0
    else:
        logits, boundary = _run_partitioned(run_dir, input_path, plan, batch_size, timeout)
    seconds = time.perf_counter() - start
    predictions = task.predict(logits, targets)
    out = {"outputs": logits.numpy().astype(np.float32), "predictions": predictions.numpy()}
    if task.name == "classify":
        out["logits"] = out["outputs"]
    metrics: dict[str, float] = {}
    if y is not None:
        meter = task.meter()
        meter.update(logits, y)
        metrics = meter.result()
        out.update({key: np.float64(value) for key, value in metrics.items()})
    write_atomic(output_path, lambda f: np.savez(f, **out))
    return {"samples": len(x), "accuracy": metrics.get("accuracy"), "metrics": metrics,
            "task": task.name, "headline": task.headline, "partitions": plan.partitions,
            "split": plan.split, "balance": list(plan.balance) if plan.balance else None,
            "seconds": seconds, "boundary_bytes": boundary, "output": str(output_path)}


def _read_input(path: Path, input_shape: tuple[int, ...], task) -> tuple[torch.Tensor,
                                                                         torch.Tensor | None]:
    if not path.is_file():
        raise UserError(f"input file {str(path)!r} does not exist: give an .npz with an array x")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"input file {str(path)!r} is not an .npz archive ({exc}): write it "
                        "with numpy.savez(path, x=..., y=...)") from None
    if "x" not in arrays:
        raise UserError(f"input file {str(path)!r} has no array 'x' (it has "
                        f"{', '.join(arrays) or 'none'}): save the inputs as x")
    x = torch.as_tensor(arrays["x"]).float()
    if tuple(x.shape[1:]) != input_shape or len(x) == 0:
        raise UserError(f"input x has shape {tuple(x.shape)}, but the model takes samples of "
                        f"shape {input_shape}: give x of shape (N, {', '.join(map(str, input_shape))})")
    y = None
    if "y" in arrays:
        y = torch.from_numpy(task.check_targets(np.asarray(arrays["y"]), "y", f"input file "
                                                f"{str(path)!r}"))
        if len(y) != len(x):
            raise UserError(f"input y has {len(y)} labels for {len(x)} samples: give one label "
                            "per sample, or leave y out")
    return x, y


def _run_partitioned(run_dir, input_path, plan, batch_size: int,
                     timeout: float) -> tuple[torch.Tensor, int]:
    """Start one process per partition, stream the input through them; (logits, bytes)."""
    from distbelief.job import load_config
    from distbelief.runtime.launch import LocalCluster, log_tail, role_env
    from distbelief.runtime.store import JobStore, new_token

    cfg = load_config(Path(run_dir) / "config.toml")
    store = JobStore.host("127.0.0.1", 0, new_token(), timeout=timeout)
    try:
        with tempfile.TemporaryDirectory(prefix="distbelief-predict-") as tmp:
            out_path = Path(tmp) / "logits.pt"
            store.set_json("job", {"config": cfg.to_dict(), "predict": {
                "run_dir": str(Path(run_dir).resolve()), "input": str(Path(input_path).resolve()),
                "plan": plan.to_json(), "batch_size": batch_size, "output": str(out_path)}})
            env = {**role_env(store, cfg), "DISTBELIEF_STORE": f"127.0.0.1:{store.port}"}
            with LocalCluster(Path(tmp) / "logs", env) as cluster:
                for k in range(plan.partitions):
                    cluster.spawn("predictor", 0, part=k)
                deadline = time.monotonic() + timeout
                while not cluster.wait_exit("predictor", 0.2):
                    failed = [c for c in cluster.exited() if c.process.returncode != 0]
                    if failed:
                        c = failed[0]
                        raise RuntimeError(f"partition {c.part} failed (exit code "
                                           f"{c.process.returncode}): {log_tail(c.log_path)}")
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"prediction did not finish within {timeout:.0f} s")
                failed = [c for c in cluster.children if c.process.returncode != 0]
                if failed:
                    c = failed[0]
                    raise RuntimeError(f"partition {c.part} failed (exit code "
                                       f"{c.process.returncode}): {log_tail(c.log_path)}")
            done = store.get_json(DONE_KEY, timeout=5)
            return torch.load(out_path, weights_only=True), int(done["boundary_bytes"])
    finally:
        store.close()


def run_partition(ctx) -> None:
    """The `predictor` role: partition ctx.part of the model, over every batch of the input."""
    from distbelief.model.partition import PartitionPlan, open_partition

    spec = ctx.job["predict"]
    plan = PartitionPlan.from_json(spec["plan"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.partitions))
    model = load_model(spec["run_dir"])
    model.eval()
    with np.load(spec["input"], allow_pickle=False) as archive:
        x = torch.as_tensor(archive["x"]).float()
    part = plan.part_module(model, ctx.part)
    outputs = []
    peers = ctx.store.clone()
    try:
        with open_partition(plan, part, ctx.part, store=peers.raw, name="predict",
                            timeout=ctx.config.cluster.timeout) as runner:
            for xb in torch.split(x, spec["batch_size"]):
                logits = runner.predict(xb)
                if logits is not None:
                    outputs.append(logits)
            sent = runner.bytes_sent
    finally:
        peers.close()
    ctx.store.add("predict/boundary_bytes", sent)
    if ctx.part == plan.loss_partition:  # the partition that ends the model has the logits
        torch.save(torch.cat(outputs), spec["output"])
    if ctx.store.add("predict/finished", 1) == plan.partitions:
        ctx.store.set_json(DONE_KEY, {"boundary_bytes": ctx.store.add("predict/boundary_bytes", 0)})


def load_model(run_dir: str | Path) -> torch.nn.Module:
    """The trained model of a finished run, rebuilt from its config and checkpoint."""
    import json

    import torch

    from distbelief.job import load_config
    from distbelief.rundir import CHECKPOINT
    from distbelief.model.zoo import build_model

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a finished run directory (no summary.json): "
                        "give the directory a train run printed")
    summary = json.loads(summary_path.read_text())
    cfg = load_config(run_dir / "config.toml")
    model = build_model(cfg.model.name, tuple(summary["model"]["input_shape"]),
                        summary["model"]["num_classes"])  # the model's output width
    model.load_state_dict(torch.load(run_dir / CHECKPOINT, weights_only=True))
    return model
