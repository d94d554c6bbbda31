"""Preference data in trl's formats: detected, validated (bad rows as file:line), converted for each
method, tokenized with the model's chat template (loss on the answers only), truncated, and the token
statistics and defaults that check-data reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.contract.spec import DatasetSettings
from engine.data.formats import inspect_dataset, load_examples
from engine.data.methods import examples_for_method, format_problem
from engine.data.preference_tokens import tokenize_preferences, truncated
from engine.data.tokenizing import IGNORE_INDEX
from engine.planning.preference import resolve_preference, sequence_lengths

USER = {"role": "user", "content": "Capital of France?"}


def _write(tmp_path: Path, rows: list[object], name: str = "prefs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_the_three_formats_are_detected_and_normalised(tmp_path: Path) -> None:
    explicit = _write(tmp_path, [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}], "a.jsonl")
    implicit = _write(
        tmp_path,
        [
            {
                "chosen": [USER, {"role": "assistant", "content": "Paris"}],
                "rejected": [USER, {"role": "assistant", "content": "Lyon"}],
            }
        ],
        "b.jsonl",
    )
    unpaired = tmp_path / "c.csv"
    unpaired.write_text("prompt,completion,label\n2+2?,4,true\n2+2?,5,False\n")
    assert [inspect_dataset(str(p)).format for p in (explicit, implicit, unpaired)] == [
        "preference", "preference_implicit", "unpaired_preference",
    ]  # fmt: skip
    (pair,), _ = load_examples(DatasetSettings(path=str(implicit)))
    assert pair.kind == "preference" and pair.preference is not None
    assert pair.preference.prompt == [USER]  # the shared leading messages
    assert pair.preference.chosen == [{"role": "assistant", "content": "Paris"}]
    judged, _ = load_examples(DatasetSettings(path=str(unpaired)))
    assert [(e.kind, e.preference.label) for e in judged if e.preference] == [
        ("unpaired", True),
        ("unpaired", False),
    ]
    # implicit texts: the common start, without the space before the answers (trl's extract_prompt)
    text, _ = load_examples(
        DatasetSettings(
            path=str(_write(tmp_path, [{"chosen": "Sky is blue", "rejected": "Sky is green"}], "d.jsonl"))
        )
    )
    assert (text[0].preference.prompt, text[0].preference.chosen) == ("Sky is", " blue")


PAIR = {"prompt": "P", "chosen": "A", "rejected": "B"}
IMPLICIT = {
    "chosen": [USER, {"role": "assistant", "content": "A"}],
    "rejected": [USER, {"role": "assistant", "content": "B"}],
}
JUDGED = {"prompt": "P", "completion": "A", "label": True}


@pytest.mark.parametrize(
    ("good", "row", "expected"),
    [
        (PAIR, {"prompt": "P", "chosen": "A"}, "missing field 'rejected'"),
        (PAIR, {"prompt": "P", "chosen": "A", "rejected": "A"}, "are the same answer"),
        (PAIR, {"prompt": "P", "chosen": "", "rejected": "B"}, "field 'chosen' is empty"),
        (
            PAIR,
            {"prompt": "P", "chosen": 3, "rejected": "B"},
            "field 'chosen' must be a text or a list of messages",
        ),
        (
            PAIR,
            {"prompt": [USER], "chosen": "A", "rejected": "B"},
            "'chosen' and 'rejected' must be messages too",
        ),
        (
            PAIR,
            {"prompt": [USER], "chosen": [USER], "rejected": [USER]},
            "'chosen' must start with the assistant's turn",
        ),
        (
            PAIR,
            {"prompt": [{"role": "tool", "content": "x"}], "chosen": "A", "rejected": "B"},
            "tool-calling turns",
        ),
        (
            IMPLICIT,
            {"chosen": IMPLICIT["chosen"], "rejected": [{"role": "user", "content": "x"}]},
            "share no leading messages",
        ),
        (
            IMPLICIT,
            {"chosen": IMPLICIT["chosen"], "rejected": IMPLICIT["chosen"]},
            "the two answers must differ",
        ),
        (JUDGED, {"prompt": "P", "completion": "A", "label": "maybe"}, "field 'label' must be true or false"),
    ],
)
def test_each_bad_preference_row_is_named_with_file_and_line(
    tmp_path: Path, good: dict[str, object], row: object, expected: str
) -> None:
    report = inspect_dataset(str(_write(tmp_path, [good, row, good])))  # the good rows fix the format
    assert report.bad_rows == 1 and report.rows_ok == 2
    (problem,) = report.problems
    assert str(problem).startswith("prefs.jsonl:2: ") and expected in problem.message, problem


def test_each_method_takes_what_it_can_and_says_so(tmp_path: Path) -> None:
    pairs = _write(tmp_path, [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}] * 2, "pairs.jsonl")
    examples, _ = load_examples(DatasetSettings(path=str(pairs)))
    unpaired, note = examples_for_method(examples, "kto")
    assert [e.preference.label for e in unpaired if e.preference] == [True, False, True, False]
    assert note is not None and "each pair is two judged answers" in note
    sft, note = examples_for_method(examples, "sft")
    assert [(e.kind, e.completion) for e in sft] == [("completion", "4"), ("completion", "4")]
    assert note is not None and "trains on the chosen answers" in note
    assert examples_for_method(examples, "dpo") == (examples, None)
    assert format_problem("dpo", "chat") is not None and "pairs of answers" in str(
        format_problem("dpo", "chat")
    )
    assert "use method 'kto'" in str(format_problem("orpo", "unpaired_preference"))
    assert format_problem("kto", "preference") is None and format_problem("sft", "preference") is None


def test_tokenized_with_the_chat_template_loss_on_the_answers_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    tok = _tokenizer(tiny_model_dir)
    earlier = [USER, {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Spain?"}]
    path = _write(
        tmp_path,
        [
            {"prompt": "What is 2+2?", "chosen": "4", "rejected": "five"},
            {
                "prompt": earlier,
                "chosen": [{"role": "assistant", "content": "Madrid"}],
                "rejected": [{"role": "assistant", "content": "Paris"}],
            },
        ],
    )
    examples, _ = load_examples(DatasetSettings(path=str(path)))
    data = tokenize_preferences(examples, tok)
    assert data.units == [[0, 1], [2, 3]] and data.paired
    answers = [tok.decode([t for t in labels if t != IGNORE_INDEX]) for labels in data.labels]
    # the answer and the end of its turn; the prompt's own assistant turn ("Paris") is context
    assert answers == ["4<|im_end|>", "five<|im_end|>", "Madrid<|im_end|>", "Paris<|im_end|>"]
    prompt = tok.decode(data.input_ids[0][: data.prompt_lengths[0]])
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert all(v == IGNORE_INDEX for v in data.labels[2][: data.prompt_lengths[2]])
    cut = truncated(data, max_prompt_length=4, max_seq_length=7)
    assert cut.prompt_lengths == [4, 4, 4, 4] and max(cut.sequence_lengths()) == 7
    assert cut.input_ids[0][:4] == data.input_ids[0][data.prompt_lengths[0] - 4 : data.prompt_lengths[0]]
    assert truncated(data, max_prompt_length=4, max_seq_length=4).dropped == 2  # no answer token left


def test_a_pair_renders_its_prompt_once(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Three chat-template renders a pair (each answer's whole conversation, and the prompt with the
    assistant's turn opened, which both answers' spans and the prompt's length share), where rendering
    each sequence on its own made six; the tokens are those of each pair alone."""
    tok = _tokenizer(tiny_model_dir)
    path = _write(
        tmp_path, [{"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": "no"} for i in range(5)]
    )
    examples, _ = load_examples(DatasetSettings(path=str(path)))
    calls = []
    render = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: calls.append(k) or render(*a, **k))
    together = tokenize_preferences(examples, tok)
    assert len(calls) == 3 * len(examples)
    for i, ex in enumerate(examples):  # the same sequences as each pair tokenized alone
        alone = tokenize_preferences([ex], tok)
        pair = together.units[i]
        assert [together.input_ids[s] for s in pair] == alone.input_ids
        assert [together.labels[s] for s in pair] == alone.labels
        assert [together.prompt_lengths[s] for s in pair] == alone.prompt_lengths


