"""The reference policy of a preference job, without a second copy of the base model.

As trl does for a PEFT model: a job that starts from ``init_adapter`` loads that adapter twice, the
trainable ``default`` and a frozen copy named ``ref`` (trl's name), and the reference is the model with
``ref`` active; a job with a fresh adapter takes the base model itself, the adapter switched off
(peft's ``disable_adapter``). Either way only LoRA-sized weights are added.

``Reference.active()`` switches to the reference for a block (no gradients inside); ``reference_logps``
runs it over sequences once, before training. Why once: each answer's reference log-probability is the
same at every step, so computing it per step (trl's default) repeats one forward pass per sequence and
epoch; once up front is one pass in all (trl's ``precompute_ref_log_probs``), the training step is then
the policy's forward and backward alone, and a resumed run computes the same numbers again (the
reference never trains). Its forward passes take as many sequences as a training micro-batch has rows
(the caller's ``batch``): the plan fitted that micro-batch with gradients, so the same rows without them
fit too; a CUDA out-of-memory error (another process took memory meanwhile) halves it. The reference
stays loaded for what cannot be computed up front (a later method's samples drawn during training:
``active()``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.training.batching import IGNORE
from engine.training.fast_step import prepare_batches
from engine.training.fused_lora import weights_updated
from engine.training.halving_batches import in_halving_batches
from engine.training.token_logps import position_logps, sequence_sums

REFERENCE_ADAPTER = "ref"  # trl's name for the frozen copy (DPOTrainer, KTOTrainer)


@dataclass
class Reference:
    model: Any  # the peft model being trained
    adapter: str | None  # the frozen copy's adapter name; None: the base model (adapter switched off)

    def describe(self) -> str:
        if self.adapter is None:
            return "the base model with the adapter switched off (peft disable_adapter: no second copy of the base)"
        return (
            f"a frozen copy of init_adapter (peft adapter '{self.adapter}' beside the trained 'default': no second "
            "copy of the base)"
        )

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The model computes as the reference inside this block (no gradients)."""
        weights_updated()  # the fused LoRA layers' cast weights belong to the adapter that was active
        try:
            with torch.no_grad():
                if self.adapter is None:
                    with self.model.disable_adapter():
                        yield
                else:
                    self.model.set_adapter(self.adapter, inference_mode=True)
                    try:
                        yield
                    finally:
                        self.model.set_adapter("default")  # trainable again; the copy stays frozen
        finally:
            weights_updated()

    def release(self) -> None:
        """Drop the frozen copy (before saving: the adapter folder holds the trained adapter alone)."""
        if self.adapter is not None and self.adapter in self.model.peft_config:
            self.model.delete_adapter(self.adapter)
            self.model.set_adapter("default")


def attach_reference(model: Any, init_adapter: Path | None) -> Reference:
    """The reference of ``model`` (a peft model whose ``default`` adapter trains): a frozen copy of
    ``init_adapter`` when the job started from one, else the base model."""
    if init_adapter is None:
        return Reference(model, None)
    model.load_adapter(str(init_adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    model.set_adapter("default")  # loading may leave the copy trainable or active
    return Reference(model, REFERENCE_ADAPTER)


def reference_logps(
    ref: Reference,
    data: Any,
    sequences: list[int],
    *,
    batch: int,
    pad_id: int,
    device: str,
    autocast_dtype: Any,
    on_back_off: Callable[[int], None] = lambda batch: None,
    passes: list[tuple[int, float]] | None = None,
) -> torch.Tensor:
    """The reference's summed answer log-probability of each of ``sequences`` (indices into ``data``'s
    ``input_ids``/``labels``), fp32 on the CPU, in their order; ``batch`` sequences per forward pass, halved
    after a CUDA out-of-memory error (``on_back_off`` hears the new size). ``passes`` gets each forward
    pass's sequences and seconds (its result's copy to the CPU waits for the GPU)."""
    out = torch.zeros(len(sequences), dtype=torch.float32)
    dev_type = device.split(":")[0]

    def run(start: int, stop: int) -> None:
        began = time.perf_counter()
        chunk = sequences[start:stop]
        (b,) = prepare_batches([[s] for s in chunk], data, len(chunk), pad_id, device, varlen=False)
        with torch.autocast(device_type=dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logps = position_logps(ref.model, b)
        rows = torch.div(b.gather_index, b.input_ids.shape[1], rounding_mode="floor")
        out[start:stop] = sequence_sums(logps, rows, len(chunk)).cpu()
        if passes is not None:
            passes.append((len(chunk), time.perf_counter() - began))

    was_training = ref.model.training
    ref.model.eval()
    try:
        with ref.active():
            in_halving_batches(
                len(sequences), batch, run, on_back_off=on_back_off,
                one_fails="CUDA out of memory computing the reference log-probabilities of one sequence: lower "
                "max_seq_length, use quantization '4bit', or a smaller model",
            )  # fmt: skip
    finally:
        ref.model.train(was_training)
    return out


def answer_tokens(labels: list[list[int]], sequences: list[int]) -> torch.Tensor:
    """How many answer tokens (labels that carry loss) each of ``sequences`` has."""
    return torch.tensor([sum(1 for v in labels[s] if v != IGNORE) for s in sequences], dtype=torch.float32)
