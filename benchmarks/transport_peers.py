"""The peers distbelief's parameter server is measured against, in plain PyTorch.

Each runs the same step as `ps_bandwidth.measure` — a client pushes a
whole-model gradient, a server applies it with ``torch.optim.SGD`` and sends
the whole model back — between two processes on this host, one torch thread
each, with nothing but the transport around it:

* ``gloo_pair``: a raw gloo process group of two (`send`/`recv` of the tensors,
  no header, no protocol): the floor for distbelief's gloo transport;
* ``rpc``: the `torch.distributed.rpc` parameter-server pattern (one
  ``rpc_sync`` per step whose function applies the gradient on the server and
  returns the parameters), as PyTorch's own tutorial writes it.

`run_peer(name, numel, warmup, runs, steps_per_run)` starts both processes
(spawned, so the caller's state is not inherited), waits for them (bounded)
and returns the client's seconds per step of each timed run.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LR = 1.0
TIMEOUT = 120.0
PEERS = ("gloo_pair", "rpc")


def run_peer(name: str, numel: int, warmup: int, runs: int, steps_per_run: int) -> list[float]:
    """Seconds per step of each timed run of peer `name` (after `warmup` steps)."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; the peers are {', '.join(PEERS)}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_main, args=(name, rank, port, numel, warmup, runs,
                                               steps_per_run, results), daemon=True)
             for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"peer {name} failed (exit codes {[p.exitcode for p in procs]})")
        return results.get()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def _main(name: str, rank: int, port: int, numel: int, warmup: int, runs: int,
          steps_per_run: int, results) -> None:
    torch.set_num_threads(1)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "GLOO_SOCKET_IFNAME": "lo"})
    if name == "gloo_pair":
        times = _gloo_pair(rank, port, numel, warmup, runs, steps_per_run)
    else:
        times = _rpc(rank, numel, warmup, runs, steps_per_run)
    if rank == 1:
        results.put(times)


def _timed(step, warmup: int, runs: int, steps_per_run: int) -> list[float]:
    for _ in range(warmup):
        step()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(steps_per_run):
            step()
        out.append((time.perf_counter() - start) / steps_per_run)
    return out


def _gloo_pair(rank: int, port: int, numel: int, warmup: int, runs: int,
               steps_per_run: int) -> list[float]:
    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0,
                          timeout=datetime.timedelta(seconds=TIMEOUT))
    pg = dist.ProcessGroupGloo(store, rank, 2, datetime.timedelta(seconds=TIMEOUT))
    steps = warmup + runs * steps_per_run
    if rank == 0:  # the server: receive a gradient, apply it, send the parameters back
        params, grad = torch.zeros(numel), torch.empty(numel)
        param = torch.nn.Parameter(params)
        opt = torch.optim.SGD([param], lr=LR)
        for _ in range(steps):
            pg.recv([grad], 1, 0).wait()
            param.grad = grad
            opt.step()
            pg.send([params], 1, 0).wait()
        pg.barrier().wait()
        return []
    grad, params = torch.ones(numel), torch.empty(numel)

    def step() -> None:
        pg.send([grad], 0, 0).wait()
        pg.recv([params], 0, 0).wait()

    times = _timed(step, warmup, runs, steps_per_run)
    pg.barrier().wait()
    return times


_server_state: dict = {}


def _apply_and_return(grad: torch.Tensor) -> torch.Tensor:
    """On the RPC server: apply one gradient with SGD; the parameters go back."""
    param, opt = _server_state["param"], _server_state["opt"]
    param.grad = grad
    opt.step()
    return param.detach()


def _rpc(rank: int, numel: int, warmup: int, runs: int, steps_per_run: int) -> list[float]:
    from torch.distributed import rpc

    # TensorPipe's defaults: on one host it may pick shared memory for the tensors
    options = rpc.TensorPipeRpcBackendOptions(num_worker_threads=4, rpc_timeout=TIMEOUT)
    if rank == 0:  # before joining: the client's first call may come at once
        param = torch.nn.Parameter(torch.zeros(numel))
        _server_state.update(param=param, opt=torch.optim.SGD([param], lr=LR))
    rpc.init_rpc(f"w{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    times: list[float] = []
    if rank == 1:
        grad = torch.ones(numel)

        def step() -> None:
            rpc.rpc_sync("w0", _apply_and_return, args=(grad,))

        times = _timed(step, warmup, runs, steps_per_run)
    rpc.shutdown()  # waits for both sides
    return times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
