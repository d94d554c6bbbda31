"""Memory estimate and smart defaults (pure arithmetic: no torch, no GPU needed)."""

from __future__ import annotations

import math

import pytest

from engine.contract.spec import TrainSettings
from engine.models.shape import ModelShape
from engine.planning.defaults import resolve_training
from engine.planning.fitting import DoesNotFitError
from engine.planning.memory import estimate_memory, largest_micro_batch, loss_chunk_tokens, storage_dtype

# Qwen2.5-7B-Instruct's config.json numbers.
QWEN7B = ModelShape(
    3584, 28, 152064, 18944, 28, 4, max_context=32768, attention_bias=True, model_type="qwen2"
)
# Qwen2.5-0.5B's (tied embeddings).
QWEN05B = ModelShape(
    896, 24, 151936, 4864, 14, 2, max_context=32768, tie_word_embeddings=True, attention_bias=True,
    model_type="qwen2",
)  # fmt: skip
# A tiny Qwen2-like model, the size of engine.models.tiny's.
TINY = ModelShape(256, 2, 2048, 768, 4, 2, max_context=4096, attention_bias=True, model_type="qwen2")


def test_parameter_count_of_qwen7b_shape():
    # Published size of Qwen2.5-7B: 7.62B parameters (untied embeddings, q/k/v biases).
    assert QWEN7B.params == pytest.approx(7.62e9, rel=0.002)
    # LoRA r=16 on all seven projections of 28 layers.
    assert QWEN7B.lora_params(16) == 28 * 16 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    assert QWEN7B.lora_params(16, ["q_proj", "v_proj"]) == 28 * 16 * ((3584 + 3584) + (3584 + 512))


def test_estimate_matches_measured_7b_qlora_peak():
    """Measured on an H100 (torch max_memory_allocated): 21.2 GiB with the unfused loss."""
    unfused = estimate_memory(QWEN7B, "4bit", 16, 4, 2048, chunked_loss=False)
    assert unfused.peak_allocated_gib == pytest.approx(21.2, abs=1.0)
    # The fp32 logits of 4 x 2048 x 152k tokens dominate the unfused step.
    assert unfused.logits_gib > unfused.weights_gib + unfused.activations_gib
    chunked = estimate_memory(QWEN7B, "4bit", 16, 4, 2048, chunked_loss=True)
    assert 8.0 < chunked.peak_allocated_gib < 11.5
    assert chunked.logits_gib < 1.0
    # NF4 7B weights: ~3.4 GB of 4-bit layers + 2.2 GB of bf16 embeddings and head.
    assert 4.8 < chunked.weights_gib < 5.5
    assert chunked.total_gib > chunked.peak_allocated_gib  # context and allocator slack on top
    assert chunked.breakdown()["total"] == chunked.total_gib
    assert "GiB" in chunked.summary()


@pytest.mark.parametrize(
    "shape, micro, seq, measured",
    [  # peak allocated without recomputation, Liger's kernels in, H200, benchmarks/RESULTS.md v9
        (QWEN7B, 4, 2048, 40.82),
        (QWEN7B, 4, 1088, 24.91),
        (QWEN05B, 4, 2048, 8.72),
        (QWEN05B, 16, 2048, 31.2),
        (QWEN05B, 4, 1088, 5.06),
    ],
)
def test_estimate_without_recomputation_matches_measured_peaks_with_liger(shape, micro, seq, measured):
    liger = estimate_memory(shape, "4bit", 16, micro, seq, gradient_checkpointing=False, liger_kernels=True)
    assert measured <= liger.peak_allocated_gib <= 1.08 * measured  # never under, at most 8% over
    assert liger.settings["liger_kernels"] is True
    # without Liger's kernels a layer keeps act(gate) and fp32 norm copies too: a larger estimate
    plain = estimate_memory(shape, "4bit", 16, micro, seq, gradient_checkpointing=False)
    assert plain.peak_allocated_gib > 1.25 * liger.peak_allocated_gib
    # with recomputation only one layer's activations exist at a time: the kernels change nothing there
    kept = estimate_memory(shape, "4bit", 16, micro, seq, liger_kernels=True)
    assert kept.breakdown() == estimate_memory(shape, "4bit", 16, micro, seq).breakdown()


def test_estimate_grows_with_what_costs_memory():
    base = estimate_memory(QWEN7B, "4bit", 16, 2, 2048)
    assert estimate_memory(QWEN7B, "16bit", 16, 2, 2048).weights_gib > 2.5 * base.weights_gib
    assert estimate_memory(QWEN7B, "none", 16, 2, 2048).weights_gib > 5 * base.weights_gib
    assert estimate_memory(QWEN7B, "4bit", 16, 4, 2048).total_gib > base.total_gib
    assert estimate_memory(QWEN7B, "4bit", 16, 2, 4096).total_gib > base.total_gib
    assert estimate_memory(QWEN7B, "4bit", 64, 2, 2048).lora_gib == pytest.approx(4 * base.lora_gib, rel=0.01)
    no_ckpt = estimate_memory(QWEN7B, "4bit", 16, 2, 2048, gradient_checkpointing=False)
    assert no_ckpt.activations_gib > 5 * base.activations_gib


