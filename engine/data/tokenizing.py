"""Turn an ``Example`` into token ids and labels, with the loss only where the model should learn.

Takes a Hugging Face tokenizer object and never imports torch, so it can be tested (and used
for token statistics) without a model.

What gets the loss
    chat        the assistant turns only: their content and the template's end-of-turn token
                (``<|im_end|>``, ``<|eot_id|>``, ...), so the model learns to stop. Whitespace the
                template puts between turns after that token is not trained.
    completion  with a chat template: the prompt becomes a user turn and the completion the
                assistant turn, so a model trained on prompt/completion data is prompted the
                same way at inference (Ollama and llama.cpp apply the template too); loss on
                the completion and end-of-turn token. Without a chat template (a base model):
                prompt + completion as plain text, loss on the completion plus EOS. For raw
                continuation with a chat-template tokenizer, use the ``text`` format.
    text        every token, plus EOS appended so the model learns where a document ends.
    (Alpaca and ShareGPT rows arrive here as chat examples; see ``engine.data.formats``.)

How the assistant tokens are found
    The conversation is rendered with the tokenizer's OWN chat template (never a hard-coded
    ChatML). If the template marks assistant text with ``{% generation %}``, transformers'
    assistant mask is used. Otherwise each assistant turn's character span is found by
    rendering the conversation up to that turn with and without it (the first ends with the
    generation prompt, the second after the turn's end-of-turn token), and tokens are mapped
    to spans with the fast tokenizer's offset mapping (slow tokenizers: each segment is encoded
    separately). Truncation to ``max_seq_length`` keeps the start.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from engine.data.formats import Example

IGNORE_INDEX = -100  # the label that excludes a token from the loss (transformers' convention)
# Chat-template renders already made, by (conversation as JSON, generation prompt): one batch renders each
# conversation once (a preference pair's two answers share their prompt's renders).
Renders = dict[tuple[str, bool], str]
BATCH_ROWS = 2048  # examples tokenized in one call: the tokenizer's threads busy, its output bounded
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where there is no loss
    truncated: bool = False  # cut to max_seq_length
    source: str = ""

    @property
    def num_trained(self) -> int:
        """Tokens that carry loss (0 means the example teaches nothing, e.g. truncated away)."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class FormattingError(ValueError):
    """An example cannot be rendered with this tokenizer; the message says why and what to do."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(messages: list[dict[str, str]], tokenizer: Any, renders: Renders | None = None) -> str:
    """The text to generate from: the chat template with the assistant's turn opened.

    Without a chat template (a base model) the contents are joined by blank lines.
    """
    if not messages:
        raise FormattingError("no messages to render; give at least one user message")
    if not has_chat_template(tokenizer):
        return "\n\n".join(m["content"] for m in messages)
    return _render(tokenizer, messages, add_generation_prompt=True, source="prompt", renders=renders)


def tokenize_example(ex: Example, tokenizer: Any, max_seq_length: int | None) -> TokenizedExample:
    return tokenize_batch([ex], tokenizer, max_seq_length)[0]


def tokenize_batch(
    examples: list[Example], tokenizer: Any, max_seq_length: int | None, renders: Renders | None = None
) -> list[TokenizedExample]:
    """``tokenize_example`` for many examples: every text is laid out first, then a fast tokenizer encodes
    them all in one call (its own threads, one per core: most of a job's tokenizing time otherwise)."""
    renders = {} if renders is None else renders
    layouts = [_layout(ex, tokenizer, renders) for ex in examples]
    encoded: dict[int, tuple[list[int], list[int]]] = {}
    for special in (False, True):
        todo = [i for i, lay in enumerate(layouts) if lay.ids is None and lay.add_special_tokens is special]
        if todo:
            encoded.update(
                zip(todo, _encode_layouts([layouts[i] for i in todo], tokenizer, special), strict=True)
            )
    out = []
    for i, lay in enumerate(layouts):
        ids, labels = encoded.get(i, (lay.ids or [], lay.labels or []))
        if lay.eos and (eos := getattr(tokenizer, "eos_token_id", None)) is not None and ids[-1:] != [eos]:
            ids, labels = [*ids, eos], [*labels, eos]
        truncated = max_seq_length is not None and len(ids) > max_seq_length
        if truncated:
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        out.append(
            TokenizedExample(input_ids=list(ids), labels=list(labels), truncated=truncated, source=lay.source)
        )
    return out


def _encode_layouts(
    layouts: list[_Layout], tokenizer: Any, add_special_tokens: bool
) -> list[tuple[list[int], list[int]]]:
    if getattr(tokenizer, "is_fast", False):
        return _encode_fast(
            [lay.text for lay in layouts], [lay.spans for lay in layouts], tokenizer, add_special_tokens
        )
    out = []  # no offsets: piece by piece
    for lay in layouts:
        if lay.spans is None:
            ids = _encode(tokenizer, lay.text, add_special_tokens=add_special_tokens)
            out.append((ids, list(ids)))
        else:
            out.append(
                _tokenize_segments(lay.text, lay.spans, tokenizer, add_special_tokens=add_special_tokens)
            )
    return out


@dataclass
class _Layout:
    """What one example encodes and where its loss falls, before any tokenizing."""

    source: str
    text: str = ""
    spans: list[tuple[int, int]] | None = None  # characters of ``text`` with loss; None: every token
    add_special_tokens: bool = False
    eos: bool = False  # end with the tokenizer's EOS, with loss, unless the tokens already do
    ids: list[int] | None = None  # already tokenized (pre-tokenized rows, {% generation %} templates)
    labels: list[int] | None = None


def _layout(ex: Example, tokenizer: Any, renders: Renders) -> _Layout:
    if ex.kind == "tokens":  # pre-tokenized: taken as given
        if ex.input_ids is None:
            raise FormattingError(f"{ex.source}: a tokens example has no input_ids")
        ids = list(ex.input_ids)
        return _Layout(ex.source, ids=ids, labels=list(ex.labels) if ex.labels is not None else list(ids))
    if ex.kind == "text":
        if ex.text is None:
            raise FormattingError(f"{ex.source}: a text example has no text")
        return _Layout(ex.source, ex.text, add_special_tokens=True, eos=True)
    if ex.kind == "completion":
        if ex.prompt is None or ex.completion is None:
            raise FormattingError(f"{ex.source}: a completion example needs a prompt and a completion")
        if has_chat_template(tokenizer):
            messages = [
                {"role": "user", "content": ex.prompt},
                {"role": "assistant", "content": ex.completion},
            ]
            return _chat_layout(messages, tokenizer, ex.source, renders)
        text = ex.prompt + ex.completion
        return _Layout(ex.source, text, [(len(ex.prompt), len(text))], add_special_tokens=True, eos=True)
    if ex.kind == "chat":
        if not ex.messages:
            raise FormattingError(f"{ex.source}: a chat example has no messages")
        if not has_chat_template(tokenizer):
            raise FormattingError(
                f"{ex.source}: this tokenizer has no chat template, so a conversation cannot be rendered. "
                "Use an instruct/chat model, or give the data as prompt/completion or text rows."
            )
        return _chat_layout(ex.messages, tokenizer, ex.source, renders)
    raise FormattingError(f"{ex.source}: unknown example kind {ex.kind!r}")


def _render(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool,
    source: str,
    renders: Renders | None = None,
) -> str:
    if renders is None:
        return _apply_template(tokenizer, messages, add_generation_prompt, source)
    key = (json.dumps(messages, sort_keys=True), add_generation_prompt)
    if key not in renders:
        renders[key] = _apply_template(tokenizer, messages, add_generation_prompt, source)
    return renders[key]


def _apply_template(
    tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool, source: str
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja2 errors, raise_exception() in templates, ValueError
        raise FormattingError(
            f"{source}: the model's chat template refused this conversation: {e}. "
            "Some templates require strictly alternating user/assistant turns or no system message."
        ) from e
    if not isinstance(text, str):  # pragma: no cover - a batched render is never requested
        raise FormattingError(f"{source}: the chat template did not render text")
    return text


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"])


def _chat_layout(messages: list[dict[str, str]], tokenizer: Any, source: str, renders: Renders) -> _Layout:
    if isinstance(tokenizer.chat_template, str) and _GENERATION_TAG.search(tokenizer.chat_template):
        try:
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
        except Exception as e:
            raise FormattingError(
                f"{source}: the model's chat template refused this conversation: {e}"
            ) from e
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        if any(mask):
            return _Layout(
                source, ids=ids, labels=[t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
            )
        # A template whose generation block did not fire for these messages: locate by prefixes.
    full = _render(tokenizer, messages, add_generation_prompt=False, source=source, renders=renders)
    return _Layout(source, full, _assistant_spans(messages, tokenizer, full, source, renders))


def _assistant_spans(
    messages: list[dict[str, str]], tokenizer: Any, full: str, source: str, renders: Renders
) -> list[tuple[int, int]]:
    """Character spans of ``full`` that belong to assistant turns (content + end-of-turn)."""
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # (the last turn's ``through`` is ``full``: ``renders`` holds it already)
        through = _render(
            tokenizer, messages[: i + 1], add_generation_prompt=False, source=source, renders=renders
        )
        if i == 0:
            # No earlier turn to render: the turn starts where its content does.
            start = max(0, through.find(message["content"]))
        else:
            before = _render(
                tokenizer, messages[:i], add_generation_prompt=True, source=source, renders=renders
            )
            if not full.startswith(before):
                raise _prefix_error(source)
            start = len(before)
        if not full.startswith(through):
            raise _prefix_error(source)
        end = len(through)
        while end > start and full[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return spans


def _prefix_error(source: str) -> FormattingError:
    return FormattingError(
        f"{source}: this chat template renders earlier turns differently once later turns follow "
        "(for example it removes past reasoning), so the assistant tokens cannot be located. "
        "Train on single-turn conversations, or use a template that marks assistant text with "
        "{% generation %}."
    )


def _encode_fast(
    texts: list[str], spans: list[list[tuple[int, int]] | None], tokenizer: Any, add_special_tokens: bool
) -> list[tuple[list[int], list[int]]]:
    """Tokenize ``texts`` in one call; label the tokens that overlap one of their ``spans`` (None: all).

    Overlap (as transformers' own assistant mask does) rather than "starts inside": a token
    that straddles the start of an answer, like SentencePiece's "▁Paris" whose space belongs
    to the template, still carries loss. Tokens the tokenizer added itself (BOS, EOS: marked
    special, with an empty span) are not part of the text and carry none.
    """
    import numpy as np  # transformers' own dependency; only the tokenizing needs it

    enc = tokenizer(
        texts,
        add_special_tokens=add_special_tokens,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
        verbose=False,
    )
    out = []
    for ids, offsets, added, text_spans in zip(
        enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], spans, strict=True
    ):
        ids = list(ids)
        if text_spans is None:
            out.append((ids, list(ids)))
            continue
        where = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        start, end = where[:, 0], where[:, 1]
        inside = np.zeros(len(ids), dtype=bool)
        for lo, hi in text_spans:
            inside |= (start < hi) & (end > lo)
        inside &= ~(np.asarray(added, dtype=bool) & (start == end))
        labels = np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()
        out.append((ids, labels))
    return out


def _tokenize_segments(
    text: str, spans: list[tuple[int, int]], tokenizer: Any, *, add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    """For tokenizers without offsets: encode the text piece by piece at span boundaries."""
    ids: list[int] = []
    labels: list[int] = []
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_special_tokens and bos is not None and getattr(tokenizer, "add_bos_token", False):
        ids.append(bos)
        labels.append(IGNORE_INDEX)
    pos = 0
    for start, end in [*spans, (len(text), len(text))]:
        if start > pos:
            part = _encode(tokenizer, text[pos:start], add_special_tokens=False)
            ids += part
            labels += [IGNORE_INDEX] * len(part)
        if end > start:
            part = _encode(tokenizer, text[start:end], add_special_tokens=False)
            ids += part
            labels += part
        pos = max(pos, end)
    return ids, labels


@dataclass
class Tokenized:
    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped: int  # examples with no token to learn from after truncation

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    def cut_to(self, max_seq_length: int) -> Tokenized:
        """These examples as ``tokenize_all`` gives them at ``max_seq_length``, without tokenizing again:
        truncation keeps the start of each, so it is a cut (a job tokenizes once, uncut, for the length
        statistics its defaults come from, then cuts to the length they chose)."""
        kept = Tokenized([], [], self.dropped)
        for ids, labels in zip(self.input_ids, self.labels, strict=True):
            kept.add(ids[:max_seq_length], labels[:max_seq_length])
        return kept

    def add(self, input_ids: list[int], labels: list[int]) -> None:
        # an example needs at least one labelled token after the first position to teach anything
        if not any(v != IGNORE_INDEX for v in labels[1:]):
            self.dropped += 1
            return
        self.input_ids.append(input_ids)
        self.labels.append(labels)


def tokenize_all(examples: list[Example], tokenizer: Any, max_seq_length: int | None) -> Tokenized:
    out = Tokenized([], [], 0)
    for first in range(0, len(examples), BATCH_ROWS):
        for t in tokenize_batch(examples[first : first + BATCH_ROWS], tokenizer, max_seq_length):
            out.add(t.input_ids, t.labels)
    return out
