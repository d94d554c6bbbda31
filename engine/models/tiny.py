"""The offline ``tiny`` preset: a small random-weight chat model the project builds itself.

Nothing here needs the internet. ``ensure_tiny_model()`` trains a byte-level BPE tokenizer on
a small built-in corpus (``engine/assets/tiny_corpus.txt``) with Qwen2's pre-tokenizer, gives
it a ChatML chat template in the Qwen2.5 style, and saves it next to a seeded random-weight
``Qwen2ForCausalLM`` (or ``LlamaForCausalLM``). The folder loads with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained`` like any
downloaded model, so every code path (training, merging, GGUF export) can run on a laptop CPU.

Sizes are multiples of 256 so that llama.cpp's k-quants quantize real tensors. The build is
deterministic (same corpus, same seed: same files) and takes a few seconds. It is written to a
temporary folder that is renamed into place, so a crash never leaves half a model and two
processes building at once both end up with one complete folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from engine.contract.files import backprop_home

TinyFamily = Literal["qwen2", "llama"]
FAMILIES: tuple[TinyFamily, ...] = ("qwen2", "llama")

# Bump when anything below changes what gets built: the folder name carries it, so an old
# cached build is never mistaken for a new one.
TINY_VERSION = 1
MARKER_FILE = "backprop_tiny.json"  # written last inside the build; a folder without it is incomplete

SEED = 1234
TARGET_VOCAB = 4096  # the most tokens training may produce; the small corpus supports ~1.5k
MIN_MODEL_VOCAB = 2048  # the embedding has at least this many rows (unused ids, like real checkpoints)
VOCAB_MULTIPLE = 64  # ... and a multiple of this
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 768
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITIONS = 4096

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# ChatML as Qwen2.5 writes it: an optional leading system message, then each turn as
# "<|im_start|>{role}\n{content}<|im_end|>\n". No default system prompt, so that short training
# examples stay short. Tool calls are not part of the tiny preset.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and not loop.first %}"
    "{{- raise_exception('A system message is only allowed as the first message.') }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def tiny_model_path(root: Path | None = None, family: TinyFamily = "qwen2") -> Path:
    """Where the tiny model of ``family`` lives: ``<root>/tiny-<family>-v<N>``.

    ``root`` defaults to ``backprop_home()/models``.
    """
    _check_family(family)
    base = Path(root) if root is not None else backprop_home() / "models"
    return base / f"tiny-{family}-v{TINY_VERSION}"


def is_complete(path: Path) -> bool:
    return (path / MARKER_FILE).is_file() and (path / "config.json").is_file()


def ensure_tiny_model(root: Path | None = None, family: TinyFamily = "qwen2") -> Path:
    """Return the folder of the tiny model, building it first if it is not there yet.

    ``root`` is the folder that holds the cached builds (default ``backprop_home()/models``);
    the model itself is ``<root>/tiny-<family>-v<N>``.
    """
    final = tiny_model_path(root, family)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.build-", dir=final.parent))
    try:
        _build(tmp, family)
        _publish(tmp, final)
    finally:
        # Left behind only when another process published first or the build failed.
        shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(final):
        raise RuntimeError(f"building the tiny model failed: {final} is incomplete; delete it and try again")
    return final


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished build into place; losing the race to another builder is fine."""
    if final.exists() and not is_complete(final):
        # A folder without the marker cannot come from os.rename of a finished build; it is
        # debris (e.g. copied by hand). Move it aside rather than trusting it.
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not is_complete(final):
            raise


def load_corpus() -> list[str]:
    """The built-in tokenizer corpus, one line per entry (blank lines dropped)."""
    text = resources.files("engine").joinpath("assets/tiny_corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def _corpus_lines() -> list[str]:
    """The corpus plus generated lines, so that digits, sums and chat markup get merges too."""
    lines = load_corpus()
    for a in range(0, 100, 7):
        for b in range(0, 100, 11):
            lines.append(f"What is {a} + {b}? {a + b}")
    for role in ("system", "user", "assistant"):
        lines.append(f"{IM_START}{role}\nHello.{IM_END}\n")
    return lines


def build_tokenizer(family: TinyFamily = "qwen2") -> Any:
    """Train the byte-level BPE tokenizer and wrap it as a transformers tokenizer."""
    # the tokenizer and model libraries load only when the model is built: the server imports this module
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    # Qwen2's own split pattern, taken from transformers rather than copied, so the tiny
    # tokenizer pre-tokenizes text exactly like a real Qwen2 tokenizer.
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        # Every word of the small corpus may become one token: example data then tokenizes short.
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)

    # Qwen2 checkpoints name Qwen2Tokenizer; a Llama-architecture model gets the generic
    # tokenizers-backed class (Llama's own tokenizer class means SentencePiece).
    cls = Qwen2Tokenizer if family == "qwen2" else PreTrainedTokenizerFast
    options: dict[str, Any] = {"unk_token": None, "bos_token": None}  # byte-level BPE needs neither
    hf_tok = cls(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=MAX_POSITIONS,
        padding_side="right",
        **options,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _padded_vocab(n: int) -> int:
    return max(MIN_MODEL_VOCAB, -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def build_config(family: TinyFamily, vocab_size: int, eos_id: int, pad_id: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        initializer_range=0.02,
    )
    if family == "qwen2":
        # Qwen2.5's rope base; Qwen2 has biases on q/k/v, which the architecture adds itself.
        return Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, **common)
    return LlamaConfig(
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        attention_bias=False,
        mlp_bias=False,
        rms_norm_eps=1e-5,
        **common,
    )


def _build(out: Path, family: TinyFamily) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer(family)
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = build_config(family, _padded_vocab(len(tokenizer)), eos_id, pad_id)

    # Seed a private generator state so that building never disturbs (or depends on) the
    # caller's random state, and the weights are the same on every machine.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, bos_token_id=None, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {
        "name": f"tiny-{family}",
        "version": TINY_VERSION,
        "family": family,
        "seed": SEED,
        "vocab_trained": len(tokenizer),
        "vocab_size": config.vocab_size,
        "note": "random weights; built offline by engine.models.tiny for tests and demos",
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2), encoding="utf-8")
