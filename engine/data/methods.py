"""Which examples a training method learns from, and what it makes of a file in another method's format.

dpo and orpo learn from pairs; kto from answers judged one at a time, and takes a pair as two of them
(the chosen answer desirable, the rejected one not, as trl's ``unpair_preference_dataset``); sft learns
the answers, and takes a preference file's chosen (or desirable) answers. What a method cannot use
(supervised rows for a preference method, unpaired rows for dpo or orpo) is refused with what to give.
"""

from __future__ import annotations

from dataclasses import replace

from engine.data.formats import Example
from engine.data.preference import PREFERENCE_FORMATS, Preference
from engine.data.prompts import grpo_format_problem

PAIRED_METHODS = ("dpo", "orpo")
UNPAIRED_METHODS = ("kto",)


def format_problem(method: str, file_format: str) -> str | None:
    """Why a file of ``file_format`` cannot train ``method`` (None: it can), in words for the user."""
    if problem := grpo_format_problem(method, file_format):  # prompt rows are grpo's, and only grpo's
        return problem
    preference = file_format in PREFERENCE_FORMATS
    if (
        method in (*PAIRED_METHODS, *UNPAIRED_METHODS)
        and not preference
        and file_format not in ("unknown", "mixed")
    ):
        want = (
            "pairs of answers: rows with prompt, chosen and rejected (or chosen and rejected conversations)"
            if method in PAIRED_METHODS
            else "judged answers: rows with prompt, completion and label (true/false), or pairs (prompt, "
            "chosen, rejected)"
        )
        return f"method '{method}' learns from {want}, but the file's rows are in {file_format} format"
    if method in PAIRED_METHODS and file_format == "unpaired_preference":
        return (
            f"method '{method}' compares two answers to one prompt, but the file's rows judge one answer each "
            "(prompt, completion, label): use method 'kto' for them, or give pairs (prompt, chosen, rejected)"
        )
    return None


def examples_for_method(examples: list[Example], method: str) -> tuple[list[Example], str | None]:
    """The examples ``method`` trains on, and a note for the run's log when they were converted."""
    kinds = {ex.kind for ex in examples}
    if method == "sft" and kinds & {"preference", "unpaired"}:
        answers = [_answer_example(ex) for ex in examples]
        kept = [ex for ex in answers if ex is not None]
        what = (
            "chosen answers"
            if "preference" in kinds
            else f"desirable answers ({len(kept)} of {len(examples)})"
        )
        return kept, (
            f"a preference file given to method 'sft': it trains on the {what} (method dpo, kto or orpo tunes "
            "on the preferences)"
        )
    if method in UNPAIRED_METHODS and "preference" in kinds:
        out = [half for ex in examples for half in _unpaired(ex)]
        return out, (
            f"a paired file given to method '{method}': each pair is two judged answers (the chosen one "
            f"desirable, the rejected one undesirable): {len(out)} examples from {len(examples)} pairs"
        )
    return examples, None


def _unpaired(ex: Example) -> list[Example]:
    p = ex.preference
    if ex.kind != "preference" or p is None:
        return [ex]
    return [
        replace(ex, kind="unpaired", preference=Preference(prompt=p.prompt, completion=answer, label=good))
        for answer, good in ((p.chosen, True), (p.rejected, False))
    ]


def _answer_example(ex: Example) -> Example | None:
    """A preference example as a supervised one on its chosen (or desirable) answer; None for an undesirable one."""
    p = ex.preference
    if p is None:
        return ex
    answer = p.chosen if p.paired else p.completion
    if answer is None or (not p.paired and not p.label):
        return None
    if isinstance(p.prompt, str) and isinstance(answer, str):
        return Example(kind="completion", prompt=p.prompt, completion=answer, source=ex.source)
    prompt = p.prompt if isinstance(p.prompt, list) else [{"role": "user", "content": p.prompt}]
    turns = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
    return Example(kind="chat", messages=[*prompt, *turns], source=ex.source)