def test_storage_dtype_rules():
    assert storage_dtype("auto", "cuda:0") == "nf4"
    assert storage_dtype("auto", "cpu") == "fp32"
    assert storage_dtype("4bit", "cpu") == "nf4"
    assert storage_dtype("16bit", "cuda", bf16_supported=False) == "fp16"
    assert storage_dtype("16bit", "cuda") == "bf16"
    assert storage_dtype("none", "cuda") == "fp32"
    with pytest.raises(ValueError, match="unknown quantization"):
        storage_dtype("8bit")


def test_loss_chunk_mirrors_engine_loss():
    # engine.training.loss keeps 256 MiB of fp32 logits per chunk.
    assert loss_chunk_tokens(152064) == 256 * 1024**2 // (4 * 152064)
    assert loss_chunk_tokens(10**9) == 64


def _lengths(n: int, short: int = 40, long: int = 300) -> list[int]:
    # Mostly short examples with a few long ones.
    return [short + (i % 50) for i in range(n - 3)] + [long, long + 10, long + 20]


def test_cpu_tiny_defaults_fill_every_field_with_a_reason():
    lengths = _lengths(64)
    r = resolve_training(
        TrainSettings(),
        n_examples=64,
        token_lengths=lengths,
        shape=TINY,
        quantization="auto",
        lora_rank=8,
        device="cpu",
        free_memory_gib=None,
    )
    fields = set(TrainSettings.model_fields)
    assert set(r.reasons) == fields
    assert all(getattr(r, name) is not None for name in fields)
    assert all(r.reasons[name] for name in fields)
    # 99th percentile of the lengths (~300), rounded up to a multiple of 64.
    assert r.max_seq_length == 320
    assert r.max_seq_length % 64 == 0
    assert r.truncated_examples == 0
    assert r.packing is True
    assert r.micro_batch_size <= 4
    assert r.rows_per_step == r.micro_batch_size * r.gradient_accumulation
    # Packed rows of 320 tokens hold several examples each (64 examples of ~65 tokens).
    assert r.rows_per_epoch == math.ceil(sum(lengths) / (0.95 * 320))
    assert r.rows_per_step <= max(1, r.rows_per_epoch // 4)  # at least four steps per epoch
    assert r.epochs == 3.0  # a small dataset
    assert r.steps == 3 * math.ceil(r.rows_per_epoch / r.rows_per_step)
    assert r.learning_rate == 1e-3  # a tiny model
    assert 0 <= r.warmup_steps <= max(1, r.steps // 10)
    assert r.memory is None  # no memory figure on CPU
    assert r.to_dict()["reasons"] == r.reasons


def test_gpu_7b_defaults_pick_a_micro_batch_that_fits():
    lengths = [200 + (i * 37) % 1500 for i in range(2000)]
    r = resolve_training(
        TrainSettings(),
        n_examples=2000,
        token_lengths=lengths,
        shape=QWEN7B,
        quantization="4bit",
        lora_rank=16,
        device="cuda",
        free_memory_gib=79.0,
    )
    assert r.packing is True
    assert r.max_seq_length == 1728  # p99 of the lengths (~1684) rounded up to 64
    assert r.micro_batch_size in (1, 2, 4, 8, 16, 32, 64)
    assert r.memory is not None and r.memory.total_gib <= 79.0
    assert r.learning_rate == 2e-4
    # Packed rows carry several examples: the step still holds ~16 examples' worth of tokens.
    mean_len = sum(lengths) / len(lengths)
    assert r.rows_per_step == pytest.approx(16 * mean_len / r.max_seq_length, abs=2)
    assert "fits" in r.reasons["micro_batch_size"]
    # Less free memory: a smaller micro-batch (and more accumulation), never a larger one.
    small = resolve_training(
        TrainSettings(),
        n_examples=2000,
        token_lengths=lengths,
        shape=QWEN7B,
        quantization="4bit",
        lora_rank=16,
        device="cuda",
        free_memory_gib=10.0,
    )
    assert small.micro_batch_size <= r.micro_batch_size
    assert small.memory is not None and small.memory.total_gib <= 10.0


def test_user_values_are_kept():
    given = TrainSettings(
        steps=7,
        learning_rate=5e-5,
        warmup_steps=2,
        lr_scheduler="linear",
        micro_batch_size=2,
        gradient_accumulation=3,
        max_seq_length=256,
        packing=True,
        gradient_checkpointing=False,
        offload_activations=False,
        weight_decay=0.01,
        max_grad_norm=0.5,
        seed=7,
        checkpoint_every=3,
        backend="native",
        report_to=["tensorboard"],
        compile=True,
        cuda_graphs=False,
    )
    r = resolve_training(
        given,
        n_examples=30,
        token_lengths=_lengths(30),
        shape=TINY,
        quantization="none",
        lora_rank=8,
        device="cpu",
        free_memory_gib=None,
    )
    for name in TrainSettings.model_fields:
        if name == "epochs":
            continue
        assert getattr(r, name) == getattr(given, name), name
        assert r.reasons[name].startswith("given"), name
    assert r.reasons["epochs"].startswith("implied")
    assert r.truncated_examples == 3  # the three examples over 256 tokens
    assert "cut" in r.reasons["max_seq_length"]


def test_epochs_become_steps_and_large_datasets_are_capped():
    r = resolve_training(
        TrainSettings(epochs=2, micro_batch_size=4, gradient_accumulation=2, packing=False),
        n_examples=100,
        token_lengths=[50] * 100,
        shape=TINY,
        quantization="none",
        lora_rank=8,
        device="cpu",
        free_memory_gib=None,
    )
    assert r.steps == 2 * math.ceil(100 / 8)
    big = resolve_training(
        TrainSettings(micro_batch_size=1, gradient_accumulation=1, packing=False),
        n_examples=200_000,
        token_lengths=[50] * 200_000,
        shape=TINY,
        quantization="none",
        lora_rank=8,
        device="cpu",
        free_memory_gib=None,
    )
    assert big.steps == 5000 and "capped" in big.reasons["steps"]


def test_sequence_length_is_capped_by_the_model_context():
    short_ctx = ModelShape(256, 2, 2048, 768, 4, 2, max_context=512)
    r = resolve_training(
        TrainSettings(),
        n_examples=10,
        token_lengths=[2000] * 10,
        shape=short_ctx,
        quantization="none",
        lora_rank=8,
        device="cpu",
        free_memory_gib=None,
    )
    assert r.max_seq_length == 512
    assert "capped at the model's context" in r.reasons["max_seq_length"]
    assert r.truncated_examples == 10


def test_does_not_fit_says_the_numbers_and_what_to_change():
    with pytest.raises(DoesNotFitError) as info:
        resolve_training(
            TrainSettings(max_seq_length=2048),
            n_examples=100,
            token_lengths=[1000] * 100,
            shape=QWEN7B,
            quantization="16bit",
            lora_rank=16,
            device="cuda",
            free_memory_gib=12.0,
        )
    err = info.value
    assert err.free_gib == 12.0
    assert err.estimate.total_gib > 12.0
    text = str(err)
    assert "does not fit" in text and "12.0 GiB" in text and f"{err.estimate.total_gib:.1f}" in text
    assert any("4bit" in s for s in err.suggestions)
    # Each suggestion that names a setting really fits by the same estimate.
    assert isinstance(err, ValueError)


def test_a_user_micro_batch_that_cannot_fit_is_refused():
    with pytest.raises(DoesNotFitError) as info:
        resolve_training(
            TrainSettings(micro_batch_size=32, max_seq_length=4096),
            n_examples=100,
            token_lengths=[3000] * 100,
            shape=QWEN7B,
            quantization="4bit",
            lora_rank=16,
            device="cuda",
            free_memory_gib=24.0,
        )
    suggestion = next(s for s in info.value.suggestions if s.startswith("micro_batch_size="))
    best = int(suggestion.split("=")[1].split()[0])
    assert 1 <= best < 32
    fits = estimate_memory(QWEN7B, "4bit", 16, best, 4096)
    assert fits.total_gib <= 24.0


def test_largest_micro_batch_and_context_in_use():
    free = estimate_memory(QWEN7B, "4bit", 16, 4, 2048).total_gib / 0.95 + 0.01
    assert largest_micro_batch(QWEN7B, "4bit", 16, 2048, free) == 4
    assert largest_micro_batch(QWEN7B, "4bit", 16, 2048, 1.0) == 0
    assert largest_micro_batch(QWEN7B, "4bit", 16, 2048, 500.0, limit=8) == 8
    # A free figure read inside a process that holds a CUDA context does not pay for it twice.
    tight = estimate_memory(QWEN7B, "4bit", 16, 1, 2048)
    just_below = (tight.total_gib - tight.cuda_context_gib / 2) / 0.95
    assert largest_micro_batch(QWEN7B, "4bit", 16, 2048, just_below) == 0
    assert largest_micro_batch(QWEN7B, "4bit", 16, 2048, just_below, context_in_use=True) >= 1


def test_bad_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="no training examples"):
        resolve_training(
            TrainSettings(),
            n_examples=0,
            token_lengths=[],
            shape=TINY,
            quantization="none",
            lora_rank=8,
            device="cpu",
            free_memory_gib=None,
        )
    with pytest.raises(ValueError, match="at least 1"):
        estimate_memory(TINY, "none", 8, 0, 128)
    with pytest.raises(ValueError, match="positive sizes"):
        ModelShape(0, 2, 2048, 768, 4, 2)


def test_recomputation_is_skipped_only_where_the_card_holds_every_layer_with_room_to_spare():
    lengths = [1800 + (i * 7) % 200 for i in range(400)]  # long rows: seq 2048, micro-batch 4

    def resolve(free: float, **given) -> object:
        return resolve_training(
            TrainSettings(micro_batch_size=4, **given), n_examples=400, token_lengths=lengths, shape=QWEN7B,
            quantization="4bit", lora_rank=16, device="cuda", free_memory_gib=free,
        )  # fmt: skip

    big = resolve(139.0)  # an H200: every layer's activations fit in 75% of it
    assert big.gradient_checkpointing is False and big.reasons["gradient_checkpointing"].startswith("off:")
    assert big.memory.settings["gradient_checkpointing"] is False and big.memory.total_gib <= 0.75 * 139
    assert (
        big.offload_activations is False and "no gradient checkpointing" in big.reasons["offload_activations"]
    )
    tight = resolve(24.0)  # a 24 GB card: recompute, and keep the 1.8 GiB of layer inputs in host memory
    assert tight.gradient_checkpointing is True and tight.reasons["gradient_checkpointing"].startswith("on:")
    assert tight.offload_activations is True and "pinned host memory" in tight.reasons["offload_activations"]
    assert tight.memory.settings["offload_activations"] is True
    kept = estimate_memory(QWEN7B, "4bit", 16, 4, 2048)
    assert tight.memory.total_gib < kept.total_gib - 1.0  # ~26 of 28 layer inputs off the card
    # What the user says wins; asking for offload asks for checkpointing.
    assert resolve(139.0, gradient_checkpointing=True).offload_activations is True
    assert resolve(139.0, offload_activations=True).gradient_checkpointing is True
    assert resolve(24.0, offload_activations=False).offload_activations is False
    # A small model keeps its layer inputs on the card: CUDA graphs pay more there than offloading frees.
    small = resolve_training(
        TrainSettings(gradient_checkpointing=True), n_examples=30, token_lengths=_lengths(30), shape=TINY,
        quantization="4bit", lora_rank=8, device="cuda", free_memory_gib=24.0,
    )  # fmt: skip
    assert small.offload_activations is False and "CUDA graphs" in small.reasons["offload_activations"]
    # No free-memory figure, or a CPU: checkpointing stays on, nothing is offloaded.
    cpu = resolve_training(
        TrainSettings(), n_examples=30, token_lengths=_lengths(30), shape=TINY, quantization="none",
        lora_rank=8, device="cpu", free_memory_gib=None,
    )  # fmt: skip
    assert cpu.gradient_checkpointing is True and cpu.offload_activations is False


def test_with_liger_kernels_an_80gb_card_keeps_every_layer_of_a_7b(monkeypatch):
    """Liger's kernels keep fewer activations, so the estimate without recomputation is smaller where
    they apply. Whether liger-kernel is installed is this environment's fact: both answers are set here."""
    import engine.planning.defaults as defaults
    from engine.planning.memory import liger_kernels_apply

    assert not liger_kernels_apply("qwen2", "cpu") and not liger_kernels_apply("gpt_neox", "cuda:0")
    lengths = [1800 + (i * 7) % 200 for i in range(400)]  # long rows: seq 2048, micro-batch 4

    def resolve(liger: bool, backend: str = "auto") -> object:
        monkeypatch.setattr(defaults, "liger_kernels_apply", lambda model_type, device: liger)
        return resolve_training(
            TrainSettings(micro_batch_size=4, backend=backend), n_examples=400, token_lengths=lengths,
            shape=QWEN7B, quantization="4bit", lora_rank=16, device="cuda", free_memory_gib=79.0,
        )  # fmt: skip

    with_liger = resolve(True)  # an H100 80GB: ~46 GiB estimated against 75% of 79
    assert with_liger.gradient_checkpointing is False and with_liger.memory.settings["liger_kernels"] is True
    without = resolve(False)  # ~62 GiB estimated: recompute
    assert (
        without.gradient_checkpointing is True
        and "more than 75%" in without.reasons["gradient_checkpointing"]
    )
    assert resolve(True, backend="unsloth").gradient_checkpointing is True  # Unsloth's path takes no Liger


def test_offload_without_checkpointing_is_refused_with_the_fix():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set gradient_checkpointing=true, or drop offload_activations"):
        TrainSettings(gradient_checkpointing=False, offload_activations=True)
