"""Where a replica computes (``--device``), and its copies between device and host memory.

The shards always keep the parameters on the CPU (DistBelief's parameter server).
A replica (or partition) process on a GPU keeps its model, its gradient buffers
and its batches on the device, and every exchange with the shards goes through
host buffers: the client's gradient buffers (`ps.client.PSClient.grad_buffers`,
which the shards read in place over shm) and a parameter buffer that pulls land
in. `DeviceMirror` pairs each device tensor with its host twin and copies between
them on a side CUDA stream, non-blocking, through pinned memory:

- the client's shared-memory gradient buffers (``/dev/shm``) are pinned *in place*
  with ``cudaHostRegister``, so a device-to-host copy lands straight where the shard
  reads it, with no staging copy (its gloo buffers are allocated pinned instead,
  ``PSClient(pinned=True)``);
- the parameter buffer is a pinned host tensor the mirror allocates.

On the CPU a tensor is its own twin (the model's parameters are the buffer pulls
land in, its gradients the client's buffers): no copy is ever made and every
handle is done at once, so the same code runs everywhere and a CPU job does
exactly what it did before.

Role processes are forked from the zygote (`runtime.zygote`), which imports torch
but never touches CUDA; a replica initialises CUDA itself, after the fork (a
process that had, before forking, would give children that cannot use it).

Blocking and threads: the mirror is used by one thread (the replica's). A `Copy`
handle may be waited for from any thread (the client's shard threads wait for a
gradient copy before pushing it); `wait` polls the copy's CUDA event with the
device made current, up to a timeout.

Example (a replica's step)::

    with DeviceMirror(device) as mirror:
        grads = [mirror.device_twin(g) for g in ps.grad_buffers]  # backward() writes here
        flat = FlatModel(model.to(device), grads=grads)
        host = mirror.host_twin(flat.params)                       # pulls land here
        ps.pull(host).wait(timeout)
        arrived = mirror.from_host_async(flat.params)              # host -> device, side stream
        xb, yb = mirror.to_device(*feed.next())
        arrived.wait(timeout)                                      # before the forward
        loss = runner.train_step(xb, yb)
        ps.push(0, after=mirror.to_host_async(grads[0]))           # pushed once copied
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from typing import Any, Mapping

import torch

from distbelief.config import parse_device

POLL_SECONDS = 50e-6
"""How often a waiting thread asks whether a copy finished (a copy of a 40 MB gradient
takes ~2 ms over PCIe 4)."""
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID")
"""Where torchrun and SLURM say which of this host's processes this one is."""


def local_rank(ident: int, part: int | None, partitions: int,
               env: Mapping[str, str] | None = None) -> int:
    """This replica process's rank among the replica processes of its host.

    A local cluster (the launcher sets DISTBELIEF_ROLE) numbers them replica * K +
    partition (K partitions per replica); a rank of a multi-host job takes LOCAL_RANK
    (torchrun) or SLURM_LOCALID (SLURM), else 0 (one process per host, by hand).

    Example::

        local_rank(1, 0, 2, env={"DISTBELIEF_ROLE": "replica"})   # 2
    """
    env = os.environ if env is None else env
    if "DISTBELIEF_ROLE" not in env:
        for name in LOCAL_RANK_VARIABLES:
            if env.get(name, "").isdigit():
                return int(env[name])
        return 0
    return ident * partitions + (part or 0)


def replica_device(spec: str, rank: int) -> torch.device:
    """The device of the replica process with local rank `rank` under ``--device spec``:
    cpu; cuda:N as given; for "cuda", cuda:(rank mod the visible GPUs). RuntimeError
    when this host has no CUDA device (the job's config was checked on another host)."""
    index = parse_device(spec)
    if spec == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (index is not None and index >= count):
        raise RuntimeError(f"--device {spec}: the host {socket.gethostname()} has {count} CUDA "
                           "devices: give every replica host a GPU, or leave --device out")
    return torch.device("cuda", rank % count if index is None else index)


