"""What the GPU benchmarks share: the google/gemma-2b model they build, the hub patch that points the service at
it, the quotes they train on, a recording trainer reporter and the log line.

``bench/gpu_smoke.py`` and ``bench/train_bench.py`` import it as ``common`` (the script's own folder, bench/, is
on ``sys.path``), after putting the repository root on ``sys.path`` for ``app`` and ``worker``.
"""

from __future__ import annotations

import gc
import gzip
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM  # noqa: E402

import worker.models  # noqa: E402
from app.core.settings import Settings  # noqa: E402

HUB_ID = "google/gemma-2b"


def log(*x: Any) -> None:
    print(*x, flush=True)


def load_quotes(src: Path) -> list[dict[str, Any]]:
    """The 651 quotes of ``src/quotes.jsonl`` (from the ignored ``.gpu/`` folder by default), one row a line."""
    return [json.loads(line) for line in (src / "quotes.jsonl").read_text().splitlines() if line.strip()]


class RecordingReporter:
    """The trainer's Reporter protocol: records each step, eval point and event, with when it was reported."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.times: list[float] = []
        self.losses: list[float] = []
        self.steps: list[int] = []
        self.points: list[dict[str, Any]] = []  # progress points: step, time, loss, learning_rate, tokens_seen
        self.evals: list[dict[str, Any]] = []  # eval_loss points: step, time, eval_loss
        self.events: list[dict[str, Any]] = []  # kind, data, record
        self.eval_gaps: dict[int, float] = {}  # step -> s from that step's progress report to its eval_loss
        self._last: tuple[str, int, float] | None = None  # what was reported last: kind, step, when

    def progress(self, step: int, total_steps: int, eta_seconds: float | None, metrics: dict[str, float],
                 point: dict[str, Any]) -> None:
        now = time.monotonic()
        self.times.append(now)
        self.steps.append(step)
        self.points.append(dict(point))
        self._last = ("progress", step, now)
        if "loss" in metrics:
            self.losses.append(metrics["loss"])
        if step == 1 or step % 10 == 0 or step == total_steps:
            shown = json.dumps({k: round(v, 5) for k, v in metrics.items()})
            log(f"  step {step}/{total_steps} eta {eta_seconds} {shown} tokens_seen {point.get('tokens_seen')}")

    def evaluated(self, point: dict[str, Any]) -> None:
        now = time.monotonic()
        self.evals.append(dict(point))
        # trl evaluates inside trainer.train() right after logging that step: the gap is the eval's duration.
        # The evaluations before and after training (trainer.evaluate()) follow no progress report of their own.
        if self._last and self._last[0] == "progress" and self._last[1] == point.get("step"):
            self.eval_gaps[int(point["step"])] = now - self._last[2]
        self._last = ("evaluated", int(point.get("step", -1)), now)
        log(f"  eval {json.dumps(point)}")

    def event(self, kind: str, data: dict[str, Any], record: dict[str, Any] | None = None) -> None:
        self.events.append({"kind": kind, "data": data, "record": record, "t": time.monotonic() - self.t0})
        log(f"  event {kind}: {json.dumps(data, default=str)}")

    def phase(self, progress: dict[str, Any]) -> None:
        self.events.append({"kind": "phase", "data": dict(progress), "record": None, "t": time.monotonic() - self.t0})

    def should_stop(self) -> bool:
        return False

    def step_seconds(self, without_evals: bool = False) -> list[float]:
        """Gaps between consecutive progress reports; ``without_evals`` drops those that held an eval."""
        return [b - a for s, a, b in zip(self.steps, self.times, self.times[1:], strict=False)
                if not (without_evals and s in self.eval_gaps)]

    def tokens_seen(self) -> int | None:
        """trl's own count of training tokens (``num_tokens``), as of the last step reported."""
        seen = [p["tokens_seen"] for p in self.points if p.get("tokens_seen") is not None]
        return seen[-1] if seen else None

    def event_data(self, kind: str) -> dict[str, Any] | None:
        found = [e["data"] for e in self.events if e["kind"] == kind]
        return found[-1] if found else None


def build_model(src: Path, model_dir: Path, tiny: bool, device: str) -> tuple[int, float]:
    """google/gemma-2b with random weights (or a tiny Gemma) + the Gemma 3 tokenizer, saved to ``model_dir``."""
    t = time.monotonic()
    model_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(src / "tokenizer.json.gz") as f, open(model_dir / "tokenizer.json", "wb") as g:
        shutil.copyfileobj(f, g)
    shutil.copy(src / "tokenizer_config.json", model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = json.loads((src / "gemma-2b-config.json").read_text())
    cfg["vocab_size"] = 262144
    assert len(tok) <= cfg["vocab_size"], (len(tok), cfg["vocab_size"])
    if tiny:  # same family, CPU-sized (bnb's CPU kernels want dims % 32 == 0)
        cfg |= dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16)
    for k in ("architectures", "model_type", "torch_dtype"):
        cfg.pop(k, None)
    config = GemmaConfig(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = GemmaForCausalLM(config).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n, time.monotonic() - t


def patch_hub(model_dir: Path) -> None:
    """There is no hub on the benchmark machine (and google/gemma-2b is gated): the hub download is the one
    part of the path that cannot exist here. Point that hub id, and only it, at the local folder built above;
    everything after ``_source`` (AutoTokenizer/AutoModelForCausalLM.from_pretrained with NF4) is the service's."""
    original = worker.models._source

    def _source(name: str, settings: Settings) -> tuple[str, dict[str, Any]]:
        if name == HUB_ID:
            return str(model_dir), {}
        return original(name, settings)

    worker.models._source = _source
