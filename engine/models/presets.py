"""Model presets, resolving a model name, and a model's shape without its weights (torch-free).

A model is named three ways: a preset (``qwen2.5-7b``, ``tiny``, ...), a local folder holding a
Hugging Face checkpoint (``config.json`` + weights), or a hub name (``Qwen/Qwen2.5-7B-Instruct``),
which goes through ``from_pretrained`` and so needs the model downloaded or the hub reachable.
Loading weights is ``engine.training.base_model``'s job.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from engine.contract.files import PathError, looks_like_path, path_kind, quoted, user_path
from engine.models import tiny
from engine.models.adapters import is_adapter_folder
from engine.models.shape import ModelShape


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Privacy: set before transformers / huggingface_hub / unsloth are imported.
# --------------------------------------------------------------------------------------------

# Each is set to "1" unless the user has set it already.
PRIVACY_ENV = (
    "HF_HUB_DISABLE_TELEMETRY",  # huggingface_hub sends no usage telemetry (it also honours DO_NOT_TRACK)
    "DO_NOT_TRACK",  # the cross-tool convention (https://donottrack.sh): no analytics
    # huggingface_hub sends a stored login token only to the gated/private repos that need it
    "HF_HUB_DISABLE_IMPLICIT_TOKEN",
    # Unsloth downloads small files from the hub at import/load time to count environments
    # (unsloth/models/_utils.py get_statistics); the variable's presence turns that off.
    "UNSLOTH_DISABLE_STATISTICS",
    "HF_HUB_DISABLE_UPDATE_CHECK",  # no update check of the `hf` CLI against PyPI
)


def privacy_environment() -> dict[str, str]:
    """Set the privacy variables (without overriding the user's own values); returns what was set.

    Call before importing transformers/huggingface_hub: the hub library reads these at import.
    ``HF_HUB_OFFLINE`` is never touched: if the user set it, models come only from local files.
    """
    set_now: dict[str, str] = {}
    for name in PRIVACY_ENV:
        if name not in os.environ:
            os.environ[name] = set_now[name] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        # Imported already (by the caller): update the flags it read at import time.
        for name in PRIVACY_ENV:
            if hasattr(hub, name) and os.environ.get(name) == "1":
                setattr(hub, name, True)
    return set_now


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A model the project knows: where it comes from and its architecture (its config.json)."""

    name: str
    hf_id: str | None  # None for the offline tiny model
    params_b: float  # billions of parameters
    shape: ModelShape
    gated: bool = False  # the hub asks users to accept a licence before downloading


def _tiny_preset() -> Preset:
    # The real vocabulary depends on the trained tokenizer (at least MIN_MODEL_VOCAB rows);
    # model_shape("tiny") reads the built config.json.
    shape = ModelShape(
        tiny.HIDDEN_SIZE, tiny.NUM_LAYERS, tiny.MIN_MODEL_VOCAB, tiny.INTERMEDIATE_SIZE, tiny.NUM_HEADS,
        tiny.NUM_KV_HEADS, max_context=tiny.MAX_POSITIONS, attention_bias=True, model_type="qwen2",
    )  # fmt: skip
    return Preset("tiny", None, round(shape.params / 1e9, 4), shape)


def _shape(
    family: str,
    hidden: int,
    layers: int,
    vocab: int,
    inter: int,
    heads: int,
    kv: int,
    *,
    ctx: int,
    tied: bool = False,
) -> ModelShape:
    """The numbers of a hub config.json (Qwen2 has q/k/v biases)."""
    return ModelShape(
        hidden, layers, vocab, inter, heads, kv, max_context=ctx, tie_word_embeddings=tied,
        attention_bias=family == "qwen2", model_type=family,
    )  # fmt: skip


# Architecture numbers are those of each model's config.json on the hub.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", 7.62,
               _shape("qwen2", 3584, 28, 152064, 18944, 28, 4, ctx=32768)),
        Preset("qwen2.5-3b", "Qwen/Qwen2.5-3B-Instruct", 3.09,
               _shape("qwen2", 2048, 36, 151936, 11008, 16, 2, ctx=32768, tied=True)),
        Preset("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", 1.54,
               _shape("qwen2", 1536, 28, 151936, 8960, 12, 2, ctx=32768, tied=True)),
        Preset("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B-Instruct", 0.49,
               _shape("qwen2", 896, 24, 151936, 4864, 14, 2, ctx=32768, tied=True)),
        Preset("llama3.2-3b", "meta-llama/Llama-3.2-3B-Instruct", 3.21,
               _shape("llama", 3072, 28, 128256, 8192, 24, 8, ctx=131072, tied=True), gated=True),
        Preset("llama3.2-1b", "meta-llama/Llama-3.2-1B-Instruct", 1.24,
               _shape("llama", 2048, 16, 128256, 8192, 32, 8, ctx=131072, tied=True), gated=True),
        Preset("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", 7.25,
               _shape("mistral", 4096, 32, 32768, 14336, 32, 8, ctx=32768)),
        _tiny_preset(),
    )
}  # fmt: skip