def use_device(device: torch.device) -> None:
    """Make `device` the calling thread's current CUDA device (nothing for the CPU): a
    thread that makes CUDA calls without it would open a context on GPU 0 as well."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def collective_backend(members: list[dict]) -> str:
    """The backend for a collective among members described as {"host": h, "device": d}:
    "nccl" when every member is on a GPU of its own, else "gloo" (NCCL refuses two ranks
    on one GPU; gloo reduces CPU tensors, and CUDA ones through host memory).

    Example::

        collective_backend([{"host": "a", "device": "cuda:0"},
                            {"host": "a", "device": "cuda:1"}])   # "nccl"
    """
    gpus = [(m["host"], m["device"]) for m in members]
    on_gpus = all(d.startswith("cuda") for _, d in gpus)
    return "nccl" if gpus and on_gpus and len(set(gpus)) == len(gpus) else "gloo"


def device_summary(device: str, done: list[dict]) -> dict:
    """The ``device`` field of summary.json: the --device given, where each replica process
    computed, and its copies between device and host, summed (from the replicas' done
    records; see `DeviceMirror.stats`)."""
    records = [d["device"] for d in done if isinstance(d.get("device"), dict)]
    collectives = sorted({d["collective"] for d in done if "collective" in d})
    return {"option": device, "replicas": [r["device"] for r in records],
            "copies": sum(r["copies"] for r in records),
            "copy_bytes": sum(r["copy_bytes"] for r in records),
            "copy_seconds": sum(r["copy_seconds"] for r in records),
            **({"collective": collectives[0] if len(collectives) == 1 else collectives}
               if collectives else {})}


def to_cpu(tree: Any) -> Any:
    """`tree` (dicts, lists, tuples of tensors and values) with every tensor on the CPU, e.g.
    an optimizer's state before it is saved (a CPU tensor is returned as it is)."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


class Copy:
    """A copy between host and device in flight; `wait()` blocks until it is done.

    `event` is what says so (a CUDA event recorded after the copy: its ``query()``);
    `device`, the CUDA device it belongs to, is made the asking thread's current
    device while it asks. Thread-safe: any thread may wait. A copy with no event (the
    CPU's, or one with nothing to copy) is done already.
    """

    def __init__(self, event: Any = None, device: torch.device | None = None):
        self._event, self._device = event, device

    def done(self) -> bool:
        if self._event is None:
            return True
        with _current(self._device):
            return bool(self._event.query())

    def wait(self, timeout: float | None = None) -> None:
        """Block until the copy is done; TimeoutError after `timeout` seconds (None: no
        limit)."""
        if self._event is None:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with _current(self._device):
            while not self._event.query():
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"a copy between {self._device} and host memory did not "
                                       f"finish within {timeout:g} s (--timeout)")
                time.sleep(POLL_SECONDS)


DONE = Copy()
"""The handle of a copy that had nothing to do (or was done at once)."""