def test_the_defaults_choose_both_lengths_and_count_a_pair_as_two_sequences() -> None:
    from engine.contract.spec import TrainSettings
    from engine.models.presets import get_preset
    from engine.planning.defaults import resolve_training
    from engine.planning.memory import estimate_memory

    shape = get_preset("qwen2.5-0.5b").shape  # type: ignore[union-attr]
    seq, prompt, reasons = sequence_lengths(
        [250] * 99 + [900],
        [300] * 200,
        [200] * 200,
        max_seq_length=None,
        max_prompt_length=None,
        max_context=32768,
    )
    assert seq == 320 and "99th percentile" in reasons["max_seq_length"]
    # p99 of the prompts would be 264 tokens: capped so that half the sequence stays for the answer
    assert prompt == 160 and "leaving 160 tokens" in reasons["max_prompt_length"]
    assert "100 of 100 prompts are longer" in reasons["max_prompt_length"]
    fit = dict(shape=shape, quantization="4bit", lora_rank=16, device="cuda", free_memory_gib=4.0)
    dpo = resolve_preference(
        TrainSettings(), "dpo", units=100, max_seq_length=512, truncated_sequences=3, **fit
    )
    sft = resolve_training(TrainSettings(), n_examples=100, token_lengths=[512] * 100, **fit)
    assert dpo.max_seq_length == 512 and not dpo.packing and dpo.truncated_examples == 3
    assert dpo.memory is not None and dpo.memory.total_gib == pytest.approx(
        estimate_memory(
            shape,
            "4bit",
            16,
            2 * dpo.micro_batch_size,
            512,
            gradient_checkpointing=dpo.gradient_checkpointing,
        ).total_gib,
        rel=0.02,
    )
    assert (
        dpo.learning_rate == pytest.approx(sft.learning_rate / 10)
        and "a tenth" in dpo.reasons["learning_rate"]
    )
    assert dpo.reasons["micro_batch_size"].startswith("pairs per micro-batch")


