"""GRPO's defaults and memory estimate (engine.planning.grpo), torch-free: what the card and the data choose.

No GPU here: the free-memory figures are the ones a card would report (the planning code reads nothing else).
"""

from __future__ import annotations

import pytest

from engine.contract.grpo import GrpoSettings
from engine.contract.spec import TrainSettings
from engine.models.presets import get_preset
from engine.planning.fitting import DoesNotFitError, FitCheck
from engine.planning.grpo import LOGPS_CHUNK_BYTES, estimate_grpo_memory, generation_gib, resolve_grpo
from engine.planning.memory import CHUNKED_LOSS_BYTES, GIB, LOSS_BYTES_PER_LOGIT, loss_chunk_tokens

REWARDS = GrpoSettings(rewards=["json"])
PROMPTS = [60, 90, 120] * 30  # 90 prompts of up to 120 tokens


def _shape(name: str):  # type: ignore[no-untyped-def]
    preset = get_preset(name)
    assert preset is not None
    return preset.shape


def _resolve(name: str, free: float | None, train: TrainSettings | None = None, grpo: GrpoSettings = REWARDS):  # type: ignore[no-untyped-def]
    return resolve_grpo(
        train or TrainSettings(), grpo, prompt_lengths=PROMPTS, shape=_shape(name), quantization="4bit",
        lora_rank=16, device="cuda" if free is not None else "cpu", free_memory_gib=free, context_in_use=True,
    )  # fmt: skip


def test_the_sampling_estimate_covers_completions_times_their_length() -> None:
    shape = _shape("qwen2.5-0.5b")
    one = generation_gib(shape, "nf4", 8, 120, 256, on_gpu=True)
    assert generation_gib(shape, "nf4", 16, 120, 256, on_gpu=True) == pytest.approx(2 * one)
    kv_per_token = shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * 2 / 2**30
    longer = generation_gib(shape, "nf4", 8, 120, 512, on_gpu=True) - one
    assert longer == pytest.approx(8 * 256 * kv_per_token)  # 256 more tokens for each of 8 completions
    fit = FitCheck(shape, "4bit", 16, 24.0, True, {"device": "cuda"})
    small = estimate_grpo_memory(fit, micro=4, generation_batch=8, prompt_len=120, completion_len=256)
    big = estimate_grpo_memory(fit, micro=4, generation_batch=64, prompt_len=120, completion_len=256)
    assert big.generating_total_gib > small.generating_total_gib and big.train == small.train
    print(f"\n0.5B QLoRA, 8 completions of 256 tokens: {small.summary()}\n64 at once: {big.summary()}")


def test_the_learning_estimate_counts_grpos_own_head_chunk() -> None:
    """GRPO's log-probabilities go through the head in LOGPS_CHUNK_BYTES chunks (engine.training.grpo_loss),
    not the next-token loss's: the estimate's logits are one such chunk (plus the hidden states)."""
    shape = _shape("qwen2.5-0.5b")
    _, _, memory = _resolve("qwen2.5-0.5b", 78.0)
    assert memory is not None
    settings = memory.train.settings
    tokens = settings["micro_batch"] * settings["seq_len"]
    chunk = loss_chunk_tokens(shape.vocab_size, LOGPS_CHUNK_BYTES)
    assert chunk < loss_chunk_tokens(shape.vocab_size, CHUNKED_LOSS_BYTES) < tokens
    hidden = tokens * shape.hidden_size * 2  # 16-bit on the card
    assert memory.train.logits_gib == pytest.approx(
        (chunk * shape.vocab_size * LOSS_BYTES_PER_LOGIT + hidden) / GIB, abs=1e-3
    )


def test_defaults_for_a_big_card_a_small_card_and_the_cpu() -> None:
    roomy, grpo, memory = _resolve("qwen2.5-0.5b", 78.0)
    assert (grpo.num_generations, grpo.max_completion_length) == (8, 256)
    assert roomy.prompts_per_step == 4 and roomy.rows_per_step == 4  # the loop plans prompts
    assert roomy.micro_batch_size * roomy.gradient_accumulation == 4 * 8  # micro-batches count completions
    assert grpo.generation_batch_size == 32 and memory is not None
    assert roomy.learning_rate == pytest.approx(2e-5)  # a tenth of the supervised LoRA rate
    assert "grpo_num_generations" in roomy.reasons and "grpo_generation_batch_size" in roomy.reasons

    tight, tight_grpo, tight_memory = _resolve("qwen2.5-7b", 8.0)
    assert tight_memory is not None  # (the CUDA context is already counted in the free figure)
    assert tight_memory.total_gib - tight_memory.train.cuda_context_gib <= 8.0 * 0.95
    assert tight.micro_batch_size < roomy.micro_batch_size or tight_grpo.generation_batch_size < 32
    print(f"\n7B on 8 GiB: micro {tight.micro_batch_size}, generation batch {tight_grpo.generation_batch_size}, "
          f"completions of {tight_grpo.max_completion_length}: {tight_memory.summary()}")  # fmt: skip

    cpu, cpu_grpo, cpu_memory = _resolve("tiny", None)
    assert (cpu_grpo.num_generations, cpu_grpo.max_completion_length, cpu_memory) == (4, 128, None)
    assert "CPU" in cpu.reasons["grpo_max_completion_length"]


def test_what_cannot_fit_or_go_together_is_refused() -> None:
    with pytest.raises(DoesNotFitError, match="GRPO does not fit"):
        _resolve("qwen2.5-7b", 3.0)
    with pytest.raises(ValueError, match="not a multiple of grpo_num_generations=8"):
        _resolve("qwen2.5-0.5b", 78.0, TrainSettings(micro_batch_size=4, gradient_accumulation=3))
    with pytest.raises(ValueError, match="shorter than the longest prompt"):
        _resolve("qwen2.5-0.5b", 78.0, TrainSettings(max_seq_length=128))
    given, grpo, _ = _resolve(
        "qwen2.5-0.5b", 78.0, TrainSettings(micro_batch_size=8, gradient_accumulation=4),
        GrpoSettings(rewards=["json"], num_generations=16, max_completion_length=64, generation_batch_size=8),
    )  # fmt: skip
    assert (given.prompts_per_step, grpo.generation_batch_size) == (2, 8)
    assert given.reasons["micro_batch_size"].startswith("given")
