"""Forward + backward of a packed bin captured as one CUDA graph per bin shape, then replayed.

Why: a micro-batch of the LoRA model is about 3,500 small kernels (peft's LoRA branches, fp32 RMSNorm, rotary,
residuals) launched from Python; the eager loop is bound by the host, not the GPU (RESULTS.md runs T2-T4: the GPU
busy under half the time at 3,700-token micro-batches, and 200 ms a step for the default job's 4 examples). A
replayed graph launches all of them in one call.

How: the trainable parameters' ``.grad`` tensors are allocated once and kept (``bind_grads`` puts them back after
the Trainer's ``zero_grad(set_to_none=True)``); the captured backward accumulates into them in place. Inputs are one
static (4, rows, width) tensor per shape and the scale; each replay adds its loss into ``loss`` (outside the graphs'
shared memory pool), so nothing a replay leaves behind lives in the pool and any shape can be replayed after any
other.
Before a capture the step runs twice eagerly on a side stream (lazy initialisations must happen outside capture);
the gradients and the loss are restored afterwards, so a capture changes nothing.

The optimizer step, clipping and evaluation stay eager. Used only on CUDA without gradient checkpointing
(``Settings.train_cuda_graphs``); a capture that fails switches the trainer to the eager packed path for good.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("ftaas.cuda_graphs")

WARMUP = 2


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    data: torch.Tensor


class GraphedSteps:
    """Runs ``loss_fn(data, scale)`` + backward per bin, as replays of one graph per bin shape."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 params: list[torch.nn.Parameter], device: torch.device) -> None:
        self.loss_fn = loss_fn
        self.params = params
        self.device = device
        self.grads = [torch.zeros_like(p) for p in params]
        self.scale = torch.zeros((), dtype=torch.float32, device=device)
        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, ...], _Captured] = {}
        self.capture_seconds = 0.0

    def bind_grads(self) -> None:
        """Make every parameter's ``.grad`` the static tensor the graphs write into (zeroed if it was None)."""
        zero = []
        for p, g in zip(self.params, self.grads, strict=True):
            if p.grad is g:
                continue
            if p.grad is None:
                zero.append(g)
            else:
                g.copy_(p.grad)
            p.grad = g
        if zero:
            torch._foreach_zero_(zero)

    def _step(self, data: torch.Tensor) -> None:
        loss = self.loss_fn(data, self.scale)
        loss.backward()
        self.loss.add_(loss.detach())

    def run(self, data: torch.Tensor, scale: float) -> None:
        """Forward + backward of one bin (``data`` a host tensor (4, rows, width)), gradients added into ``.grad``."""
        self.bind_grads()
        self.scale.fill_(scale)
        captured = self.graphs.get(tuple(data.shape))
        if captured is None:
            captured = self._capture(data)
        captured.data.copy_(data.pin_memory(), non_blocking=True)
        captured.graph.replay()

    def _capture(self, sample: torch.Tensor) -> _Captured:


        t0 = time.monotonic()
        data = sample.to(self.device)
        saved = [*(g.clone() for g in self.grads), self.loss.clone()]
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self._step(data)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.empty_cache()  # the warm-up's activations: the graph's pool will hold its own
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self._step(data)
        finally:
            torch._foreach_copy_([*self.grads, self.loss], saved)
        captured = self.graphs[tuple(data.shape)] = _Captured(graph, data)
        self.capture_seconds += time.monotonic() - t0
        log.info("captured the training step for %s bins in %.2f s", tuple(data.shape[1:]), time.monotonic() - t0)
        return captured

    def take_loss(self) -> torch.Tensor:
        """The loss summed over the bins run since the last call (a device tensor), and reset."""
        out = self.loss.clone()
        self.loss.zero_()
        return out