def test_check_data_and_the_preflight_know_the_preference_formats(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from engine.contract.spec import FinetuneSpec
    from engine.jobs.commands import check_data
    from engine.planning.preflight import PreflightError, preflight

    def spec(path: Path, **settings: object) -> FinetuneSpec:
        return FinetuneSpec(model=str(tiny_model_dir), dataset=DatasetSettings(path=str(path)), **settings)  # type: ignore[arg-type]

    pairs = _write(
        tmp_path, [{"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": "7"} for i in range(8)]
    )
    out = check_data(spec(pairs, method="dpo"))
    assert out.ready and out.method == "dpo" and out.defaults is not None and out.reasons is not None
    assert out.prompt_tokens is not None and out.completion_tokens is not None and out.tokens is not None
    assert out.tokens.examples == 16 and out.prompt_tokens.examples == 8  # two sequences a pair, one prompt
    assert (
        out.defaults["max_prompt_length"] >= out.prompt_tokens.max
        and "prompts" in out.reasons["max_prompt_length"]
    )
    kto = check_data(spec(pairs, method="kto"))
    assert kto.method_note is not None and "16 examples from 8 pairs" in kto.method_note
    chat = _write(tmp_path, [{"messages": [USER, {"role": "assistant", "content": "Paris"}]}], "chat.jsonl")
    refused = check_data(spec(chat, method="dpo"))
    assert not refused.ready and "pairs of answers" in str(refused.method_problem)
    with pytest.raises(PreflightError, match="method 'dpo' learns from pairs of answers"):
        preflight(
            FinetuneSpec(model=str(tiny_model_dir), method="dpo", dataset=DatasetSettings(path=str(chat))),
            "tool",
        )
    with pytest.raises(PreflightError, match="init_adapter: .* is neither a PEFT adapter folder"):
        preflight(
            FinetuneSpec(
                model=str(tiny_model_dir),
                method="dpo",
                init_adapter=str(tmp_path),
                dataset=DatasetSettings(path=str(pairs)),
            ),
            "tool",
        )
