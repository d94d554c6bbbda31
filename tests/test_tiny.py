"""engine.models.tiny: the offline tiny model builds, loads like a downloaded one, and is cached safely."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import engine.models.tiny as tiny
from engine.models.tiny import MARKER_FILE, ensure_tiny_model, tiny_model_path


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_tiny_model_loads_with_from_pretrained(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert isinstance(model, Qwen2ForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (256, 768, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (4, 2, False)
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tok)
    assert 1000 < len(tok) <= 4096

    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert tok.eos_token_id in model.generation_config.eos_token_id

    rendered = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2 + 3?"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(rendered, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()
    # Byte-level BPE round-trips any text, including characters the corpus never saw.
    text = "Grüße, 東京! 42 + 17 = 59."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_build_is_cached(tiny_model_dir: Path) -> None:
    marker = tiny_model_dir / MARKER_FILE
    before = marker.stat().st_mtime_ns
    assert ensure_tiny_model(tiny_model_dir.parent, "qwen2") == tiny_model_dir
    assert marker.stat().st_mtime_ns == before
    # No temporary build folders are left next to the model.
    assert [p.name for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".")] == []


def test_default_location_is_under_backprop_home(_isolated_backprop_home: Path) -> None:
    assert tiny_model_path() == _isolated_backprop_home.resolve() / "models" / "tiny-qwen2-v1"
    assert tiny_model_path(family="llama").name == "tiny-llama-v1"
    with pytest.raises(ValueError, match="unknown tiny model family 'gpt2'"):
        ensure_tiny_model(family="gpt2")  # type: ignore[arg-type]


def test_build_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    again = ensure_tiny_model(tmp_path, "qwen2")
    assert again != tiny_model_dir
    assert digests(again) == digests(tiny_model_dir)


def test_llama_family(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = ensure_tiny_model(tmp_path, "llama")
    assert path.name == "tiny-llama-v1"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM) and model.config.hidden_size == 256
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_losing_a_build_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Interleave two builders deterministically: while builder A is between building and
    # publishing, builder B runs to completion. A must then discard its copy and return B's.
    real_build = tiny._build
    calls: list[Path] = []

    def build_then_let_another_builder_finish(out: Path, family: tiny.TinyFamily) -> None:
        calls.append(out)
        real_build(out, family)
        if len(calls) == 1:
            ensure_tiny_model(tmp_path, family)  # builder B publishes first

    monkeypatch.setattr(tiny, "_build", build_then_let_another_builder_finish)
    final = ensure_tiny_model(tmp_path, "qwen2")
    assert len(calls) == 2 and final == tiny_model_path(tmp_path, "qwen2")
    assert tiny.is_complete(final)
    assert os.listdir(tmp_path) == ["tiny-qwen2-v1"]  # both temporary folders are gone


def test_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    debris = tiny_model_path(tmp_path, "qwen2")
    debris.mkdir(parents=True)
    (debris / "config.json").write_text("{}", encoding="utf-8")  # no marker: not a finished build
    path = ensure_tiny_model(tmp_path, "qwen2")
    assert path == debris and tiny.is_complete(path)
