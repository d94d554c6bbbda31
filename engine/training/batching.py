"""Turning tokenized examples into micro-batches.

One code path for packed and unpacked training: a *row* is a list of examples laid end to end
(one example when packing is off, as many as fit in ``max_seq_length`` when it is on); a
micro-batch is a few rows, right-padded to the longest. Position ids restart at 0 for every
example, and no attention mask is passed: transformers then derives a block-causal mask from the
position ids, so packed examples never attend to each other, and right padding needs no mask at
all under causal attention (nothing real comes after it). Targets are shifted here, so the loss
never predicts an example's first token from the end of the previous one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from engine.data.tokenizing import IGNORE_INDEX as IGNORE


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length]
    targets: torch.Tensor  # [rows, length], already shifted; IGNORE where no loss
    real_tokens: int  # tokens that are not padding
    target_tokens: int  # tokens that carry loss

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(
            self.input_ids.to(device, non_blocking=True),
            self.position_ids.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            self.real_tokens,
            self.target_tokens,
        )


def pack_rows(lengths: list[int], max_seq_length: int, packing: bool) -> list[list[int]]:
    """Group example indices into rows of at most ``max_seq_length`` tokens (first-fit decreasing)."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_seq_length - lengths[i])
    return rows


@dataclass
class StepPlan:
    """Which rows each optimizer step trains on, fixed up front so a resumed run sees the same data."""

    steps: list[list[list[int]]]  # steps[s] = rows; a row = example indices

    @property
    def total_steps(self) -> int:
        return len(self.steps)


def plan_steps(
    lengths: list[int],
    *,
    max_seq_length: int,
    packing: bool,
    rows_per_step: int,
    total_steps: int,
    seed: int,
) -> StepPlan:
    """Epoch after epoch of shuffled rows, cut into steps of ``rows_per_step`` rows."""
    base_rows = pack_rows(lengths, max_seq_length, packing)
    if not base_rows:
        raise ValueError("no training examples left after tokenization")
    steps: list[list[list[int]]] = []
    pending: list[list[int]] = []
    epoch = 0
    while len(steps) < total_steps:
        rows = list(base_rows)
        random.Random(seed + epoch).shuffle(rows)
        epoch += 1
        for row in rows:
            pending.append(row)
            if len(pending) == rows_per_step:
                steps.append(pending)
                pending = []
                if len(steps) == total_steps:
                    break
    return StepPlan(steps)


