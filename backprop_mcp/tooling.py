"""How the tools are declared: annotation hints, settings taken from the job spec models, bounded arguments."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import Annotated, Any, TypeVar, get_args

from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from backprop_mcp.limits import MAX_NAME_CHARS, MAX_PATH_CHARS
from engine.interface import setting_parameters, settings_of

_Fn = TypeVar("_Fn", bound=Callable[..., Any])

# The settings each tool leaves to the spec's defaults, on purpose: an agent sees the ones that matter (the
# CLI and the Python API take every one). A setting added to the spec is an argument of every tool that does
# not list it here.
_EXPERT = frozenset(
    {
        "warmup_steps", "lr_scheduler", "gradient_checkpointing", "offload_activations", "weight_decay",
        "max_grad_norm", "compile", "cuda_graphs", "report_to", "lora_dropout", "lora_target_modules",
        "trust_remote_code", "split", "pause_temperature_c", "resume_temperature_c", "emergency_temperature_c",
        "max_pause_s",
    }
)  # fmt: skip
LEFT_OUT = {
    "start_finetune": _EXPERT,
    "run_slao_series": _EXPERT | {
        "steps", "epochs", "micro_batch_size", "gradient_accumulation", "packing", "seed", "checkpoint_every",
        "backend", "lora_alpha", "gpu_index", "merge_weight", "qr_init", "ties_density", "dare_drop",
    },
    "export_gguf": frozenset({"ollama_host", "trust_remote_code"}),
}  # fmt: skip
# check_dataset measures a dataset with a fine-tune's tokenizer and memory settings, and no others
CHECK_DATASET_TAKES = (
    "model", "method", "max_seq_length", "max_prompt_length", "micro_batch_size", "quantization", "lora_rank",
    "grpo_rewards", "grpo_num_generations", "grpo_max_completion_length",
)  # fmt: skip


def takes_settings(
    job: type[BaseModel],
    *,
    leave_out: Collection[str] = (),
    only: Collection[str] = (),
    **tightened: FieldInfo,
) -> Callable[[_Fn], _Fn]:
    """The decorated tool also takes ``job``'s settings (``engine.contract.settings``) but ``leave_out`` (or
    ``only`` those) as keyword arguments, into its ``**settings``: each with the spec field's type, bounds,
    description and default (the SDK builds the input schema from this signature), ``tightened`` by the
    tool where it says more (a path's length limit, its own wording)."""

    def declare(fn: _Fn) -> _Fn:
        own = inspect.signature(fn, eval_str=True)
        skip = set(settings_of(job)) - set(only) if only else leave_out
        settings = [
            p.replace(annotation=Annotated[p.annotation, tightened.get(p.name) or _text_limit(p.annotation)])
            for p in setting_parameters(job, skip)
        ]
        first = [p for p in own.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]
        last = [p for p in own.parameters.values() if p.kind is p.KEYWORD_ONLY]  # the resolvers (roots)
        fn.__signature__ = own.replace(parameters=[*first, *settings, *last])  # type: ignore[attr-defined]
        return fn

    return declare


def _text_limit(kind: Any) -> FieldInfo:
    """Every text argument has a length limit (limits.py): a text setting no tool tightened gets a path's."""
    text = str in (get_args(get_args(kind)[0]) or [get_args(kind)[0]])  # kind: Annotated[str | None, ...]
    return Field(max_length=MAX_PATH_CHARS) if text else Field()


def path_arg(description: str | None = None) -> Any:
    """A path (or a model or dataset name, which can be a path) argument: bounded, described."""
    return (
        Field(max_length=MAX_PATH_CHARS, description=description)
        if description
        else Field(max_length=MAX_PATH_CHARS)
    )


def name_arg(description: str | None = None) -> Any:
    """A job id or a short name (a model in Ollama): bounded, described."""
    return (
        Field(max_length=MAX_NAME_CHARS, description=description)
        if description
        else Field(max_length=MAX_NAME_CHARS)
    )


def hints(*, read_only: bool, destructive: bool, idempotent: bool, open_world: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=read_only,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=open_world,
    )
