"""The checks of a GRPO job before it exists (torch-free): its reward files, the columns its rewards read,
and the defaults check-data shows for its prompts.

Run by every caller's preflight (engine.planning.preflight), after the dataset's own rows were checked.
Whether an MCP tool may name a Python reward at all is the server's decision (backprop_mcp.reward_policy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.contract.grpo import AnswerReward, PythonReward
from engine.contract.spec import FinetuneSpec
from engine.data.prompts import prompt_token_ids
from engine.planning.grpo import GrpoMemory, GrpoTraining, resolve_grpo


class GrpoProblem(ValueError):
    """A GRPO job that would fail; the preflight turns it into its own refusal."""


def check_grpo(spec: FinetuneSpec, max_bytes: int | None = None) -> list[str]:
    """Notes on a GRPO job's rewards; GrpoProblem for a reward file that is not there or a column no prompt
    row has. ``max_bytes``: read a dataset only up to this size (a tool call's limit)."""
    for reward in spec.grpo.rewards:
        if isinstance(reward, PythonReward):
            path = Path(reward.path).expanduser()
            if not path.is_file() or path.suffix != ".py":
                raise GrpoProblem(
                    f"grpo_rewards: the reward file {reward.path} is not a .py file on this machine; give the path "
                    f"of a Python file with def {reward.function}(prompts, completions, **columns)"
                )
    needed = sorted({r.column for r in spec.grpo.rewards if isinstance(r, AnswerReward)})
    data = Path(spec.dataset.path).expanduser()
    if not needed or not data.exists() or (max_bytes is not None and _size(data) > max_bytes):
        return []  # (a hub dataset, or one too big to read in a tool call: the worker finds out)
    from engine.data.formats import inspect_dataset  # the rows again: prompt sets are small

    report = inspect_dataset(str(data), spec.dataset.split)
    notes = []
    for column in needed:
        have = report.columns.get(column, 0)
        if have == 0:
            found = ", ".join(sorted(report.columns)) or "none besides the prompt"
            raise GrpoProblem(
                f"the answer reward reads the column {column!r}, which no prompt row has (their columns: {found}); "
                "add it to the rows, or name the right one in the reward's column"
            )
        if have < report.rows_ok:
            notes.append(
                f"{report.rows_ok - have} of {report.rows_ok} prompts have no {column!r}: the answer reward "
                "leaves them out (None)"
            )
    return notes


def _size(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def grpo_defaults(
    spec: FinetuneSpec, examples: list[Any], tokenizer: Any, fit: dict[str, Any]
) -> tuple[GrpoTraining, dict[str, Any], list[int], GrpoMemory | None]:
    """What check-data shows for a GRPO job: the plan, the GRPO settings decided beside it (``grpo_*``), the
    prompts' token lengths, and the memory of both phases (where there is a free-memory figure)."""
    lengths = [prompt_token_ids(ex.prompt, ex.messages, tokenizer) for ex in examples]
    resolved, grpo, memory = resolve_grpo(
        spec.train, spec.grpo, prompt_lengths=[len(x) for x in lengths], **fit
    )
    decided = {
        "grpo_num_generations": grpo.num_generations,
        "grpo_max_completion_length": grpo.max_completion_length,
        "grpo_generation_batch_size": grpo.generation_batch_size,
    }
    return resolved, decided, [len(x) for x in lengths], memory
