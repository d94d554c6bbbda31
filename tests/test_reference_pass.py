"""The reference pass of a preference job (engine.training.reference): as many sequences per forward pass as
a training micro-batch has rows (the plan fitted those rows with gradients), halved after a CUDA
out-of-memory error. The tiny model on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from preference_tasks import write_task

from engine.contract.events import Stage, read_events
from engine.training.reference import Reference, reference_logps
from engine.training.token_logps import causal_lm

SEQUENCES = [
    [5, 6, 7, 8, 9, 10],
    [20, 21, 22],
    [30, 31, 32, 33, 34],
    [40, 41, 42, 43],
    [50, 51, 52],
    [60, 61, 62],
]


class _Sequences:
    input_ids = SEQUENCES
    labels = [[-100] * 2 + s[2:] for s in SEQUENCES]


def _peft_model(tiny_model_dir: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))


def _logps(model: Any, batch: int, **kwargs: Any) -> torch.Tensor:
    return reference_logps(
        Reference(model, None), _Sequences(), list(range(len(SEQUENCES))), batch=batch, pad_id=0, device="cpu",
        autocast_dtype=None, **kwargs,
    )  # fmt: skip


def test_the_reference_pass_halves_its_batch_after_an_out_of_memory_error(tiny_model_dir: Path) -> None:
    """There is no GPU here, so the out-of-memory error is simulated: a hook on the decoder raises torch's
    CUDA OutOfMemoryError for any forward pass of more than two sequences."""
    model = _peft_model(tiny_model_dir)
    one_at_a_time = _logps(model, batch=1)
    seen: list[int] = []

    def too_many(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["input_ids"].shape[0])
        if seen[-1] > 2:
            raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")

    hook = causal_lm(model).model.register_forward_pre_hook(too_many, with_kwargs=True)
    try:
        told: list[int] = []
        values = _logps(model, batch=4, on_back_off=told.append)
        assert told == [2] and seen == [4, 2, 2, 2]  # the failed slice again at half, and the rest at half
        torch.testing.assert_close(values, one_at_a_time, atol=1e-5, rtol=0)
    finally:
        hook.remove()


def test_a_reference_pass_that_fails_one_sequence_at_a_time_says_what_to_change(tiny_model_dir: Path) -> None:
    """Simulated out-of-memory error (no GPU here): every forward pass raises it."""
    model = _peft_model(tiny_model_dir)

    def always(_module: Any, _args: Any, _kwargs: dict[str, Any]) -> None:
        raise torch.cuda.OutOfMemoryError("simulated: CUDA out of memory")

    hook = causal_lm(model).model.register_forward_pre_hook(always, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="one sequence: lower max_seq_length"):
            _logps(model, batch=2)
    finally:
        hook.remove()


def test_a_dpo_job_computes_its_reference_a_training_micro_batch_of_rows_at_a_time(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKPROP_HOME", str(tmp_path / "home"))
    from engine import Trainer

    task = write_task(tmp_path, per_colour=2)
    result = Trainer(str(tiny_model_dir), lora_rank=4, verbose=False).train(
        task["pairs"], method="dpo", steps=1, micro_batch_size=3, gradient_accumulation=1
    )
    (stage,) = [
        e
        for e in read_events(result.job_dir / "events.jsonl")[0]
        if isinstance(e, Stage) and e.name == "reference"
    ]
    assert stage.details["batch"] == 6  # three pairs: six sequences, as in a training micro-batch
    assert "6 per forward pass" in (stage.message or "")
