"""GRPO's settings and its rewards, as a job's spec declares them (the ``grpo`` section of a fine-tune).

Flat names carry the section's name (``grpo_beta``, ``grpo_rewards``), as LoRA's do (``lora_rank``):
other methods have a ``beta`` and a ``loss_type`` of their own. Torch-free, like the whole contract;
the rewards' code is engine.rewards.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

COMPLETIONS_FILE = "completions.jsonl"  # a GRPO job's samples with their rewards (bounded), in its folder
# What a reward function is called with besides the prompt rows' columns, as trl calls it
# (engine.rewards.scoring.score): a column of one of these names would collide with the call's own.
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo in a setting is an error


class _Reward(_Strict):
    weight: float = Field(1.0, ge=-1000, le=1000, description="this reward's weight in the sum of rewards")
    label: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]{1,40}$",
        description="its name in metrics (rewards/<label>/mean); default: the reward's name, a python "
        "reward's file name",
    )


class AnswerReward(_Reward):
    """1 where the answer extracted from the completion equals the row's answer column, else 0."""

    name: Literal["answer"]
    column: str = Field("answer", description="the dataset column holding the right answer")
    extract: Literal["auto", "boxed", "last_number", "regex"] = Field(
        "auto",
        description="how the completion's answer is found: the last \\boxed{...}, the last number, the last "
        "match of pattern (its first group, if it has one); auto: the last \\boxed{} where there is one, "
        "else the last number",
    )
    pattern: str | None = Field(None, description="with extract 'regex': the regular expression")

    @model_validator(mode="after")
    def _pattern(self) -> AnswerReward:
        if self.pattern is not None and self.extract == "auto":
            self.extract = "regex"
        if self.extract == "regex":
            if self.pattern is None:
                raise ValueError(
                    "the answer reward with extract 'regex' needs pattern (the regular expression)"
                )
            _compiles(self.pattern, "answer reward's pattern")
        return self


class FormatReward(_Reward):
    """1 where the completion matches a regular expression, else 0."""

    name: Literal["format"]
    pattern: str = Field(description="a regular expression (dot matches newlines)")
    match: Literal["full", "search"] = Field(
        "full", description="full: the whole completion must match; search: a match anywhere"
    )

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, v: str) -> str:
        return _compiles(v, "format reward's pattern")


class JsonReward(_Reward):
    """1 where the completion is valid JSON (and, given a schema, valid against it), else 0."""

    name: Literal["json"]
    json_schema: dict[str, Any] | None = Field(None, description="a JSON Schema the value must satisfy")
    strip_fences: bool = Field(True, description="read the JSON inside a ``` fenced block where there is one")

    @field_validator("json_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            from jsonschema import validators  # jsonschema comes with mcp; imported only for a schema
            from jsonschema.exceptions import SchemaError

            try:
                validators.validator_for(v).check_schema(v)
            except SchemaError as exc:
                raise ValueError(f"json_schema is not a valid JSON Schema: {exc.message}") from None
        return v


class LengthReward(_Reward):
    """DAPO's soft overlong punishment (trl's get_soft_overlong_punishment): 0 up to max_tokens -
    cache_tokens completion tokens, falling linearly to -1 at max_tokens, -1 beyond."""

    name: Literal["length"]
    max_tokens: int | None = Field(None, ge=1, description="default: the job's grpo_max_completion_length")
    cache_tokens: int | None = Field(None, ge=1, description="the soft zone's width; default: max_tokens / 4")


class PythonReward(_Reward):
    """The user's own: ``def reward(prompts, completions, **columns) -> list[float | None]`` in a file."""

    name: Literal["python"]
    path: str = Field(description="the Python file (runs in the job's worker, with the job's rights)")
    function: str = Field("reward", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the function's name")


RewardChoice = Annotated[
    Union[AnswerReward, FormatReward, JsonReward, LengthReward, PythonReward], Field(discriminator="name")
]
REWARD_NAMES = ("answer", "format", "json", "length", "python")


def _compiles(pattern: str, what: str) -> str:
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None
    return pattern


def _reward_items(value: Any) -> Any:
    """Rewards as the CLI and tools may write them: JSON text, a name ('json', 'length'), a .py path."""
    if isinstance(value, str):
        value = json.loads(value) if value.lstrip().startswith(("[", "{")) else [value]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return value
    out = []
    for item in value:
        if isinstance(item, str) and item.lstrip().startswith("{"):
            item = json.loads(item)
        elif isinstance(item, str):
            item = {"name": "python", "path": item} if item.endswith(".py") else {"name": item}
        out.append(item)
    return out


class GrpoSettings(_Strict):
    """GRPO (method 'grpo'): sample several completions per prompt, score them, move toward the better.

    The maths is trl's GRPOTrainer's (one policy update per generation, so no clipping bites); its names.
    Every ``None`` is chosen for the card and the data, with its reason.
    """

    num_generations: int | None = Field(
        None,
        ge=2,
        le=64,
        description="completions sampled per prompt (the group); default: 8 on a GPU (trl's default), 4 on a "
        "CPU, where sampling is slow (memory sets how many are sampled and learned at once, not the group)",
    )
    max_completion_length: int | None = Field(
        None,
        ge=1,
        le=32768,
        description="most tokens generated per completion; default: the longest of 256, 128 and 64 that fits "
        "the card (128 on a CPU)",
    )
    generation_batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="completions generated at once; default: a step's worth, or what fits",
    )
    sampling_graphs: bool = Field(
        True,
        description="sample with a static KV cache and, on a CUDA GPU, a CUDA graph of one decode step instead "
        "of transformers' generate, which is bound by the host (off: generate; a model that cannot sample "
        "this way falls back to generate, with a warning)",
    )
    temperature: float = Field(1.0, gt=0, le=10, description="sampling temperature (also divides the logits)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling")
    beta: float = Field(
        0.0, ge=0, le=10, description="KL coefficient against the starting policy; 0 (trl's default) skips it"
    )
    loss_type: Literal["dapo", "grpo", "dr_grpo", "bnpo"] = Field(
        "dapo",
        description="trl's loss normalisation: dapo (tokens of the whole step), grpo (per completion, "
        "then mean), dr_grpo (by completions x max_completion_length), bnpo (tokens of each micro-batch)",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide advantages by the rewards' spread in the group, the step, or not at all"
    )
    mask_truncated_completions: bool = Field(
        False, description="leave completions cut off at max_completion_length out of the loss"
    )
    rewards: list[RewardChoice] = Field(
        default_factory=list,
        description="the rewards, summed with their weights: answer (the row's answer column), format (a "
        "regex), json (valid JSON, optionally a json_schema), length (soft overlong penalty), python (your "
        "file's reward function); each an object {name, weight, ...}, or a name / a .py path",
    )

    @field_validator("rewards", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return _reward_items(v)


def grpo_settings_problem(method: str, grpo: GrpoSettings) -> None:
    """Refuse GRPO settings given to another method, and a GRPO job without a reward (ValueError)."""
    default = (
        GrpoSettings()
    )  # values away from their defaults (a spec read back from spec.json has every field set)
    given = [n for n in GrpoSettings.model_fields if getattr(grpo, n) != getattr(default, n)]
    if method != "grpo" and given:
        names = ", ".join(f"grpo_{n}" for n in sorted(given))
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{names} {verb} to method 'grpo', but method is '{method}': set method='grpo'")
    if method == "grpo" and not grpo.rewards:
        raise ValueError(
            "method 'grpo' needs at least one reward in grpo_rewards, e.g. "
            '[{"name": "answer"}] (the row\'s answer column) or [{"name": "format", "pattern": "..."}]'
        )
