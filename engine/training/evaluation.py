"""Evaluating an adapter on held-out examples: mean loss on the supervised tokens, and greedy
exact match where rows carry a reference answer. Used by a fine-tune's eval split and by every run
of a SLAO series (which scores the merged adapter on each earlier slice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.contract.events import Eval, EventWriter
from engine.data.formats import Example
from engine.data.tokenizing import tokenize_batch
from engine.training import accel
from engine.training.batching import IGNORE, collate
from engine.training.loss import causal_lm_loss_sum

EXACT_MATCH_MAX_ROWS = 100  # per held-out set: greedy generation is the slow part of evaluation
EVAL_BATCH = 8


@dataclass
class HeldoutSet:
    """A slice's held-out rows, tokenized once: loss inputs and, where rows have one, the answer."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    prompts: list[list[int]]  # tokens before the reference answer
    references: list[list[int]]  # the reference answer's tokens (the last supervised span)


def _last_supervised_span(labels: list[int]) -> tuple[int, int] | None:
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE:
        end -= 1
    if end == 0:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return start, end


def _has_reference(ex: Example) -> bool:
    # A completion, or a chat whose last turn is the assistant's, has an answer to match exactly;
    # plain text does not.
    if ex.kind == "completion":
        return True
    return (
        ex.kind == "chat"
        and ex.messages is not None
        and bool(ex.messages)
        and ex.messages[-1].get("role") == "assistant"
    )


def tokenize_heldout(examples: list[Example], tokenizer: Any, max_seq_length: int | None) -> HeldoutSet:
    out = HeldoutSet([], [], [], [])
    for ex, t in zip(examples, tokenize_batch(examples, tokenizer, max_seq_length), strict=True):
        if not any(v != IGNORE for v in t.labels[1:]):
            continue
        out.input_ids.append(list(t.input_ids))
        out.labels.append(list(t.labels))
        span = _last_supervised_span(list(t.labels)) if _has_reference(ex) else None
        if span is not None and span[0] > 0 and len(out.prompts) < EXACT_MATCH_MAX_ROWS:
            out.prompts.append(list(t.input_ids[: span[0]]))
            out.references.append(list(t.labels[span[0] : span[1]]))
    return out


def _autocast(device: str) -> Any:
    dtype = accel.autocast_dtype(device)
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def heldout_loss(model: Any, data: HeldoutSet, pad_id: int, device: str) -> float:
    """Mean next-token loss over the supervised (assistant/completion) tokens."""
    total, targets = 0.0, 0
    for i in range(0, len(data.input_ids), EVAL_BATCH):
        rows = [[j] for j in range(i, min(i + EVAL_BATCH, len(data.input_ids)))]
        batch = collate(rows, data.input_ids, data.labels, pad_id=pad_id).to(device)
        with _autocast(device):
            total += float(causal_lm_loss_sum(model, batch.input_ids, batch.position_ids, batch.targets))
        targets += batch.target_tokens
    return total / max(1, targets)


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, data: HeldoutSet, pad_id: int, device: str) -> float | None:
    """Share of rows whose greedy answer equals the reference (decoded, whitespace-stripped).

    The model generates exactly as many tokens as the reference has, so an answer that goes on
    past where the reference ends (or stops early) does not match.
    """
    if not data.prompts:
        return None
    correct = 0
    order = sorted(range(len(data.prompts)), key=lambda k: len(data.prompts[k]))  # similar lengths batch well
    for i in range(0, len(order), EVAL_BATCH):
        idx = order[i : i + EVAL_BATCH]
        longest = max(len(data.prompts[k]) for k in idx)
        ids = torch.full((len(idx), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), longest), dtype=torch.long)
        for row, k in enumerate(idx):  # left padding: generation continues every row at the end
            p = data.prompts[k]
            ids[row, longest - len(p) :] = torch.tensor(p)
            mask[row, longest - len(p) :] = 1
        new_tokens = max(len(data.references[k]) for k in idx)
        with _autocast(device):
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad_id,
            )
        for row, k in enumerate(idx):
            ref = data.references[k]
            got = out[row, longest : longest + len(ref)].tolist()
            want_text = tokenizer.decode(ref, skip_special_tokens=True).strip()
            got_text = tokenizer.decode(got, skip_special_tokens=True).strip()
            correct += int(got == ref or (want_text != "" and got_text == want_text))
    return correct / len(data.prompts)


def score(model: Any, tokenizer: Any, held: HeldoutSet, device: str) -> tuple[float, float | None]:
    """Held-out loss and exact match (None where rows have no answer) of ``model``, left in eval mode."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.eval()
    return heldout_loss(model, held, pad_id, device), exact_match(model, tokenizer, held, pad_id, device)


def held_out_evaluator(
    model: Any, tokenizer: Any, examples: list[Example], max_seq_length: int, device: str, events: EventWriter
) -> Callable[[int], dict[str, float]] | None:
    """A function that scores the held-out split at a global step and records it as an ``Eval`` event.

    Loss on the supervised tokens, and exact match where rows have an answer. None without a split.
    """
    if not examples:
        return None
    held = tokenize_heldout(examples, tokenizer, max_seq_length)

    def evaluate(global_step: int) -> dict[str, float]:
        loss, accuracy = score(model, tokenizer, held, device)
        out = {"eval_loss": loss}
        if accuracy is not None:
            out["eval_exact_match"] = accuracy
        events.emit(Eval(global_step=global_step, loss=loss, accuracy=accuracy, examples=len(held.input_ids)))
        return out

    return evaluate
