"""engine.data.tokenizing: loss masks checked by decoding exactly the tokens that carry loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.contract.spec import DatasetSettings
from engine.data.formats import Example, load_examples
from engine.data.tokenizing import (
    IGNORE_INDEX,
    FormattingError,
    render_prompt,
    tokenize_all,
    tokenize_batch,
    tokenize_example,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 17 + 25?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Reverse the word: apple"},
    {"role": "assistant", "content": "elppa"},
]

# A template in Llama 3's style, to show that nothing assumes ChatML (its markers are plain text
# for the tiny tokenizer, which makes token boundaries harder, not easier).
HEADER_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# The same ChatML the tiny model uses, with assistant text marked for transformers' own mask.
GENERATION_TEMPLATE = (  # transformers renders with trim_blocks: newlines go in {{ }} expressions
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)  # fresh per test: some tests change its template


def trained_runs(tok: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each maximal run of tokens that carry loss."""
    runs: list[str] = []
    current: list[int] = []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # a trained position predicts its own token (HF shifts inside)
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def chat(messages: list[dict[str, str]]) -> Example:
    return Example(kind="chat", messages=messages, source="test.jsonl:1")


def test_chat_trains_assistant_turns_and_their_end_of_turn_only(tokenizer: Any) -> None:
    te = tokenize_example(chat(CONVERSATION), tokenizer, None)
    assert trained_runs(tokenizer, te.input_ids, te.labels) == ["42<|im_end|>", "elppa<|im_end|>"]
    # The ids are exactly what the template gives when transformers tokenizes it itself.
    assert te.input_ids == list(tokenizer.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"])
    assert not te.truncated and te.num_trained == sum(1 for x in te.labels if x != IGNORE_INDEX)


def test_every_example_file_masks_exactly_the_assistant_text(tokenizer: Any) -> None:
    for name in ("chat", "sharegpt", "alpaca"):
        examples, _ = load_examples(DatasetSettings(path=str(EXAMPLES / f"{name}.jsonl")))
        for ex, te in zip(examples, [tokenize_example(ex, tokenizer, None) for ex in examples], strict=True):
            expected = [m["content"] + "<|im_end|>" for m in ex.messages or [] if m["role"] == "assistant"]
            assert trained_runs(tokenizer, te.input_ids, te.labels) == expected, ex.source


def test_a_batch_tokenizes_every_example_as_it_would_alone(tokenizer: Any) -> None:
    """A job encodes its examples in one tokenizer call; a mixed batch (every kind, both with and
    without the tokenizer's own special tokens, a pre-tokenized row) gives each example what it gets alone,
    for a fast tokenizer and one without offsets."""
    examples = []
    for name in ("chat", "prompt_completion", "text", "sharegpt"):
        examples += load_examples(DatasetSettings(path=str(EXAMPLES / f"{name}.jsonl")))[0][:5]
    examples.append(Example(kind="tokens", input_ids=[5, 6, 7, 8], labels=[-100, 6, 7, 8], source="t:1"))
    for tok in (tokenizer, _NoOffsets(tokenizer)):
        for length in (None, 24):
            batch = tokenize_batch(examples, tok, length)
            assert batch == [tokenize_batch([ex], tok, length)[0] for ex in examples]
    assert {ex.kind for ex in examples} == {"chat", "completion", "text", "tokens"}
    assert len(batch) == len(examples) and any(t.truncated for t in batch)


def test_completion_uses_the_chat_template(tokenizer: Any) -> None:
    ex = Example(kind="completion", prompt="What is the capital of France?", completion="Paris", source="p:1")
    te = tokenize_example(ex, tokenizer, None)
    assert tokenizer.decode(te.input_ids) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis<|im_end|>\n"
    )
    assert trained_runs(tokenizer, te.input_ids, te.labels) == ["Paris<|im_end|>"]


def test_completion_without_a_chat_template_is_plain_text_plus_eos(tokenizer: Any) -> None:
    tokenizer.chat_template = None
    ex = Example(kind="completion", prompt="Capital of France:", completion=" Paris", source="p:1")
    te = tokenize_example(ex, tokenizer, None)
    assert tokenizer.decode(te.input_ids) == "Capital of France: Paris<|im_end|>"
    assert trained_runs(tokenizer, te.input_ids, te.labels) == [" Paris<|im_end|>"]


def test_text_trains_everything_and_ends_with_eos(tokenizer: Any) -> None:
    te = tokenize_example(
        Example(kind="text", text="The capital of Peru is Lima.", source="t:1"), tokenizer, None
    )
    assert te.labels == te.input_ids
    assert te.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(te.input_ids) == "The capital of Peru is Lima.<|im_end|>"