def get_preset(name: str) -> Preset | None:
    """The preset called ``name``, or whose hub id is ``name`` (so its shape needs no download)."""
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    return next((p for p in PRESETS.values() if p.hf_id and p.hf_id.lower() == key), None)


# --------------------------------------------------------------------------------------------
# Resolving a name
# --------------------------------------------------------------------------------------------

ModelSource = Literal["preset", "local", "hub"]


@dataclass
class ResolvedModel:
    name: str  # what the user gave
    source: ModelSource
    target: str  # what from_pretrained gets: a folder path or a hub id
    preset: Preset | None = None
    local_path: Path | None = None


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_model_folder(path: Path, name: str) -> None:
    if (path / "config.json").is_file():
        return
    if is_adapter_folder(path):
        raise ModelError(
            f"{name!r} is a LoRA adapter folder, not a base model. Give the base model it was trained on as "
            "the model (its adapter_config.json names it under base_model_name_or_path)."
        )
    raise ModelError(
        f"the folder {str(path)!r} has no config.json, so it is not a Hugging Face model folder. Give a folder "
        "saved with save_pretrained (config.json + *.safetensors + tokenizer files), a preset "
        f"({', '.join(PRESETS)}), or a hub name like Qwen/Qwen2.5-0.5B-Instruct."
    )


def resolve_model(name: str, *, build_tiny: bool = True) -> ResolvedModel:
    """Preset -> its hub id (or the tiny folder); existing folder -> that folder; else a hub name.

    ``build_tiny=False`` only checks the name (the preflight), without building the tiny model.
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelError(
            f"a model name is required (a preset: {', '.join(PRESETS)}; a local folder; or a hub name)"
        )
    name = name.strip()
    preset = get_preset(name)
    if preset is not None:
        if preset.hf_id is None:
            if not build_tiny:
                return ResolvedModel(name, "preset", name, preset=preset)
            path = tiny.ensure_tiny_model()
            return ResolvedModel(name, "preset", str(path), preset=preset, local_path=path)
        return ResolvedModel(name, "preset", preset.hf_id, preset=preset)
    try:  # by type, before anything opens it
        path = user_path(name, "model")
        kind = path_kind(path, "model")
    except PathError as exc:
        raise ModelError(str(exc)) from None
    if kind is not None:
        if kind == "file":
            hint = (
                " GGUF files are for inference (llama.cpp, Ollama); training needs the Hugging Face checkpoint."
                if path.suffix.lower() == ".gguf"
                else ""
            )
            raise ModelError(f"{name!r} is a file; a model is a folder with config.json and weights.{hint}")
        _check_model_folder(path, name)
        return ResolvedModel(name, "local", str(path.resolve()), local_path=path.resolve())
    if looks_like_path(name):
        raise ModelError(
            f"no folder {quoted(name)} on this machine (resolved to {quoted(path.resolve())}). Check the path, or give a "
            f"preset ({', '.join(PRESETS)}) or a hub name like Qwen/Qwen2.5-0.5B-Instruct."
        )
    if "/" not in name:
        close = difflib.get_close_matches(name.lower(), list(PRESETS), n=3, cutoff=0.6)
        if close:
            raise ModelError(f"unknown model {name!r}; did you mean {' or '.join(repr(c) for c in close)}?")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", name):
            raise ModelError(
                f"{name!r} is not a preset, a folder or a hub name (hub names look like owner/model)"
            )
        # A bare word can still be a legacy hub name (e.g. "gpt2").
        return ResolvedModel(name, "hub", name)
    if not _HUB_ID.match(name):
        raise ModelError(f"{name!r} is not a valid hub name (owner/model, letters, digits, '.', '_' and '-')")
    return ResolvedModel(name, "hub", name)


def _hub_error(resolved: ResolvedModel, exc: BaseException, what: str) -> ModelError:
    """Turn a from_pretrained failure on a hub name into a message that says what to do."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    name = resolved.target
    parts = [
        f"could not load the {what} of {name!r} from the Hugging Face Hub ({type(exc).__name__}: {detail})."
    ]
    text = f"{type(exc).__name__} {exc}".lower()
    gated = resolved.preset.gated if resolved.preset else False
    if "gated" in text or "401" in text or "403" in text or gated:
        parts.append(
            "The model may be gated: accept its licence on huggingface.co and log in with `hf auth login` "
            "(or set HF_TOKEN)."
        )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        parts.append("HF_HUB_OFFLINE is set, so only models already in the local cache can be used.")
    parts.append(
        f"Download it first (`hf download {name}` on a machine with internet; copy the cache or the folder here) "
        "or give a local folder with config.json and *.safetensors; the `tiny` preset works offline."
    )
    return ModelError(" ".join(parts))


