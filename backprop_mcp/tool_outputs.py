"""Pydantic models of what the tools return: they become each tool's ``outputSchema``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from engine.interface import TokenStats

JobStateName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class Progress(BaseModel):
    step: int | None = Field(None, description="optimizer steps done (in the current run of a series)")
    total: int | None = Field(None, description="optimizer steps planned (per run for a series)")
    fraction: float | None = Field(None, description="0..1 over the whole job")
    run: int | None = Field(None, description="current run of a series (1-based)")
    num_runs: int | None = None
    loss: float | None = None
    learning_rate: float | None = None
    tokens_per_s: float | None = None
    eta_s: float | None = Field(None, description="estimated seconds left in the current run")
    metrics: dict[str, float] | None = Field(
        None,
        description="the method's own figures at this step, named as trl logs them "
        "(DPO/KTO/ORPO: rewards/chosen, rewards/accuracies, ...; GRPO: reward, reward_std, "
        "rewards/<function>/mean and /std, frac_reward_zero_std, completions/mean_length, kl, ...)",
    )


class JobStatus(BaseModel):
    job_id: str
    kind: str
    state: JobStateName
    label: str = Field(description="model and data in a few words")
    resource_uri: str
    job_dir: str
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    elapsed_s: float | None = None
    stage: str | None = Field(
        None, description="the phase the worker is in (loading_model, training, saving, ...)"
    )
    progress: Progress | None = None
    queued_reason: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, str] = Field(default_factory=dict, description="name -> absolute path")
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None
    cancel_requested: bool = False
    next_step: str = Field(description="what an agent would usually do next")


class JobSummary(BaseModel):
    job_id: str
    kind: str
    state: JobStateName
    label: str
    created_at: str
    percent: float | None = Field(None, description="training progress, 0..100")
    resource_uri: str


class JobList(BaseModel):
    jobs: list[JobSummary]
    count: int
    state_folder: str


class StartedJob(BaseModel):
    job_id: str
    kind: str
    state: JobStateName
    resource_uri: str
    job_dir: str
    spec: dict[str, Any] = Field(description="the full job specification the worker runs")
    notes: list[str] = Field(default_factory=list)
    next_step: str


class CancelResult(BaseModel):
    job_id: str
    state: JobStateName
    message: str


class DatasetCheck(BaseModel):
    path: str
    format: str | None = None
    rows_total: int = 0
    rows_ok: int = 0
    skipped: int = 0
    bad_rows: int = 0
    problems: list[str] = Field(
        default_factory=list, description="bad rows as 'file:line: what is wrong' (first 20)"
    )
    tokens: TokenStats | None = Field(
        None,
        description="token lengths with the model's tokenizer and chat template (preference data: per "
        "sequence, a prompt and one answer)",
    )
    method: str | None = Field(None, description="the training method the defaults are for")
    method_note: str | None = Field(None, description="what the method makes of the file")
    method_problem: str | None = Field(None, description="why the method cannot train on the file")
    prompt_tokens: TokenStats | None = Field(
        None, description="preference data: token lengths of the prompts"
    )
    completion_tokens: TokenStats | None = Field(
        None, description="preference data: token lengths of the answers"
    )
    fits: bool | None = None
    fit_error: str | None = None
    defaults: dict[str, Any] | None = Field(None, description="the settings a fine-tune would use")
    reasons: dict[str, str] | None = Field(None, description="why each default was chosen")
    memory_estimate_gib: dict[str, Any] | None = None
    device: str | None = None
    ready: bool = Field(description="True when start_finetune would accept this dataset as it is")
    next_step: str


class Generation(BaseModel):
    text: str
    model: str
    adapter: str | None = None
    new_tokens: int
    seconds: float
    stopped_by_time: bool
    prompt: str = Field(description="the prompt as the model saw it (chat template applied)")
