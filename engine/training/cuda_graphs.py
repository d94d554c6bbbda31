"""CUDA graphs of a micro-batch's forward and backward pass, for the native fast path on one GPU.

Why: a small model's step is bound by the host, not the GPU: most of it is Python and the launch of
thousands of kernels (forward, recompute and backward) while the GPU waits (profile: CHANGELOG.md).
A CUDA graph records those kernels once and replays them with one launch.

How: ``StepGraphs.run(batch, forward_backward)`` keeps one graph per micro-batch shape
(``DeviceBatch.shape``). The run's first micro-batch runs eagerly (it trains like any other, and
warms up what capture must not do: probing kernels, allocating shared buffers); the first of each
shape after it is captured, and every micro-batch of a captured shape replays: its tensors are
copied into the graph's static inputs, the graph runs, and its static loss output is read. Shapes
recur because the fast step pads each micro-batch to one of a few fixed shapes
(engine.training.batching.StaticShapes); the padding carries no target and no attention, so the
maths is the eager step's. All graphs share one memory pool (they run one at a
time, and each output is consumed before the next replay).

What a replay reads where it was captured: the LoRA weights (updated in place by the optimizer),
the gradients (accumulated in place: they stay allocated between steps and are zeroed in place,
which ``capture`` checks), the step's ``1/targets`` scale (``scale``, filled each step) and the
static inputs; the fused LoRA layers' bf16 weight copies are made inside the graph, not taken from
their per-step cache. What cannot be inside a graph is kept out of the step: host syncs (the fast step has
none), a dense attention mask (transformers' mask builder syncs: graphs need the varlen attention
path, which builds none), RNG state saved for recomputation (no dropout: see engine.training.lora).
Where any of that does not hold, ``why_not`` says so and the step runs eagerly. A capture that fails
anyway turns graphs off for the run (``failure`` says why) and the micro-batch runs eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from engine.planning.memory import loss_chunk_tokens
from engine.training.batching import DeviceBatch, StaticShapes
from engine.training.fused_lora import all_lora_fused, config_has_dropout
from engine.training.loss import causal_lm
from engine.training.varlen_attention import VARLEN_FLAG

MAX_GRAPHS = 8  # shapes beyond this many run eagerly (each graph costs a capture)


def why_not(
    model: Any, device: str, resolved: Any, *, distributed: bool, method_step: bool = False
) -> str | None:
    """Why a run cannot use CUDA graphs, or None when it can. ``method_step``: the run steps with a method's
    own step (dpo, kto, orpo, grpo), not the next-token step that these graphs capture."""
    if not getattr(resolved, "cuda_graphs", False):
        return "train.cuda_graphs is off"
    if not device.startswith("cuda"):
        return "not on a CUDA GPU"
    if method_step:
        return "the method's own step is not captured (CUDA graphs serve the next-token step of sft)"
    if distributed:
        return "several devices (each rank steps eagerly)"
    if getattr(resolved, "offload_activations", False):
        return "offload_activations is on (its copies to and from host memory cannot be captured)"
    if not all_lora_fused(model):
        return "not every LoRA layer is fused (LoRA dropout, a variant, or the Unsloth backend's own layers)"
    if not model.__dict__.get(VARLEN_FLAG):
        return "no varlen flash-attention kernel for this model (the masked path syncs with the host)"
    if config_has_dropout(causal_lm(model).config):
        return "the model has dropout"
    return None


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: DeviceBatch  # the static inputs the graph reads
    loss: torch.Tensor  # the static output it writes


class StepGraphs:
    """One CUDA graph per micro-batch shape, for one training run (one model, one optimizer)."""

    def __init__(
        self, model: Any, device: str, max_seq_length: int, packing: bool, pieces_per_row: int = 0
    ) -> None:
        vocab = causal_lm(model).get_output_embeddings().weight.shape[0]
        self.shapes = StaticShapes(max_seq_length, packing, loss_chunk_tokens(vocab), pieces_per_row)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scale = torch.zeros((), device=device)  # 1/targets of the step, read by every graph
        self.failure: str | None = None
        self.replays = 0
        self.eager = 0
        self._device = torch.device(device)
        self._graphs: dict[tuple[Any, ...], _Captured] = {}
        self._warm = False  # one eager micro-batch first: lazy set-up (kernels, buffers) stays out of graphs
        self._pool: Any = None
        self._stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[None]:
        """Run the step's micro-batches on the graphs' own stream, eager ones too: capture cannot use the
        default stream, and autograd accumulates each gradient on the stream its accumulator was
        created on, so eager and captured micro-batches must share one stream."""
        if self._device.type != "cuda":
            yield
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        caller = torch.cuda.current_stream(self._device)
        self._stream.wait_stream(caller)  # the batch's copies to the GPU were queued on the caller's
        with torch.cuda.stream(self._stream):
            yield
        caller.wait_stream(self._stream)  # the optimizer step reads the gradients on the caller's

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(self, b: DeviceBatch, forward_backward: Callable[[DeviceBatch], torch.Tensor]) -> torch.Tensor:
        """``forward_backward(b)``: the micro-batch's loss sum (gradients accumulated), from a graph
        when one is captured for its shape. The result is valid until the next call."""
        key = b.shape
        entry = self._graphs.get(key)
        if entry is None:
            if not self._warm or self.failure is not None or len(self._graphs) >= MAX_GRAPHS:
                self._warm = True
                self.eager += 1
                return forward_backward(b)
            try:
                entry = self._capture(b, forward_backward)
            except torch.cuda.OutOfMemoryError:
                raise  # the loop's back-off: smaller micro-batches, graphs reset
            except Exception as e:  # any other capture error: graphs off for the run, this batch eager
                self.failure = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                self.eager += 1
                return forward_backward(b)
            self._graphs[key] = entry
        entry.inputs.copy_from(b)
        entry.graph.replay()
        self.replays += 1
        return entry.loss

    def _capture(self, b: DeviceBatch, forward_backward: Callable[[DeviceBatch], torch.Tensor]) -> _Captured:
        # The graph accumulates into the gradients where they are now: they must exist, and the
        # captured backward must add into them in place rather than put new tensors there.
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        inputs = b.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool, stream=self._stream):
                loss = forward_backward(inputs)
            moved = sum(p.grad is not g for p, g in zip(self.params, grads, strict=True))
            if moved:
                raise RuntimeError(f"the captured backward replaced {moved} gradient tensors")
        except Exception:
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g  # a capture runs nothing: the gradients so far are intact
            raise
        if self._pool is None:
            self._pool = graph.pool()
        return _Captured(graph, inputs, loss)

    def reset(self) -> None:
        """Drop every graph (and its memory): after an OOM, before the micro-batch size changes."""
        self._graphs.clear()
        self._warm = False
        self._pool = None
        torch.cuda.empty_cache()

    def summary(self) -> str:
        text = f"CUDA graphs: {self.captured} captured, {self.replays} micro-batches replayed, {self.eager} eager"
        return text + (f"; off after a failed capture ({self.failure})" if self.failure else "")
