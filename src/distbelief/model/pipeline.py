"""Pipeline execution of a layer-wise split: stage k holds contiguous layers.

A batch is cut into M micro-batches. Stage k runs the operations
`pipeline_schedule.stage_ops(M, K, k)` in order: a forward of micro-batch m
receives its input from stage k-1 (stage 0 reads the data), keeps what
backward needs, and sends its output to stage k+1; a backward receives the
output's gradient from stage k+1 (the last stage starts from the loss) and
sends the input's gradient to stage k-1. The loss is the job's task's
(`distbelief.task`). Only these activations and gradients
travel, through host memory (a stage on a GPU copies what it sends to the host
and what it receives to its device). The parameter gradients accumulate over the
micro-batches into whatever ``.grad`` the stage's parameters point at (the partition's push
buffer), scaled so that their sum is the gradient of the whole batch's mean
loss. The Linear layers' weight gradients are deferred (`model.deferred`) and
computed, a layer at a time, whenever the stage would otherwise wait for its
neighbour; `flush()` completes them before they are read or pushed.

A `Link` is one side of a boundary: a channel it receives on and a channel it
sends on, each served by its own thread, so a stage never waits for its
neighbour to take a tensor (the order of operations can then never deadlock),
sending overlaps compute, and the stage can see whether a tensor has arrived.

Example (stage k of K, inside its process)::

    with Link(recv=fwd_in, send=bwd_out, name="b0") as prev, Link(...) as nxt:
        stage = PipelineStage(module, k, K, micro_batches=8, prev=prev, next=nxt, task=task)
        loss = stage.train_step(x, y)   # a float on the last stage, None elsewhere
"""

from __future__ import annotations

import queue
import threading

import torch
from torch import nn

from distbelief.model.deferred import DeferredWeights
from distbelief.model.pipeline_schedule import stage_ops
from distbelief.runtime.channel import HEADER_LEN, Channel, ChannelClosed
from distbelief.task import Task, make_task

MAX_DIMS = HEADER_LEN - 1  # the header carries ndim and the sizes


class Link:
    """Sends on one channel and receives on another, each from a thread of its own.

    `send` returns at once (the tensor is detached and must not change
    afterwards); `recv` blocks until a tensor arrived, and `ready()` says
    whether one has, so a stage can do other work (its deferred weight
    gradients) instead of waiting. Tensors are float32 with up to five
    dimensions; a header with the shape goes first. `close` sends a goodbye and
    waits for the peer's, so neither side's threads outlive the link. The first
    failure of either thread is raised by the next `send`, `recv` or `close`.
    """

    BYE = -1  # a header's ndim that ends the stream

    def __init__(self, recv: Channel | None, send: Channel | None, name: str,
                 timeout: float = 120.0):
        self.name, self.timeout = name, timeout
        self._in, self._out = recv, send
        self.bytes_sent = 0
        self._outgoing: queue.Queue = queue.Queue()
        self._incoming: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._sender = threading.Thread(target=self._send_loop, name=f"link-{name}-send",
                                        daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name=f"link-{name}-recv",
                                          daemon=True)
        self._sender.start()
        self._receiver.start()

    def send(self, tensor: torch.Tensor) -> None:
        self._raise()
        if tensor.dim() > MAX_DIMS:
            raise ValueError(f"{self.name}: a tensor crossing a partition boundary may have at "
                             f"most {MAX_DIMS} dimensions, got shape {tuple(tensor.shape)}")
        tensor = tensor.detach().to("cpu", torch.float32).contiguous()  # gloo sends host memory
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self._outgoing.put(tensor)

    def ready(self) -> bool:
        """A tensor (or a failure) is waiting: `recv` will not block."""
        return not self._incoming.empty()

    def recv(self) -> torch.Tensor:
        try:
            item = self._incoming.get(timeout=self.timeout)
        except queue.Empty:
            raise ChannelClosed(f"pipeline link {self.name}: nothing arrived within "
                                f"{self.timeout:.0f} s") from None
        if isinstance(item, BaseException):
            raise ChannelClosed(f"pipeline link {self.name}: {item}")
        return item

    def _send_loop(self) -> None:
        while True:
            tensor = self._outgoing.get()
            try:
                if tensor is None:
                    self._out.send_header(self.BYE)
                    return
                self._out.send_header(tensor.dim(), *tensor.shape)
                self._out.send(tensor)
            except BaseException as exc:  # surfaces in the stage's thread, see _raise
                self._error = exc
                return

    def _recv_loop(self) -> None:
        while True:
            try:
                ndim, *dims = self._in.recv_header()
                if ndim == self.BYE:
                    return
                out = torch.empty(dims[:ndim])
                self._in.recv(out)
            except BaseException as exc:  # the stage's next recv raises it
                self._incoming.put(exc)
                return
            self._incoming.put(out)

    def _raise(self) -> None:
        if self._error is not None:
            raise ChannelClosed(f"pipeline link {self.name}: {self._error}")

    def close(self) -> None:
        self._outgoing.put(None)
        self._sender.join(self.timeout)
        self._receiver.join(self.timeout)
        self._raise()

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:  # already failing: stop the sender, keep the first error; daemon threads
            self._outgoing.put(None)
            self._sender.join(5)