class DeviceMirror:
    """The device copies of a replica's host buffers, and the copies between them.

    Owns the side stream, the pinned host buffers it allocates and the in-place
    registrations it made; `close` (or leaving the ``with`` block) waits for every copy
    and undoes the registrations. On CUDA it makes its device the process's current
    one. Used by one thread; see the module doc for an example.

    `stats()` counts the copies made, their bytes and the seconds the device spent on
    them (measured with CUDA events on the side stream; none on the CPU).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._twins: dict[tuple[int, int], torch.Tensor] = {}  # device tensor -> host twin
        self._registered: list[int] = []  # host pointers pinned in place
        self._timings: deque = deque()  # (start, end) events of copies not yet counted
        self.copies = self.copy_bytes = 0
        self.copy_seconds = 0.0
        self._stream = None
        use_device(self.device)
        if self.cuda:
            self._stream = torch.cuda.Stream(self.device)

    # ---- pairing -------------------------------------------------------------------

    def device_twin(self, host: torch.Tensor) -> torch.Tensor:
        """The device tensor paired with host buffer `host` (e.g. a client's gradient
        buffer): `host` itself on the CPU; on CUDA zeros on the device, with `host`
        pinned in place so that copies into it run asynchronously."""
        if not self.cuda:
            self._twins[_key(host)] = host
            return host
        self._pin(host)
        twin = torch.zeros(host.shape, dtype=host.dtype, device=self.device)
        self._twins[_key(twin)] = host
        return twin

    def host_twin(self, tensor: torch.Tensor) -> torch.Tensor:
        """The host buffer paired with device tensor `tensor` (made on first call: pinned
        memory on CUDA; `tensor` itself on the CPU)."""
        key = _key(tensor)
        if key not in self._twins:
            self._twins[key] = (torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                                if self.cuda else tensor)
        return self._twins[key]

    def to_device(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors on the device (a batch); on the CPU the same tensors."""
        return tuple(t.to(self.device, non_blocking=True) for t in tensors)

    # ---- copies --------------------------------------------------------------------

    def to_host_async(self, tensor: torch.Tensor) -> Copy:
        """Start copying device tensor `tensor` (e.g. a gradient) into its host twin, once
        the work queued on the current stream so far (its backward) is done. Do not
        change `tensor` until the copy is done; read the host twin only after `wait()`."""
        return self._copy(tensor, self._host(tensor))

    def from_host_async(self, tensor: torch.Tensor) -> Copy:
        """Start copying the host twin of device tensor `tensor` (e.g. pulled parameters)
        into it; `wait()` before the next forward, and before writing the host twin again."""
        return self._copy(self._host(tensor), tensor)

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            return self._twins[_key(tensor)]
        except KeyError:
            raise ValueError("the tensor has no host twin in this mirror: pair it first with "
                             "device_twin or host_twin") from None

    def _copy(self, src: torch.Tensor, dst: torch.Tensor) -> Copy:
        if not self.cuda:
            return DONE  # on the CPU a tensor is its own twin
        self._collect(block=False)
        produced = torch.cuda.current_stream(self.device).record_event()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(produced)  # after the compute that wrote `src` (or `dst`)
            start.record(self._stream)
            dst.copy_(src, non_blocking=True)
            end.record(self._stream)
        for t in (src, dst):  # the allocator must not reuse them while the side stream works
            if t.is_cuda:
                t.record_stream(self._stream)
        self._timings.append((start, end))
        self._count(src)
        return Copy(end, self.device)

    def _count(self, src: torch.Tensor) -> None:
        self.copies += 1
        self.copy_bytes += src.numel() * src.element_size()

    def _collect(self, block: bool) -> None:
        """Add the device time of the finished copies (all of them with `block`)."""
        while self._timings and (block or self._timings[0][1].query()):
            start, end = self._timings.popleft()
            end.synchronize()
            self.copy_seconds += start.elapsed_time(end) / 1000

    def stats(self) -> dict:
        """{"device", "copies", "copy_bytes", "copy_seconds"} so far (waits for the copies
        in flight, to count them)."""
        if self.cuda:
            self._collect(block=True)
        return {"device": str(self.device), "copies": self.copies,
                "copy_bytes": self.copy_bytes, "copy_seconds": self.copy_seconds}

    # ---- pinning -------------------------------------------------------------------

    def _pin(self, host: torch.Tensor) -> None:
        """Page-lock `host` in place (unless it is pinned already), so that copies into it
        are asynchronous DMA; undone by `close`."""
        if host.is_pinned() or host.numel() == 0:
            return
        code = int(torch.cuda.cudart().cudaHostRegister(
            host.data_ptr(), host.numel() * host.element_size(), 0))
        if code != 0:
            raise RuntimeError(f"could not pin a {host.numel() * host.element_size()} byte "
                               f"host buffer in place for {self.device} (cudaHostRegister "
                               f"error {code}); --transport gloo uses buffers allocated pinned")
        self._registered.append(host.data_ptr())

    def close(self) -> None:
        """Wait for every copy, then unpin what was pinned in place. Idempotent."""
        if self.cuda:
            self._stream.synchronize()
            self._collect(block=True)
        while self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._registered.pop())

    def __enter__(self) -> DeviceMirror:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _current(device: torch.device | None):
    """A block with `device` the current CUDA device (None: leaves it alone)."""
    return contextlib.nullcontext() if device is None else torch.cuda.device(device)


def _key(tensor: torch.Tensor) -> tuple[int, int]:
    return tensor.data_ptr(), tensor.numel()
