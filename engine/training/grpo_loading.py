"""Everything a GRPO job decides before the model loads: its prompts as token ids, and every setting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.contract.events import EventWriter
from engine.contract.grpo import GrpoSettings
from engine.contract.spec import FinetuneSpec
from engine.data.formats import Example
from engine.models.presets import model_shape
from engine.planning.grpo import GrpoMemory, GrpoTraining, resolve_grpo
from engine.training.base_model import load_tokenizer
from engine.training.grpo_rollout import PromptSet
from engine.training.loading import free_memory_gib, log_reasons


@dataclass
class PreparedGrpo:
    tokenizer: Any
    prompts: PromptSet
    resolved: GrpoTraining
    grpo: GrpoSettings  # the spec's section, every None decided
    memory: GrpoMemory | None


def prepare_grpo(
    spec: FinetuneSpec, examples: list[Example], device: str, events: EventWriter
) -> PreparedGrpo:
    events.stage("tokenizing")
    shape = model_shape(spec.model, trust_remote_code=spec.trust_remote_code)
    tokenizer = load_tokenizer(spec.model, trust_remote_code=spec.trust_remote_code)
    prompts = PromptSet.build(examples, tokenizer)
    free = free_memory_gib(device)
    resolved, grpo, memory = resolve_grpo(
        spec.train,
        spec.grpo,
        prompt_lengths=prompts.lengths,
        shape=shape,
        quantization=spec.quantization,
        lora_rank=spec.lora.rank,
        device=device,
        free_memory_gib=free,
        lora_targets=spec.lora.target_modules,
        context_in_use=free is not None,  # mem_get_info made this process's CUDA context
    )
    decided = {f"grpo_{n}": getattr(grpo, n) for n in ("num_generations", "max_completion_length")}
    decided["grpo_generation_batch_size"] = grpo.generation_batch_size
    log_reasons(resolved, events, decided)
    if spec.dataset.eval_fraction:
        events.warning(
            "eval_fraction is not used by method 'grpo' (its figures are the rewards of each step's samples)"
        )
    return PreparedGrpo(tokenizer, prompts, resolved, grpo, memory)