def test_truncation_keeps_the_start(tokenizer: Any) -> None:
    full = tokenize_example(chat(CONVERSATION), tokenizer, None)
    cut = tokenize_example(chat(CONVERSATION), tokenizer, 16)
    assert cut.truncated and len(cut.input_ids) == 16
    assert cut.input_ids == full.input_ids[:16] and cut.labels == full.labels[:16]
    assert cut.num_trained == 0  # only the system and user turns fit: the caller can warn or drop it


def test_a_job_cuts_its_tokenized_examples_instead_of_tokenizing_them_again(tokenizer: Any) -> None:
    """prepare_training tokenizes once, uncut (for the defaults' length statistics), then cuts to the
    chosen max_seq_length: the same examples, labels and drop count as tokenizing at that length."""
    examples = []
    for name in ("chat", "sharegpt", "alpaca"):
        examples += load_examples(DatasetSettings(path=str(EXAMPLES / f"{name}.jsonl")))[0]
    full = tokenize_all(examples, tokenizer, None)
    for length in (8, 24, 64, 4096):
        cut, direct = full.cut_to(length), tokenize_all(examples, tokenizer, length)
        assert (cut.input_ids, cut.labels, cut.dropped) == (direct.input_ids, direct.labels, direct.dropped)
    assert full.cut_to(8).dropped > 0 and full.cut_to(4096).dropped == full.dropped  # short cuts drop some


def test_other_template_markup_is_followed(tokenizer: Any) -> None:
    tokenizer.chat_template = HEADER_TEMPLATE
    te = tokenize_example(chat(CONVERSATION), tokenizer, None)
    assert trained_runs(tokenizer, te.input_ids, te.labels) == ["42<|eot_id|>", "elppa<|eot_id|>"]


def test_generation_tags_use_transformers_mask_with_the_same_result(tokenizer: Any) -> None:
    by_prefix = tokenize_example(chat(CONVERSATION), tokenizer, None)
    tokenizer.chat_template = GENERATION_TEMPLATE
    by_tags = tokenize_example(chat(CONVERSATION), tokenizer, None)
    assert trained_runs(tokenizer, by_tags.input_ids, by_tags.labels) == ["42<|im_end|>", "elppa<|im_end|>"]
    assert by_tags.input_ids == by_prefix.input_ids and by_tags.labels == by_prefix.labels


class _NoOffsets:
    """The real tokenizer, seen as one without offset mappings (like a slow/SentencePiece one)."""

    is_fast = False

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, text: str, **kwargs: Any) -> Any:
        assert "return_offsets_mapping" not in kwargs
        return self._inner(text, **kwargs)


def test_tokenizers_without_offsets_get_the_same_labels(tokenizer: Any) -> None:
    te = tokenize_example(chat(CONVERSATION), _NoOffsets(tokenizer), None)
    assert trained_runs(tokenizer, te.input_ids, te.labels) == ["42<|im_end|>", "elppa<|im_end|>"]
    tokenizer.chat_template = None
    pc = Example(kind="completion", prompt="Capital of France:", completion=" Paris", source="p:1")
    te = tokenize_example(pc, _NoOffsets(tokenizer), None)
    assert trained_runs(tokenizer, te.input_ids, te.labels) == [" Paris<|im_end|>"]


def test_conversation_opening_with_the_assistant(tokenizer: Any) -> None:
    messages = [
        {"role": "assistant", "content": "Hello! Ask me anything."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
    ]
    te = tokenize_example(chat(messages), tokenizer, None)
    assert trained_runs(tokenizer, te.input_ids, te.labels) == [
        "Hello! Ask me anything.<|im_end|>",
        "5<|im_end|>",
    ]


def test_render_prompt_opens_the_assistant_turn(tokenizer: Any) -> None:
    text = render_prompt([{"role": "user", "content": "What is 2 + 3?"}], tokenizer)
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    tokenizer.chat_template = None
    assert (
        render_prompt([{"role": "user", "content": "Continue: once upon"}], tokenizer)
        == "Continue: once upon"
    )


def test_template_errors_and_missing_templates_are_explained(tokenizer: Any) -> None:
    late_system = [
        {"role": "user", "content": "Q"},
        {"role": "system", "content": "S"},
        {"role": "assistant", "content": "A"},
    ]
    with pytest.raises(FormattingError, match=r"test\.jsonl:1: the model's chat template refused"):
        tokenize_example(chat(late_system), tokenizer, None)
    tokenizer.chat_template = None
    with pytest.raises(FormattingError, match="has no chat template"):
        tokenize_example(chat(CONVERSATION), tokenizer, None)


def test_a_token_straddling_the_start_of_the_answer_is_trained(tokenizer: Any) -> None:
    # The generation prompt ends with a space that the tokenizer glues to the answer's first
    # word (" Paris"): that token is what the model must produce, so it carries loss.
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]
    te = tokenize_example(chat(messages), tokenizer, None)
    assert " Paris" in [tokenizer.decode([i]) for i in te.input_ids]
    assert trained_runs(tokenizer, te.input_ids, te.labels) == [" Paris<|im_end|>"]
