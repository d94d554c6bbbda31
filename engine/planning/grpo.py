"""Smart defaults and the memory of a GRPO job (method 'grpo'), torch-free.

A GRPO step has two phases that never hold memory at the same time (engine.training.grpo_step):

- sampling: ``generation_batch_size`` completions at once, each growing to the longest prompt plus
  ``max_completion_length`` tokens; beside the weights it holds their KV cache (every layer's keys and
  values of every token so far), the last position's logits with the sampler's copies, and one layer's
  activations while the prompts are read (prefill);
- learning: micro-batches of ``micro_batch_size`` completions, each a row of prompt plus completion,
  through the model with gradients: a training step's memory (engine.planning.memory) at that width.

What must be free is the larger of the two. The plan counts completions where a fine-tune counts rows:
``micro_batch_size`` x ``gradient_accumulation`` completions per step, ``num_generations`` of each of the
step's prompts (as trl's GRPOTrainer, whose per-device batch counts completions). The loop plans its steps
over prompts (``GrpoTraining.rows_per_step``) and lowers the micro-batch, in completions, after an OOM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.contract.grpo import GrpoSettings
from engine.contract.spec import TrainSettings
from engine.models.shape import ModelShape
from engine.planning.defaults import MAX_DEFAULT_STEPS, ResolvedTraining, default_learning_rate
from engine.planning.fitting import DoesNotFitError, FitCheck, decide_offload, decide_recompute
from engine.planning.memory import (
    ALLOCATOR_SLACK,
    ALLOCATOR_SLACK_MIN_GIB,
    FREE_MEMORY_USABLE,
    GIB,
    MemoryEstimate,
    liger_kernels_apply,
    storage_dtype,
)

GENERATIONS = 8  # trl's default: enough spread within a group for rewards to differ
CPU_GENERATIONS = 4  # on a CPU sampling is slow: fewer per prompt
COMPLETION_CHOICES = (256, 128, 64)  # the default max_completion_length: the longest that fits
CPU_COMPLETION = 128
PROMPTS_PER_STEP = 4
LOGIT_COPIES = 3  # the last position's fp32 logits, their softmax and the sampler's working copy
# The output head's chunks in GRPO's training passes: a quarter of the next-token loss's 256 MiB. Its step
# holds little besides the weights, so one chunk's 16-bit logits and gradient were a fifth of its peak
# (0.25 of 1.19 GiB at 0.5B, RESULTS.md); a GRPO step's time is mostly sampling, not these matmuls. The
# learning phase's memory estimate counts one chunk of this size.
LOGPS_CHUNK_BYTES = 64 * 1024**2


class GrpoTraining(ResolvedTraining):
    """A GRPO job's training plan: a fine-tune's, whose micro-batches count completions, and whose steps
    are planned over prompts (``prompts_per_step`` of them, each sampled ``num_generations`` times)."""

    prompts_per_step: int

    @property
    def rows_per_step(self) -> int:  # rows of the loop's step plan: one prompt each
        return self.prompts_per_step


@dataclass
class GrpoMemory:
    train: MemoryEstimate  # one learning micro-batch
    generation_gib: float  # the sampling phase's own working set (KV cache, logits, prefill)
    generating_total_gib: float  # what the sampling phase needs free (weights, LoRA state, context, slack)

    @property
    def total_gib(self) -> float:
        return max(self.train.total_gib, self.generating_total_gib)

    def summary(self) -> str:
        return (
            f"{self.total_gib:.1f} GiB: sampling {self.generating_total_gib:.1f} GiB (KV cache and logits "
            f"{self.generation_gib:.2f}), learning {self.train.summary()}"
        )


def generation_gib(
    shape: ModelShape, storage: str, batch: int, prompt_len: int, completion_len: int, on_gpu: bool
) -> float:
    """The sampling phase's working set beside the weights: ``batch`` completions of ``completion_len``
    tokens after prompts of ``prompt_len``, in GiB."""
    act = 2 if on_gpu and storage != "fp32" else 4
    kv = (
        batch
        * (prompt_len + completion_len)
        * shape.num_layers
        * 2
        * shape.num_kv_heads
        * shape.head_dim
        * act
    )
    logits = batch * shape.vocab_size * 4 * LOGIT_COPIES
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    prefill = batch * prompt_len * (4 * h + 2 * q + 2 * kv_dim + 3 * i) * act  # one layer, no gradients
    return (kv + logits + prefill) / GIB


def estimate_grpo_memory(
    fit: FitCheck, micro: int, generation_batch: int, prompt_len: int, completion_len: int, **changed: Any
) -> GrpoMemory:
    """The memory of a GRPO step at these sizes (``changed``: estimate settings other than the fitted ones)."""
    train = fit.estimate(micro, prompt_len + completion_len, **changed)
    on_gpu = fit.est_kwargs.get("device", "cuda") == "cuda"
    storage = storage_dtype(
        fit.quantization, "cuda" if on_gpu else "cpu", fit.est_kwargs.get("bf16_supported", True)
    )
    gen = generation_gib(fit.shape, storage, generation_batch, prompt_len, completion_len, on_gpu)
    held = train.weights_gib + train.lora_gib + gen
    slack = max(ALLOCATOR_SLACK_MIN_GIB, ALLOCATOR_SLACK * held) if on_gpu else 0.0
    return GrpoMemory(train, round(gen, 3), round(held + train.cuda_context_gib + slack, 3))


def _fits(memory: GrpoMemory, fit: FitCheck) -> bool:
    need = memory.total_gib - (memory.train.cuda_context_gib if fit.context_in_use else 0.0)
    return need <= fit.free_gib * FREE_MEMORY_USABLE


@dataclass
class _GrpoPlan:
    train: TrainSettings
    grpo: GrpoSettings
    fit: FitCheck
    free_gib: float | None
    device: str
    prompt_len: int
    n_prompts: int
    reasons: dict[str, str]
    value: dict[str, Any]

    def decide(self, name: str, given: Any, default: Any, why: str) -> Any:
        self.value[name], self.reasons[name] = (given, "given") if given is not None else (default, why)
        return self.value[name]

    def fits(self, micro: int, generation_batch: int, completion: int) -> bool:
        memory = estimate_grpo_memory(self.fit, micro, generation_batch, self.prompt_len, completion)
        return self.free_gib is None or _fits(memory, self.fit)

    def group(self) -> int:
        cpu = self.device != "cuda"
        why = (
            f"{CPU_GENERATIONS} per prompt on a CPU, where sampling is slow (trl's default is {GENERATIONS})"
            if cpu
            else f"{GENERATIONS} per prompt (trl's default): enough spread within a group for rewards to differ"
        )
        return int(
            self.decide(
                "grpo_num_generations",
                self.grpo.num_generations,
                CPU_GENERATIONS if cpu else GENERATIONS,
                why,
            )
        )

    def prompts_per_step(self, g: int) -> int:
        micro, accum = self.train.micro_batch_size, self.train.gradient_accumulation
        if micro is not None and accum is not None:
            if (micro * accum) % g:
                raise ValueError(
                    f"micro_batch_size x gradient_accumulation = {micro * accum} completions per step, which is "
                    f"not a multiple of grpo_num_generations={g} (each prompt's completions are one group): "
                    f"make it a multiple, e.g. gradient_accumulation={max(1, math.ceil(g / micro))} x {micro}"
                )
            return micro * accum // g
        prompts = min(PROMPTS_PER_STEP, max(1, self.n_prompts // 4))
        return prompts

    def completion_length(self, g: int) -> int:
        if self.free_gib is None:
            why = f"{CPU_COMPLETION} tokens: no free-memory figure (CPU), and short completions keep steps short"
            return int(
                self.decide(
                    "grpo_max_completion_length", self.grpo.max_completion_length, CPU_COMPLETION, why
                )
            )
        chosen = next((c for c in COMPLETION_CHOICES if self.fits(1, 1, c)), None)
        if chosen is None and self.grpo.max_completion_length is None:
            self._does_not_fit(COMPLETION_CHOICES[-1], 1, 1)
        why = (
            f"the longest of {', '.join(map(str, COMPLETION_CHOICES))} tokens whose sampling and learning fit in "
            f"{self.free_gib:.1f} GiB free, one completion at a time (the batches are fitted next)"
        )
        return int(self.decide("grpo_max_completion_length", self.grpo.max_completion_length, chosen, why))

    def _does_not_fit(self, completion: int, micro: int, generation_batch: int) -> None:
        memory = estimate_grpo_memory(self.fit, micro, generation_batch, self.prompt_len, completion)
        raise DoesNotFitError(
            f"GRPO does not fit: {generation_batch} completion(s) of {completion} tokens after prompts of "
            f"{self.prompt_len} need about {memory.summary()}, and {self.free_gib:.1f} GiB is free. Try a lower "
            "grpo_max_completion_length, shorter prompts, quantization '4bit', or a smaller model",
            estimate=memory.train,
            free_gib=self.free_gib or 0.0,
            suggestions=["grpo_max_completion_length=64", 'quantization="4bit"', "a smaller model"],
        )

    def batches(self, per_step: int, completion: int) -> tuple[int, int]:
        """(completions per micro-batch, completions sampled at once)."""
        seq = self.prompt_len + completion
        micro_given = self.train.micro_batch_size
        if self.free_gib is None:
            micro, why = (
                min(per_step, 4),
                "no free-memory figure: a small micro-batch (CPU compute does not gain from larger ones)",
            )
        else:
            micro = self.fit.largest_micro_batch(seq, limit=per_step)
            why = f"the largest power of two up to {per_step} (the step's completions) that fits"
        while micro > 1 and per_step % micro:
            micro //= 2  # a micro-batch divides the step
        micro = int(
            self.decide("micro_batch_size", micro_given, max(1, micro), f"completions per micro-batch: {why}")
        )
        if micro_given is not None and per_step % micro:
            raise ValueError(
                f"micro_batch_size={micro} does not divide the step's {per_step} completions; give a divisor"
            )
        accum = per_step // micro
        self.decide(
            "gradient_accumulation",
            None,
            accum,
            f"{micro} completions per micro-batch x {accum} = {per_step} per step",
        )
        if self.free_gib is not None and not self.fits(micro, 1, completion):
            self._does_not_fit(completion, micro, 1)
        batch = per_step
        while batch > 1 and not self.fits(micro, batch, completion):
            batch = max(1, batch // 2)
        why = (
            f"all {per_step} of a step's completions at once"
            if batch == per_step
            else f"{batch} at once: the largest halving of the step's {per_step} whose KV cache fits"
        )
        if self.free_gib is None:
            why = f"all {per_step} of a step's completions at once (no free-memory figure to check)"
        return micro, int(
            self.decide("grpo_generation_batch_size", self.grpo.generation_batch_size, batch, why)
        )

    def schedule(self, shape: ModelShape, lora_rank: int, per_step_prompts: int) -> None:
        """Steps (one pass over the prompts by default), learning rate, warm-up, checkpoints."""
        train, n = self.train, self.n_prompts
        steps_per_epoch = max(1, math.ceil(n / per_step_prompts))
        epochs, epochs_why = (
            (train.epochs, "given") if train.epochs is not None else (1.0, "one pass over the prompts")
        )
        steps = min(MAX_DEFAULT_STEPS, max(1, math.ceil(epochs * steps_per_epoch)))
        why = f"{epochs:g} epoch(s) x {steps_per_epoch} steps ({n} prompts, {per_step_prompts} per step)"
        steps = int(self.decide("steps", train.steps, steps, why))
        if train.steps is not None:
            epochs, epochs_why = (
                steps * per_step_prompts / n,
                f"implied by {steps} steps of {per_step_prompts} prompts",
            )
        self.value["epochs"], self.reasons["epochs"] = round(epochs, 4), epochs_why
        lr, lr_why = default_learning_rate(shape, lora_rank, self.device)
        why = f"a tenth of the supervised default ({lr:g}): reinforcement moves a policy a little per step; {lr_why}"
        self.decide("learning_rate", train.learning_rate, lr / 10, why)
        warmup = max(1, round(0.04 * steps)) if steps >= 10 else round(0.04 * steps)
        self.decide("warmup_steps", train.warmup_steps, warmup, f"about 4% of {steps} steps")
        every = max(25, math.ceil(steps / 5))
        why = (
            f"about five checkpoints over {steps} steps, at least 25 steps apart"
            if steps > 25
            else f"a short run of {steps} steps: no intermediate checkpoint (one is written on cancel)"
        )
        self.decide("checkpoint_every", train.checkpoint_every, every, why)


def resolve_grpo(
    train: TrainSettings,
    grpo: GrpoSettings,
    *,
    prompt_lengths: list[int],
    shape: ModelShape,
    quantization: str,
    lora_rank: int,
    device: str,
    free_memory_gib: float | None,
    lora_targets: list[str] | str = "all-linear",
    bf16_supported: bool = True,
    context_in_use: bool = False,
) -> tuple[GrpoTraining, GrpoSettings, GrpoMemory | None]:
    """Every setting of a GRPO job decided, with reasons (``GrpoTraining.reasons``, the GRPO ones as
    ``grpo_<name>``); the GRPO section with its ``None``s decided; the memory estimate when there is a
    free-memory figure. Raises DoesNotFitError, and ValueError for settings that cannot go together."""
    if not prompt_lengths:
        raise ValueError("no prompts: the dataset has no usable rows")
    device = "cuda" if device.startswith("cuda") else "cpu"
    est = {
        "gradient_checkpointing": train.gradient_checkpointing is not False, "lora_targets": lora_targets,
        "device": device, "bf16_supported": bf16_supported,
        "liger_kernels": train.backend != "unsloth" and liger_kernels_apply(shape.model_type, device),
        "loss_chunk_bytes": LOGPS_CHUNK_BYTES,  # the learning passes' head chunks (engine.training.grpo_loss)
    }  # fmt: skip
    fit = FitCheck(shape, quantization, lora_rank, free_memory_gib or 0.0, context_in_use, est)
    plan = _GrpoPlan(
        train, grpo, fit, free_memory_gib, device, max(prompt_lengths), len(prompt_lengths), {}, {}
    )
    g = plan.group()
    prompts = plan.prompts_per_step(g)
    completion = plan.completion_length(g)
    seq = plan.prompt_len + completion
    if train.max_seq_length is not None and train.max_seq_length < seq:
        raise ValueError(
            f"max_seq_length={train.max_seq_length} is shorter than the longest prompt ({plan.prompt_len} tokens) "
            f"plus grpo_max_completion_length={completion}: raise it, or leave it out"
        )
    plan.decide(
        "max_seq_length",
        None,
        seq,
        f"the longest prompt ({plan.prompt_len} tokens) + {completion} completion tokens",
    )
    plan.decide("packing", train.packing, False, "off: each row is one prompt and one of its completions")
    micro, batch = plan.batches(prompts * g, completion)
    plan.schedule(shape, lora_rank, prompts)
    memory = estimate_grpo_memory(fit, micro, batch, plan.prompt_len, completion) if free_memory_gib else None
    recompute, plan.reasons["gradient_checkpointing"], full = decide_recompute(
        train, fit, memory.train if memory else None, micro, seq
    )
    offload, plan.reasons["offload_activations"] = decide_offload(
        train, recompute, shape, micro * seq, device
    )
    if memory is not None and (full is not None or offload):
        changed = {"gradient_checkpointing": recompute, "offload_activations": offload}
        memory = estimate_grpo_memory(fit, micro, batch, plan.prompt_len, completion, **changed)
    plan.value.update(gradient_checkpointing=recompute, offload_activations=offload)
    for name, info in TrainSettings.model_fields.items():
        if name not in plan.value:
            plan.value[name] = getattr(train, name)
            default = info.get_default(call_default_factory=True)
            plan.reasons[name] = "default" if plan.value[name] == default else "given"
    if memory is not None:
        plan.reasons["micro_batch_size"] += f"; estimate {memory.summary()}"
    grpo_values = {k: plan.value.pop(k) for k in list(plan.value) if k.startswith("grpo_")}
    resolved = GrpoTraining(
        **plan.value, reasons=plan.reasons, memory=memory.train if memory else None,
        rows_per_epoch=plan.n_prompts, truncated_examples=0, prompts_per_step=prompts,
    )  # fmt: skip
    decided = grpo.model_copy(
        update={
            "num_generations": g,
            "max_completion_length": completion,
            "generation_batch_size": grpo_values["grpo_generation_batch_size"],
        }
    )
    return resolved, decided, memory
