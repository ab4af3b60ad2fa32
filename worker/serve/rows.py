"""The requests and rows of worker.serve.engine: a request's prompts, settings, outputs and times, and one row
(one completion of one prompt) with its place in the cache, its tokens and its streaming state."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from worker.serve.adapter_slots import BASE_MODEL
from worker.serve.logprobs import RowLogprobs
from worker.serve.sampling import Params

Piece = Callable[[int, str], None]  # (output index, new text)


@dataclass
class Request:
    prompts: list[str]
    params: Params
    adapter: str | None
    on_piece: Piece | None
    future: Future[dict[str, Any]]
    t_submit: float = field(default_factory=time.monotonic)
    t_start: float | None = None
    t_first: float | None = None
    t_load: float | None = None
    load_ms: float = 0.0
    cache: str | None = None
    grammar: Any = None  # the compiled matcher its rows copy (worker.serve.grammar), with a response_format
    outputs: list[dict[str, Any] | None] = field(default_factory=list)  # prompt-major: outputs[i * n + j]
    left: int = 0

    def result(self) -> dict[str, Any]:
        """The finished request: its outputs, whether its adapter was a cache ``hit`` or ``load``, its times."""
        end = time.monotonic()
        start = self.t_start or end
        return {"outputs": self.outputs, "adapter_cache": self.cache,
                "timing": {"load_ms": round(self.load_ms, 1), "generate_ms": round((end - start) * 1000, 1),
                           "engine_ms": round((end - self.t_submit) * 1000, 1),
                           "ttft_ms": round(((self.t_first or end) - self.t_submit) * 1000, 1)}}


@dataclass
class Row:
    req: Request
    index: int  # its output: prompt i's completion j is i * n + j
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    row: int = -1  # its row of the cache and the step buffers (-1 while waiting)
    slot: int = BASE_MODEL  # its adapter's slot
    pos: int = 0
    sent: int = 0
    gen: torch.Generator | None = None
    text: str = ""  # decoded so far (kept only for stop strings and streaming)
    prefix: int = 0  # ids[prefix:read]: the window worker.decoding.decode_new decodes again
    read: int = 0
    lp: RowLogprobs | None = None  # with logprobs asked for
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times (penalties)
    matcher: Any = None  # its grammar's llguidance matcher (worker.serve.grammar), with a response_format
