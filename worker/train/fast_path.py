"""The fast training path: each step's whole effective batch, packed into token-budgeted bins.

Semantics (the same as the notebook's recipe, only grouped differently):

* One optimizer step = one effective batch of ``batch_size x gradient_accumulation_steps`` examples, drawn by
  the Trainer's seeded random sampler exactly as the notebook's ``batch 1 x accumulation 4`` draws them (the
  permutation does not depend on the batch size), so ``max_steps`` means the same examples as before.
* The Trainer sees that batch as one batch (accumulation 1). The training DataLoader packs its rows into bins of
  at most ``token_budget`` tokens on the host (``PackingCollator``, worker/train/packing.py): whole examples back
  to back, position ids restarting per example, a block-diagonal causal mask, so no example attends to another and each
  computes what it computes alone; ``FastSFTTrainer.training_step`` runs forward + backward per bin
  (worker/train/packed_loss.py), replayed from a CUDA graph per bin size on the GPU (worker/train/cuda_graphs.py).
  Without packing: length-grouped, right-padded micro-batches (``split_batch``).
* Loss: the per-token mean over the effective batch (sum of token losses / label tokens of the whole step),
  like trl's loss under gradient accumulation; each bin contributes its sum / that count.
* The logits are never materialised whole: the packed loss runs the LM head in chunks (trl's fused LM head on
  the padded path).

GPU-only helpers: ``auto_token_budget`` (from free memory and the model's shape) and ``compile_decoder_layers``
(regional ``torch.compile`` of each decoder layer for training; opt-in). The NF4 base is dequantised once
beforehand (worker/nf4.py: bnb's own dequantisation through transformers, so the matmuls run in bf16 without a
per-call dequantize).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel
from trl import SFTTrainer

from worker.train.cuda_graphs import GraphedSteps
from worker.train.deferred_log import DeferredLogs
from worker.train.packed_loss import PackedForward
from worker.train.packing import CAPACITY_STEP, PackedBin, PackedStep, PackingCollator, is_right_padded, pack

log = logging.getLogger("ftaas.fast_train")

CPU_TOKEN_BUDGET = 2048
PACK_MAX_TOKENS = 4096
MIN_BUDGET, MAX_BUDGET = 256, 65_536


def micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices grouped longest first so that rows x longest row <= ``budget`` (at least one row each).

    Greedy filling pads: on the 651 quotes, 256 rows a step and a 3,400-token budget, 1.40 padded tokens per real
    one. A dynamic programme (fewest micro-batches, then fewest padded tokens) gets 1.27 with the same count, but
    took 120 ms of host time a call here (loaded 2-core CPU), and the GPU loop is host-bound already (RESULTS.md
    run T2), so it is not used (not measured on the GPU).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def label_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal loss scores: next-token labels that are not -100."""
    return int((labels[:, 1:] != -100).sum())


