"""``completions.jsonl`` in a GRPO job's folder: what the model writes, with its rewards, bounded.

Each step adds the completions of its first prompt (one group: the same prompt sampled several times,
which is what GRPO compares), one JSON object per line: step, prompt, completion, each reward, their
weighted sum and the advantage. An agent reads the file to see what the model writes and how the rewards
judge it. The file holds at most ``MAX_LINES`` lines: past that, the oldest are dropped (the file is
rewritten atomically with the newest ``KEEP_LINES``), so a long run's folder does not grow with it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from engine.contract.files import atomic_write_text
from engine.training.grpo_rollout import Rollout

MAX_LINES = 512
KEEP_LINES = 256
MAX_CHARS = 4000  # per prompt or completion shown


def _cut(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_CHARS else value[:MAX_CHARS] + "..."
    if isinstance(value, list):
        return [{**m, "content": _cut(m.get("content", ""))} if isinstance(m, dict) else m for m in value]
    return value


def _number(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


class CompletionsLog:
    def __init__(self, path: Path):
        self.path = path
        self.lines = sum(1 for _ in path.open(encoding="utf-8")) if path.exists() else 0

    def add(self, step: int, prompts: list[Any], rollout: Rollout, group: int) -> None:
        """The completions of the step's first prompt (``group`` of them) as lines of the file."""
        rows = []
        for i in range(min(group, len(rollout.completion_ids))):
            rows.append(
                {
                    "step": step,
                    "prompt": _cut(prompts[rollout.prompt_index[i]]),
                    "completion": _cut(rollout.completions[i]),
                    "rewards": {k: _number(v[i]) for k, v in rollout.scores.per_function.items()},
                    "reward": _number(rollout.scores.total[i]),
                    "advantage": round(float(rollout.advantages.advantages[i]), 6),
                    "tokens": len(rollout.completion_ids[i]),
                    "truncated": rollout.truncated[i],
                }
            )
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if self.lines + len(rows) > MAX_LINES:
            kept = self.path.read_text(encoding="utf-8").splitlines(keepends=True)[
                -(KEEP_LINES - len(rows)) :
            ]
            atomic_write_text(self.path, "".join(kept) + text)
            self.lines = len(kept) + len(rows)
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
        self.lines += len(rows)
