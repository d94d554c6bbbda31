"""Preference examples as token sequences: one sequence per prompt and answer, the loss on the answer only.

Each answer is rendered after its prompt with the model's own chat template (``engine.data.tokenizing``,
as supervised data is, so a model tuned with sft and then dpo sees one format): a plain-text prompt
becomes the user's turn and a plain-text answer the assistant's; message lists are used as given.
The prompt ends where the prompt rendered alone (with the assistant's turn opened) stops matching the
whole sequence, as trl finds it (``common_prefix_length``). Without a chat template (a base model)
the texts are joined and the answer ends with EOS, as trl does.

Sequences are grouped into *units*, what one row of the training plan holds: a pair (chosen, then
rejected) for dpo and orpo, one judged answer for kto. ``truncated`` cuts a long prompt from its start
(the end, nearest the answer, is kept) and then a long sequence from its end; a unit whose answer has
no token left is dropped. Torch-free: the token statistics of ``check-data`` use it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.data.formats import Example
from engine.data.preference import Text
from engine.data.tokenizing import (
    BATCH_ROWS,
    IGNORE_INDEX,
    FormattingError,
    Renders,
    has_chat_template,
    render_prompt,
    tokenize_batch,
)


@dataclass
class PreferenceTokens:
    input_ids: list[list[int]]  # every sequence: a prompt and one answer
    labels: list[list[int]]  # IGNORE_INDEX on the prompt
    prompt_lengths: list[int]  # per sequence: its prompt's tokens
    units: list[list[int]]  # per unit: its sequences (a pair: chosen, rejected; unpaired: one)
    desirable: list[bool] = field(default_factory=list)  # per unit, for unpaired data
    sources: list[str] = field(default_factory=list)  # per unit: "file.jsonl:12"
    dropped: int = 0  # units left out: no answer token within the lengths
    truncated: int = 0  # sequences cut

    @property
    def paired(self) -> bool:
        return bool(self.units) and len(self.units[0]) == 2

    @property
    def lengths(self) -> list[int]:
        """Tokens per unit (what the training plan counts)."""
        return [sum(len(self.input_ids[s]) for s in unit) for unit in self.units]

    def prompt_token_lengths(self) -> list[int]:
        """One prompt length per unit."""
        return [self.prompt_lengths[unit[0]] for unit in self.units]

    def sequence_lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    def completion_lengths(self) -> list[int]:
        return [len(ids) - p for ids, p in zip(self.input_ids, self.prompt_lengths, strict=True)]


def tokenize_preferences(examples: list[Example], tokenizer: Any) -> PreferenceTokens:
    """Every example's sequences, whole (``truncated`` applies the lengths), tokenized in batches."""
    out = PreferenceTokens([], [], [], [])
    pieces: list[tuple[Text, Text, str]] = []  # (prompt, answer, source) of every sequence, in order
    for ex in examples:
        p = ex.preference
        if p is None:
            raise FormattingError(f"{ex.source}: not a preference example ({ex.kind})")
        answers = [p.chosen, p.rejected] if p.paired else [p.completion]
        out.units.append(list(range(len(pieces), len(pieces) + len(answers))))
        for answer in answers:
            assert answer is not None  # a pair has both answers, an unpaired row its completion
            pieces.append((p.prompt, answer, ex.source))
        out.sources.append(ex.source)
        if not p.paired:
            out.desirable.append(bool(p.label))
    for first in range(0, len(pieces), BATCH_ROWS):
        for ids, labels, prompt_len in _sequences(pieces[first : first + BATCH_ROWS], tokenizer):
            out.input_ids.append(ids)
            out.labels.append(labels)
            out.prompt_lengths.append(prompt_len)
    return out


def truncated(tokens: PreferenceTokens, max_prompt_length: int, max_seq_length: int) -> PreferenceTokens:
    """The same data with each prompt at most ``max_prompt_length`` tokens (its end kept) and each sequence at
    most ``max_seq_length`` (its start kept); units whose answer lost every token are dropped."""
    out = PreferenceTokens([], [], [], [], dropped=tokens.dropped)
    for u, unit in enumerate(tokens.units):
        seqs = []
        for s in unit:
            ids, labels, p = tokens.input_ids[s], tokens.labels[s], tokens.prompt_lengths[s]
            cut = max(0, p - max_prompt_length)
            ids, labels, p = ids[cut:], labels[cut:], p - cut
            if len(ids) > max_seq_length:
                ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            seqs.append((ids, labels, p, cut > 0 or len(ids) < len(tokens.input_ids[s]) - cut))
        # a sequence needs an answer token after its first position to be scored
        if any(not any(v != IGNORE_INDEX for v in labels[1:]) for _, labels, _, _ in seqs):
            out.dropped += 1
            continue
        out.units.append([])
        for ids, labels, p, was_cut in seqs:
            out.units[-1].append(len(out.input_ids))
            out.input_ids.append(ids)
            out.labels.append(labels)
            out.prompt_lengths.append(p)
            out.truncated += int(was_cut)
        out.sources.append(tokens.sources[u])
        if tokens.desirable:
            out.desirable.append(tokens.desirable[u])
    return out


def _sequences(
    pieces: list[tuple[Text, Text, str]], tokenizer: Any
) -> list[tuple[list[int], list[int], int]]:
    """(ids, labels, prompt length) of each (prompt, answer, source)."""
    if not has_chat_template(tokenizer):
        plain = []
        for prompt, answer, source in pieces:
            if not (isinstance(prompt, str) and isinstance(answer, str)):
                raise FormattingError(
                    f"{source}: this tokenizer has no chat template, so messages cannot be rendered. Use an "
                    "instruct/chat model, or give the prompt and answers as plain text."
                )
            plain.append(Example(kind="completion", prompt=prompt, completion=answer, source=source))
        return [
            (
                t.input_ids,
                t.labels,
                next((i for i, v in enumerate(t.labels) if v != IGNORE_INDEX), len(t.labels)),
            )
            for t in tokenize_batch(plain, tokenizer, None)
        ]
    turns = [
        prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        for prompt, _, _ in pieces
    ]
    chats = [
        Example(
            kind="chat",
            messages=[*t, *(a if isinstance(a, list) else [{"role": "assistant", "content": a}])],
            source=src,
        )
        for t, (_, a, src) in zip(turns, pieces, strict=True)
    ]
    renders: Renders = {}  # a pair's answers share their prompt's renders, and the prompt alone is one of them
    tokenized = tokenize_batch(chats, tokenizer, None, renders)
    prompts = [render_prompt(t, tokenizer, renders) for t in turns]
    alone = tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for t, prompt_ids in zip(tokenized, alone, strict=True):
        n = 0
        while n < min(len(prompt_ids), len(t.input_ids)) and prompt_ids[n] == t.input_ids[n]:
            n += 1
        # assistant turns inside the prompt are context here, not answers to learn
        out.append((t.input_ids, [IGNORE_INDEX] * n + t.labels[n:], n))
    return out