def _is_hub_failure(exc: BaseException) -> bool:
    # transformers wraps connection/cache misses in OSError; huggingface_hub raises its own errors
    # (subclasses of OSError or of HfHubHTTPError/ValueError depending on the version).
    if isinstance(exc, OSError):
        return True
    mod = type(exc).__module__ or ""
    return mod.startswith("huggingface_hub") or mod.startswith("requests") or mod.startswith("httpx")


@contextmanager
def hub_errors(resolved: ResolvedModel, what: str) -> Iterator[None]:
    """Turn a ``from_pretrained`` failure on a hub name into a ModelError that says what to do."""
    try:
        yield
    except ModelError:
        raise
    except Exception as exc:
        if resolved.local_path is None and _is_hub_failure(exc):
            raise _hub_error(resolved, exc, what) from exc
        raise


# --------------------------------------------------------------------------------------------
# Shapes without weights
# --------------------------------------------------------------------------------------------


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def shape_from_config(config: dict[str, Any], where: str = "config.json") -> ModelShape:
    """A ModelShape from a config.json dict (Llama/Qwen/Mistral names, with GPT-style fallbacks)."""
    d = dict(config)
    if "text_config" in d and _first(d, "hidden_size", "n_embd", "d_model") is None:
        d = {**d, **dict(d["text_config"])}  # multimodal wrappers keep the language model here
    hidden = _first(d, "hidden_size", "n_embd", "d_model")
    layers = _first(d, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(d, "num_attention_heads", "n_head", "num_heads")
    vocab = _first(d, "vocab_size", "padded_vocab_size")
    missing = [n for n, v in (("hidden_size", hidden), ("num_hidden_layers", layers),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]  # fmt: skip
    if missing:
        raise ModelError(
            f"{where} lacks {', '.join(missing)}: cannot size this model (is it a decoder-only LLM?)"
        )
    kv = _first(d, "num_key_value_heads", "n_kv_heads", "num_kv_heads") or (
        1 if d.get("multi_query") else heads
    )
    inter = _first(d, "intermediate_size", "n_inner", "ffn_dim") or 4 * int(hidden)
    model_type = str(d.get("model_type") or "unknown")
    return ModelShape(
        hidden_size=int(hidden),
        num_layers=int(layers),
        vocab_size=int(vocab),
        intermediate_size=int(inter),
        num_heads=int(heads),
        num_kv_heads=int(kv),
        head_dim=int(d.get("head_dim") or 0),
        max_context=int(
            _first(d, "max_position_embeddings", "n_positions", "max_sequence_length", "seq_length") or 2048
        ),
        # transformers' own default is "tied", but Llama/Qwen2/Mistral configs default to untied and
        # write the key anyway; untied is also the larger (safer) memory estimate.
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
        model_type=model_type,
    )


def _safetensors_param_count(folder: Path) -> int | None:
    """Exact parameter count from the safetensors headers (no weights read); None if unusable."""
    from safetensors import safe_open  # the server imports this module: no weights library at its top

    files = sorted(folder.glob("*.safetensors"))
    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                meta = f.get_slice(name)
                if meta.get_dtype() in ("U8", "I8"):
                    return None  # already quantised: element counts are not parameter counts
                total += math.prod(meta.get_shape())
    return total or None


def model_shape(name_or_config: Any, trust_remote_code: bool = False) -> ModelShape:
    """The architecture numbers of a preset, a local folder, a hub name or a config, without weights."""
    if isinstance(name_or_config, ModelShape):
        return name_or_config
    if isinstance(name_or_config, Preset):
        name_or_config = name_or_config.name
    if isinstance(name_or_config, dict):
        return shape_from_config(name_or_config, "the config")
    if hasattr(name_or_config, "to_dict") and not isinstance(name_or_config, str):
        return shape_from_config(name_or_config.to_dict(), "the config")
    resolved = resolve_model(str(name_or_config))
    if resolved.preset is not None and resolved.local_path is None:
        return resolved.preset.shape
    if resolved.local_path is not None:
        cfg_path = resolved.local_path / "config.json"
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"cannot read {cfg_path}: {exc}") from exc
        shape = shape_from_config(cfg, str(cfg_path))
        exact = _safetensors_param_count(resolved.local_path)
        if exact:
            shape = replace(shape, params=exact)
        return shape
    privacy_environment()
    from transformers import AutoConfig  # after privacy_environment(); the server imports this module

    with hub_errors(resolved, "configuration"):
        config = AutoConfig.from_pretrained(resolved.target, trust_remote_code=trust_remote_code)
    return shape_from_config(config.to_dict(), f"the config of {resolved.target}")