class PipelineStage:
    """Stage `stage` of `stages`: runs its part of the pipeline schedule for each batch.

    `prev` is the link to stage-1 (None on the first stage), `next` to stage+1
    (None on the last). `task`: whose loss the last stage computes (None: classify's
    cross-entropy). Used by one thread.
    """

    def __init__(self, module: nn.Module, stage: int, stages: int, *, micro_batches: int,
                 prev: Link | None, next: Link | None, kind: str = "1f1b",
                 task: Task | None = None):
        self.module, self.stage, self.stages = module, stage, stages
        self.task = task or make_task()
        self.prev, self.next = prev, next
        self.micro_batches, self.kind = micro_batches, kind
        self.first, self.last = stage == 0, stage == stages - 1
        self.weights = DeferredWeights(module)
        self.device = _device_of(module)  # where the tensors it receives go

    def flush(self) -> None:
        """Complete the parameter gradients (the Linear weights' are deferred, see
        `model.deferred`). Call before reading or pushing them."""
        self.weights.flush()

    @property
    def reports_loss(self) -> bool:
        return self.last

    def train_step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> float | None:
        """Forward and backward of one batch; the batch's mean loss on the last stage.

        `x` is needed on the first stage and `y` on the last (others may pass None).
        """
        m_count = self.micro_batches
        inputs = torch.tensor_split(x, m_count) if self.first else None
        if self.last:
            labels = torch.tensor_split(y, m_count)
            total = len(y)
        stash: dict[int, tuple] = {}
        loss_sum = 0.0
        for op, m in stage_ops(m_count, self.stages, self.stage, self.kind):
            if op == "F":
                inp = inputs[m] if self.first else self._recv(self.prev).requires_grad_()
                out = self.weights.forward(inp)
                if self.last:
                    # summed over the micro-batches this is the batch's mean loss
                    out = self.task.loss(out, labels[m], reduction="sum") / total
                    loss_sum += out.item()
                else:
                    self.next.send(out)
                stash[m] = (inp, out)
            else:
                inp, out = stash.pop(m)
                if self.last:
                    out.backward()
                else:
                    out.backward(self._recv(self.next))
                if not self.first:
                    self.prev.send(inp.grad)
        return loss_sum if self.last else None

    def _recv(self, link: Link) -> torch.Tensor:
        """The next tensor from `link`; while none has arrived, compute pending weight
        gradients (the pipeline's bubbles do the work that would otherwise wait)."""
        while not link.ready() and self.weights.flush_one():
            pass
        return link.recv().to(self.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """Forward only, micro-batch by micro-batch; the model's output on the last stage."""
        if self.first:
            chunks = torch.tensor_split(x, min(self.micro_batches, len(x)))
            count = len(chunks)
            if not self.last:
                self.next.send(torch.tensor([float(count)]))
        else:
            count = int(self._recv(self.prev).item())
            if not self.last:
                self.next.send(torch.tensor([float(count)]))
        outs = []
        for m in range(count):
            out = self.module(chunks[m] if self.first else self._recv(self.prev))
            if self.last:
                outs.append(out)
            else:
                self.next.send(out)
        return torch.cat(outs) if self.last else None


def _device_of(module: nn.Module) -> torch.device:
    """Where `module`'s parameters are (the CPU for a module without any)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))
