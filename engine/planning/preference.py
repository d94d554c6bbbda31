"""Smart defaults of a preference job (dpo, kto, orpo), on top of a fine-tune's (torch-free).

What differs from supervised data:
- two lengths: the prompt (``max_prompt_length``, cut from its start) and each sequence, prompt plus one
  answer (``max_seq_length``, cut from its end), each chosen from the data's token statistics;
- a row of the plan is one unit: a pair (two sequences, chosen and rejected, in the same micro-batch)
  for dpo and orpo, one judged answer for kto; units are not packed together, so ``packing`` is off and
  the memory is estimated for a micro-batch of units at their full width (a pair: twice the sequence);
- the reference model's log-probabilities are computed once, before training, without gradients, as many
  sequences per forward pass as a micro-batch has rows (engine.training.reference): that pass needs less
  memory than a training step of the same rows, so the estimate of the step is the one that counts;
- the learning rate: dpo and kto start from a trained policy and move it a little, so a tenth of the
  supervised rate; orpo learns the answers and the preference at once, at the supervised rate.
"""

from __future__ import annotations

from typing import Any

from engine.contract.spec import TrainSettings
from engine.planning.defaults import MIN_SEQ_LENGTH, ResolvedTraining, percentile, resolve_training, round_up

PAIRED = ("dpo", "orpo")


def rows_per_unit(method: str) -> int:
    """Sequences (rows of a micro-batch) per unit of the plan: two for a pair, else one."""
    return 2 if method in PAIRED else 1


MIN_ANSWER_ROOM = 16  # tokens a default prompt length leaves for the answer, at least


def sequence_lengths(
    prompt_lengths: list[int],
    sequence_lengths: list[int],
    completion_lengths: list[int],
    *,
    max_seq_length: int | None,
    max_prompt_length: int | None,
    max_context: int,
) -> tuple[int, int, dict[str, str]]:
    """(max_seq_length, max_prompt_length, their reasons) from the data's token lengths: a sequence is one
    prompt and one answer, ``prompt_lengths`` has one entry per prompt."""
    reasons: dict[str, str] = {}
    if max_seq_length is not None:
        seq, reasons["max_seq_length"] = max_seq_length, "given"
    else:
        p99 = percentile(sequence_lengths, 99)
        seq = min(max(MIN_SEQ_LENGTH, round_up(p99, 64)), max_context)
        reasons["max_seq_length"] = (
            f"per sequence (a prompt and one answer): 99th percentile {p99:.0f} tokens (longest "
            f"{max(sequence_lengths)}), rounded up to a multiple of 64"
            + (f", capped at the model's context of {max_context}" if seq == max_context else "")
        )
    if max_prompt_length is not None:
        prompt, reasons["max_prompt_length"] = max_prompt_length, "given"
    else:
        p99 = percentile(prompt_lengths, 99)
        room = max(MIN_ANSWER_ROOM, min(round(percentile(completion_lengths, 50)), seq // 2))
        prompt = max(1, min(round_up(p99, 8), seq - room))
        reasons["max_prompt_length"] = (
            f"99th percentile of prompts is {p99:.0f} tokens (longest {max(prompt_lengths)}), rounded up to a "
            f"multiple of 8"
            + (f", leaving {room} tokens of the sequence for the answer" if prompt == seq - room else "")
        )
    cut_prompts = sum(1 for n in prompt_lengths if n > prompt)
    if cut_prompts:
        reasons["max_prompt_length"] += (
            f"; {cut_prompts} of {len(prompt_lengths)} prompts are longer: their start is cut"
        )
    return seq, prompt, reasons


def resolve_preference(
    train: TrainSettings,
    method: str,
    *,
    units: int,
    max_seq_length: int,
    truncated_sequences: int,
    **estimate: Any,
) -> ResolvedTraining:
    """A fine-tune's defaults (``resolve_training``, with ``estimate``'s model, device and memory figures)
    for ``units`` pairs or judged answers of at most ``max_seq_length`` tokens per sequence."""
    per_unit = rows_per_unit(method)
    width = per_unit * max_seq_length
    planned = train.model_copy(update={"max_seq_length": width, "packing": False})
    resolved = resolve_training(planned, n_examples=units, token_lengths=[width] * units, **estimate)
    what = "pairs" if per_unit == 2 else "examples"
    reasons = dict(resolved.reasons)
    reasons["packing"] = (
        "off: each row holds one sequence; a pair's chosen and rejected answers are rows of one micro-batch"
        if per_unit == 2
        else "off: each row holds one judged answer"
    )
    reasons["micro_batch_size"] = f"{what} per micro-batch: " + reasons["micro_batch_size"].replace(
        "rows", what
    )
    reasons["gradient_accumulation"] = reasons["gradient_accumulation"].replace("rows", what)
    for name in ("steps", "epochs"):
        reasons[name] = reasons[name].replace("rows", what)
    reasons.pop("max_seq_length", None)  # the caller's (sequence_lengths) explains it
    learning_rate = resolved.learning_rate
    if train.learning_rate is None and method in ("dpo", "kto"):
        learning_rate = resolved.learning_rate / 10
        reasons["learning_rate"] = (
            f"a tenth of the supervised default ({resolved.learning_rate:g}): {method} starts from a trained "
            f"policy and moves it a little; the supervised default would be: {reasons['learning_rate']}"
        )
    return resolved.model_copy(
        update={
            "max_seq_length": max_seq_length,
            "learning_rate": learning_rate,
            "reasons": reasons,
            "truncated_examples": truncated_sequences,
        }
    )
