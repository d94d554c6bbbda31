"""Tokenizer metadata for a GGUF file: tokens, token types, merges, pre-tokenizer, special ids, template.

llama.cpp re-implements each tokenizer natively, so the GGUF must name the exact pre-tokenizer
(``tokenizer.ggml.pre``) and list tokens with llama.cpp's token types. We follow llama.cpp's own
converter's rules (which the tests check key by key against its output): byte-level BPE
vocabularies become ``gpt2`` models; ids the tokenizer does not define become ``[PAD<id>]`` of type
UNUSED; added tokens are CONTROL when special (or shaped like ``<|...|>``) else USER_DEFINED.
Merges, special token ids, add-BOS/EOS flags and the chat template come from ``gguf.SpecialVocab``.

The pre-tokenizer is recognised from the split regex in ``tokenizer.json`` (llama.cpp identifies
it by hashing a tokenisation instead; both name the same regex family).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from transformers import AutoTokenizer

# tokenizer.json Split regex -> llama.cpp pre-tokenizer name (llama-vocab.cpp implements each).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZER_BY_REGEX = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


class TokenizerExportError(ValueError):
    """The tokenizer cannot be written to GGUF; the message says why and what to do."""


@dataclass
class VocabInfo:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None
    n_tokens: int


def _split_regexes(node: Any) -> list[str]:
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [r for child in node.get("pretokenizers", []) for r in _split_regexes(child)]
    if node.get("type") == "Split":
        pattern = node.get("pattern", {})
        if isinstance(pattern, dict) and "Regex" in pattern:
            return [pattern["Regex"]]
    return []


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer")
    regexes = _split_regexes(pre)
    for regex in regexes:
        name = PRE_TOKENIZER_BY_REGEX.get(regex)
        if name:
            return name
    if (
        not regexes
        and isinstance(pre, dict)
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
    ):
        return "gpt-2"
    raise TokenizerExportError(
        "this tokenizer's pre-tokenizer is not one the GGUF exporter knows (it knows the Llama 3, Qwen2/Qwen3 "
        f"and GPT-2 byte-level BPE ones); found {json.dumps(pre)[:200]}. Convert this model with llama.cpp's "
        "convert_hf_to_gguf.py instead"
    )


def _looks_special(text: str) -> bool:
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<｜") and text.endswith("｜>")
    )


def bpe_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 of a byte-level BPE tokenizer."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise TokenizerExportError(
            f"the tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}; "
            "resize the model's embeddings to the tokenizer (model.resize_token_embeddings) before exporting"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            # llama.cpp treats added tokens as already normalised; a round trip normalises them.
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> VocabInfo:
    """Write the tokenizer of ``tokenizer_dir`` (a Hugging Face folder) into ``writer``."""
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if (tokenizer_dir / "tokenizer.model").is_file() and not tokenizer_json.is_file():
        return _add_sentencepiece(writer, tokenizer_dir, vocab_size)
    if not tokenizer_json.is_file():
        raise TokenizerExportError(
            f"{tokenizer_dir} has no tokenizer.json (or tokenizer.model); save the tokenizer next to the model"
        )
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    model_type = data.get("model", {}).get("type")
    if model_type != "BPE" or data.get("model", {}).get("byte_fallback"):
        if (tokenizer_dir / "tokenizer.model").is_file():
            return _add_sentencepiece(writer, tokenizer_dir, vocab_size)
        raise TokenizerExportError(f"tokenizer model type {model_type!r} is not supported for GGUF export")
    pre = detect_pre_tokenizer(data)

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokens, types = bpe_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True)
    _byte_level_post_processor_adds_nothing(special, data)
    special.add_to_gguf(writer, quiet=True)
    return VocabInfo(model="gpt2", pre=pre, n_tokens=len(tokens))


def _byte_level_post_processor_adds_nothing(
    special: gguf.SpecialVocab, tokenizer_json: dict[str, Any]
) -> None:
    # A ByteLevel post-processor (Qwen2's) adds no BOS/EOS. llama.cpp's converter (newer gguf-py
    # than the released package) records that explicitly, so the runtime does not fall back to its
    # own default of adding BOS.
    post = tokenizer_json.get("post_processor") or {}
    processors = post.get("processors", [post]) if isinstance(post, dict) else []
    if any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in processors):
        special.add_special_token.setdefault("bos", False)
        special.add_special_token.setdefault("eos", False)


def _add_sentencepiece(writer: gguf.GGUFWriter, tokenizer_dir: Path, vocab_size: int) -> VocabInfo:
    # Mistral v0.1-v0.3 / Llama 2 style vocabularies. Not exercised by the tests (no SentencePiece
    # model ships offline); follows gguf's SentencePieceVocab.
    try:
        vocab = gguf.SentencePieceVocab(tokenizer_dir)
    except ImportError as e:
        raise TokenizerExportError("SentencePiece tokenizers need `pip install sentencepiece`") from e
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=False, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return VocabInfo(model="llama", pre="default", n_tokens=len(tokens))
