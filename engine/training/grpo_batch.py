"""A GRPO micro-batch: prompt + completion rows, right-padded, with where each completion token is predicted.

Each row is one prompt followed by one of its completions, from position 0; no attention mask is
passed (right padding under causal attention: nothing real comes after the padding), as in
engine.training.batching. The loss needs the log-probabilities of the completion tokens only: token j
of row i's completion is predicted at position ``len(prompt_i) - 1 + j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompletionBatch:
    input_ids: torch.Tensor  # [rows, longest prompt + completion]
    position_ids: torch.Tensor  # [rows, same]
    where: tuple[torch.Tensor, torch.Tensor]  # (row, column) of the position predicting each completion token
    targets: torch.Tensor  # [completion tokens] flat, row-major
    mask: torch.Tensor  # [rows, longest completion] bool: which cells are completion tokens
    tokens: int  # prompt and completion tokens (no padding)

    @property
    def completion_tokens(self) -> int:
        return int(self.targets.numel())


def collate_completions(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, device: torch.device | str
) -> CompletionBatch:
    """One micro-batch of ``prompts[i] + completions[i]`` rows (each completion at least one token)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    longest = max(len(c) for c in completions)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask[i, : len(c)] = True
        rows += [i] * len(c)
        cols += range(len(p) - 1, len(p) - 1 + len(c))
        targets += c
    positions = torch.arange(width, dtype=torch.long).expand(len(prompts), width)
    return CompletionBatch(
        input_ids=ids.to(device),
        position_ids=positions.to(device),
        where=(torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
        targets=torch.tensor(targets, dtype=torch.long, device=device),
        mask=mask.to(device),
        tokens=sum(len(p) + len(c) for p, c in zip(prompts, completions, strict=True)),
    )