def collate(
    rows: list[list[int]],
    input_ids: list[list[int]],
    labels: list[list[int]],
    *,
    pad_id: int,
    pad_to_multiple: int = 8,
    width: int | None = None,
) -> MicroBatch:
    """Lay each row's examples end to end, shift targets inside each example, right-pad (to ``width``
    when given, else to the longest row rounded up to ``pad_to_multiple``)."""
    flat_ids: list[list[int]] = []
    flat_pos: list[list[int]] = []
    flat_tgt: list[list[int]] = []
    target_tokens = 0
    for row in rows:
        ids: list[int] = []
        pos: list[int] = []
        tgt: list[int] = []
        for i in row:
            x, y = input_ids[i], labels[i]
            ids.extend(x)
            pos.extend(range(len(x)))
            # target[t] = label[t+1] within the example; the last token predicts nothing
            shifted = y[1:] + [IGNORE]
            tgt.extend(shifted)
            target_tokens += sum(1 for v in shifted if v != IGNORE)
        flat_ids.append(ids)
        flat_pos.append(pos)
        flat_tgt.append(tgt)
    real = sum(len(r) for r in flat_ids)
    longest = max(len(r) for r in flat_ids)
    length = max(-(-longest // pad_to_multiple) * pad_to_multiple, width or 0)
    for ids, pos, tgt in zip(flat_ids, flat_pos, flat_tgt, strict=True):
        pad = length - len(ids)
        ids.extend([pad_id] * pad)
        # Padding continues the last example's positions, so an unpacked batch stays one plain
        # causal sequence per row (the fast is_causal attention path); nothing attends to it.
        start = pos[-1] + 1 if pos else 0
        pos.extend(range(start, start + pad))
        tgt.extend([IGNORE] * pad)
    return MicroBatch(
        input_ids=torch.tensor(flat_ids, dtype=torch.long),
        position_ids=torch.tensor(flat_pos, dtype=torch.long),
        targets=torch.tensor(flat_tgt, dtype=torch.long),
        real_tokens=real,
        target_tokens=target_tokens,
    )


def _round_up(n: int, q: int) -> int:
    return -(-n // q) * q


@dataclass(frozen=True)
class StaticShapes:
    """How micro-batches are padded so that few shapes recur, for CUDA graphs (one graph per shape,
    engine.training.cuda_graphs). Padding is never trained on: padded tokens carry no target, padded
    loss positions have the IGNORE target, padded attention pieces have length zero.

    - row width: ``max_seq_length`` (rounded up to 8) with packing, whose rows are nearly full anyway;
      without packing the next power of two >= the longest row (at least 128), capped there;
    - loss positions: rounded up to a multiple of a quarter of the micro-batch's cells (in whole loss
      chunks), so at most four loss shapes, for at most a quarter's worth of padded positions;
    - cumulative sequence lengths (varlen attention): room for ``pieces_per_row`` pieces in every row
      (the run's most examples in one row, plus its padding; known from the step plan), else a
      power-of-two count.
    """

    max_seq_length: int
    packing: bool
    loss_chunk: int  # tokens per chunk of the loss (engine.planning.memory.loss_chunk_tokens)
    pieces_per_row: int = 0  # 0: not known

    def width(self, longest: int) -> int:
        cap = _round_up(self.max_seq_length, 8)
        if self.packing:
            return max(cap, _round_up(longest, 8))
        return max(min(cap, max(128, 1 << max(0, longest - 1).bit_length())), _round_up(longest, 8))

    def loss_positions(self, n: int, cells: int) -> int:
        quarter = self.loss_chunk * max(1, -(-cells // (4 * self.loss_chunk)))
        return min(cells, _round_up(n, quarter))

    def boundaries(self, n: int, rows: int) -> int:
        fixed = rows * self.pieces_per_row + 1
        return fixed if n <= fixed else 1 << max(0, n - 1).bit_length()


def most_pieces_per_row(plan: StepPlan) -> int:
    """The most examples in one row of the plan, plus one for the row's padding."""
    return 1 + max((len(row) for step in plan.steps for row in step), default=0)


@dataclass
class DeviceBatch:
    input_ids: torch.Tensor  # [rows, L]
    position_ids: torch.Tensor  # [rows, L]
    gather_index: torch.Tensor  # [n] flat positions that carry a target (padded: position 0)
    gather_targets: torch.Tensor  # [n] their target ids (padded: IGNORE)
    n_targets: int  # real targets, without the padding
    real_tokens: int
    attn_kwargs: dict[str, Any]

    @property
    def shape(self) -> tuple[Any, ...]:
        """What a CUDA graph of this micro-batch depends on besides the tensors' values."""
        cu = self.attn_kwargs.get("cu_seq_lens_q")
        return (
            tuple(self.input_ids.shape),
            self.gather_index.numel(),
            None if cu is None else (cu.numel(), self.attn_kwargs["max_length_q"]),
        )

    def _tensors(self) -> list[torch.Tensor]:
        cu = self.attn_kwargs.get("cu_seq_lens_q")
        tensors = [self.input_ids, self.position_ids, self.gather_index, self.gather_targets]
        return tensors + ([cu] if cu is not None else [])

    def clone(self) -> DeviceBatch:
        """The same batch in tensors of its own (a graph's static inputs)."""
        kwargs = dict(self.attn_kwargs)
        if "cu_seq_lens_q" in kwargs:
            kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_q"].clone()
        return replace(
            self,
            input_ids=self.input_ids.clone(),
            position_ids=self.position_ids.clone(),
            gather_index=self.gather_index.clone(),
            gather_targets=self.gather_targets.clone(),
            attn_kwargs=kwargs,
        )

    def copy_from(self, other: DeviceBatch) -> None:
        """Write ``other``'s values into this batch's tensors (same shape), on the current stream."""
        for mine, theirs in zip(self._tensors(), other._tensors(), strict=True):
            mine.copy_(theirs, non_blocking=True)