def split_batch(inputs: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """The right-padded batch ``inputs`` as length-grouped micro-batches, each trimmed to its longest row."""
    mask = inputs["attention_mask"]
    lengths = [int(n) for n in mask.sum(dim=1).tolist()]
    rows = mask.shape[0]
    out = []
    for group in micro_batches(lengths, budget):
        width = max(lengths[i] for i in group)
        index = torch.tensor(group, device=mask.device)
        out.append({k: v.index_select(0, index)[:, :width] if torch.is_tensor(v) and v.dim() == 2
                    and v.shape[0] == rows else v for k, v in inputs.items()})
    return out


def activation_bytes_per_token(model: PreTrainedModel, checkpointing: bool) -> int:
    """A conservative estimate of the activations kept for backward, per token (bf16), from the model's shape.

    Without checkpointing each layer keeps its norms' inputs (fp32), q/k/v/attention outputs, the MLP's gate, up,
    activation and product (``4 x intermediate``); with it, one hidden state per layer plus one layer's worth.
    """
    cfg = model.config.get_text_config()
    hidden, inter, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    heads = cfg.num_attention_heads * getattr(cfg, "head_dim", hidden // cfg.num_attention_heads)
    per_layer = (12 * hidden + 4 * inter + 4 * heads) * 2
    return (layers * hidden * 4 + per_layer) if checkpointing else layers * per_layer


def auto_token_budget(model: PreTrainedModel, device: str, checkpointing: bool, memory_gib: float,
                      fixed: int = 0) -> int:
    """Padded tokens per micro-batch: ``fixed`` when set; on the GPU what fits in ``memory_gib`` (capped by what
    is free) beside what is allocated now, with 2 GiB kept for the LM-head tiles and the allocator."""
    if fixed:
        return fixed
    if device != "cuda" or not torch.cuda.is_available():
        return CPU_TOKEN_BUDGET
    free, _ = torch.cuda.mem_get_info()
    allocated = torch.cuda.memory_allocated()
    room = min(memory_gib * 2**30 - allocated, free) - 2 * 2**30
    budget = int(room // activation_bytes_per_token(model, checkpointing))
    return max(MIN_BUDGET, min(MAX_BUDGET, budget))


def pack_budget(budget: int) -> int:
    """A packed bin's token budget from the one planned from memory: a multiple of the bin capacity step, at most
    ``PACK_MAX_TOKENS``. Measured (RESULTS.md run T5, H200, gemma-2b shape, rows of 256,
    CUDA graphs, 40 steps): 23,809 tokens/s with 3,072-token bins (16.4 GiB), 22,958 with 4,096 (19.5 GiB)."""
    return min(PACK_MAX_TOKENS, max(CAPACITY_STEP, budget // CAPACITY_STEP * CAPACITY_STEP))


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Regional compilation: each decoder layer's forward (and, through AOTAutograd, its backward) runs as a
    ``torch.compile`` graph with dynamic batch and sequence sizes, shared by all layers (same code, same-shaped
    weights). The eager loop launches about 190 kernels per layer per micro-batch (LoRA, fp32 RMSNorm, rotary,
    residuals: RESULTS.md run T2); compiled, the elementwise work fuses and the launches come from generated code.

    Only training calls are compiled (module in training mode, gradients on): evaluation and generation (with a
    KV cache and one-token steps) stay eager, so they pay no compile. A layer whose compiled call raises falls back
    to eager for the rest of the process. Returns the number of layers wrapped.

    Measured (RESULTS.md run T4, H200, gemma-2b shape): 19,191 against 13,968 tokens/s steady and 2.2 GiB less
    memory, but 81 s of compiling in the first step (four graphs: layer 0's input needs no grad, and sequence
    lengths that are or are not a multiple of 8), and losses that run ahead of eager's once LoRA B is non-zero
    (about 1 % after 10 steps; equal on the CPU in fp32), probably fp32 intermediates in the fused kernels where
    eager rounds to bf16 (unverified). Hence off by default (``train_compile_min_examples``).
    """
    import torch._dynamo.config as dynamo_config
    from transformers.modeling_layers import GradientCheckpointingLayer

    # All layers share one code object: allow a few entries per shape class (mask or none, one row or many).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, int(getattr(dynamo_config, name))))
    if hasattr(dynamo_config, "accumulated_recompile_limit"):
        dynamo_config.accumulated_recompile_limit = max(512, int(dynamo_config.accumulated_recompile_limit))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    state = {"failed": False}
    for layer in layers:
        layer.forward = _training_compiled(layer, layer.forward, state)  # type: ignore[method-assign]
    return len(layers)


def _training_compiled(layer: torch.nn.Module, eager: Callable[..., Any], state: dict[str, bool]) -> Callable[..., Any]:
    compiled = torch.compile(eager, dynamic=True)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if state["failed"] or not (layer.training and torch.is_grad_enabled()):
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception:  # a compiler bug must not fail the job: train eagerly instead
            log.warning("torch.compile of the decoder layers failed; training eagerly", exc_info=True)
            state["failed"] = True
            return eager(*args, **kwargs)

    return forward


class EagerSteps:
    """The packed bins' forward + backward run as they come (the CPU, and the GPU without CUDA graphs)."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], device: torch.device) -> None:
        self.loss_fn, self.device = loss_fn, device
        self.loss = torch.zeros((), dtype=torch.float32, device=device)

    def run(self, data: torch.Tensor, scale: float) -> None:
        # Non-blocking from the DataLoader's pinned memory, the scale filled on the device: no wait for the GPU.
        scale_t = torch.full((), scale, dtype=torch.float64, device=self.device)
        loss = self.loss_fn(data.to(self.device, non_blocking=True), scale_t)
        loss.backward()
        self.loss = self.loss + loss.detach()

    def take_loss(self) -> torch.Tensor:
        out, self.loss = self.loss, torch.zeros_like(self.loss)
        return out


class FastSFTTrainer(DeferredLogs, SFTTrainer):
    """SFTTrainer whose training step runs the effective batch packed into token-budgeted bins (worker/train/packing.py;
    module doc there and above), with the forward + backward of each bin replayed from a CUDA graph when
    ``cuda_graphs``. Falls back to length-grouped padded micro-batches (``split_batch``) where packing does not
    apply: fp16 (needs loss scaling), a trainable LM head, attention layer types it cannot mask, left padding.

    The training DataLoader packs on the host (``PackingCollator``) and each step's log is read back one step
    later (worker/train/deferred_log.py): nothing in a step waits for the GPU, so the host queues step N+1 while the GPU
    runs step N."""

    def __init__(self, *args: Any, token_budget: int = CPU_TOKEN_BUDGET, packing: bool = True,
                 cuda_graphs: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_budget = token_budget
        self.packing = packing
        self.cuda_graphs = cuda_graphs
        self.micro_batch_counts: list[int] = []  # micro-batches (bins) per step, for the bench and tests
        self.bins_seen: list[list[PackedBin]] | None = None  # set to a list to record each step's bins (tests)
        self._runner: EagerSteps | GraphedSteps | None = None
        self._params_counted: int | None = None

    def _pad_id(self) -> int:
        return getattr(self.processing_class, "pad_token_id", None) or 0

    def _pack(self, inputs: dict[str, Any]) -> list[PackedBin] | None:
        if isinstance(inputs.get("packed"), PackedStep):
            return inputs["packed"].bins  # type: ignore[no-any-return]
        mask = inputs["attention_mask"].cpu()  # a batch not from the training DataLoader (tests, the bench)
        if not is_right_padded(mask):
            return None
        return pack(inputs["input_ids"], mask, inputs["labels"], self.token_budget, self._pad_id())

    def get_train_dataloader(self) -> Any:
        """The Trainer's, with the batches packed by the collator when the packed path applies."""
        if self._packed_runner() is None:
            return super().get_train_dataloader()
        collate = self.data_collator
        self.data_collator = PackingCollator(collate, self.token_budget, self._pad_id())
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate, 6 x input tokens (padding included) x parameters, also for packed steps."""
        step = inputs.get("packed")
        if not isinstance(step, PackedStep):
            return int(super().floating_point_ops(inputs))
        if self._params_counted is None:
            self._params_counted = int(self.model.num_parameters(exclude_embeddings=True))  # type: ignore[union-attr,operator]
        return 6 * sum(b.data[0].numel() for b in step.bins) * self._params_counted

    def _packed_runner(self) -> EagerSteps | GraphedSteps | None:
        model: Any = self.model
        if self._runner is None and self.packing and not self.args.fp16 and PackedForward.supported(model):
            device = next(p.device for p in model.parameters() if p.requires_grad)
            forward = PackedForward(model, torch.bfloat16 if self.args.bf16 else None)
            if self.cuda_graphs and device.type == "cuda" and not self.args.gradient_checkpointing:
                params = [p for p in model.parameters() if p.requires_grad]
                self._runner = GraphedSteps(forward, params, device)
            else:
                self._runner = EagerSteps(forward, device)
        return self._runner

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        runner = self._packed_runner()
        bins = self._pack(inputs) if runner is not None else None
        if runner is None or not bins:
            return self._padded_step(model, inputs, max(1, label_tokens(inputs["labels"])))
        total = max(1, sum(b.targets for b in bins))  # = label_tokens(labels), counted on the host
        model.train()
        self.micro_batch_counts.append(len(bins))
        if self.bins_seen is not None:
            self.bins_seen.append(bins)
        for b in bins:
            try:
                runner.run(b.data, 1.0 / total)
            except torch.OutOfMemoryError:
                raise  # the job's out_of_memory error, not a reason to try eagerly
            except Exception:
                if not isinstance(runner, GraphedSteps):
                    raise
                log.warning("capturing the training step as a CUDA graph failed; training eagerly", exc_info=True)
                carried = runner.take_loss()
                runner = self._runner = EagerSteps(runner.loss_fn, runner.device)
                runner.loss = carried
                runner.run(b.data, 1.0 / total)
        self._total_train_tokens += sum(b.tokens for b in bins)  # trl's num_tokens: non-padding input tokens
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return runner.take_loss()

    def _padded_step(self, model: torch.nn.Module, inputs: dict[str, Any], total: int) -> torch.Tensor:
        parts = split_batch(inputs, self.token_budget)
        self.micro_batch_counts.append(len(parts))
        loss: torch.Tensor | None = None
        for part in parts:
            step_loss = super().training_step(model, part, num_items_in_batch=total)
            loss = step_loss if loss is None else loss + step_loss
        assert loss is not None
        return loss
