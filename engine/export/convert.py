"""Hugging Face checkpoint (+ optional LoRA merged on the fly) -> GGUF, on ``gguf.GGUFWriter``.

Why our own converter instead of llama.cpp's ``convert_hf_to_gguf.py``: that script is not part of
any installable package (it lives in llama.cpp's source tree, and ``pip install llama-cpp-python``
does not install it), it needs a merged Hugging Face folder on disk (a full extra write and read
of the model), and it pins its own copy of ``gguf``. Ours streams tensor by tensor: the headers of
the safetensors shards give every name, shape and dtype up front, the GGUF header is written
from them, and then each tensor is read (memory-mapped), merged with its LoRA delta, re-laid out
and written before the next is touched, so peak memory is about one tensor, not one model. It
covers the families the presets use (Llama, Mistral, Qwen2, Qwen3) and follows llama.cpp's
converter rule for rule (the tests compare both outputs tensor by tensor and key by key).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch
from safetensors import safe_open

from engine.export.merge import LoraMerger
from engine.export.vocab import VocabInfo, add_tokenizer

OutType = Literal["f32", "f16", "bf16"]


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class ArchSpec:
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's LLAMA arch uses interleaved RoPE: HF q/k rows are re-ordered


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": ArchSpec(gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": ArchSpec(gguf.MODEL_ARCH.QWEN3, False),
}

_OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
}
_SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass
class SourceTensor:
    file: Path | None  # None: generated (rope factors) or derived from another tensor
    hf_name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16"


_READABLE_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32")


def read_tensor(src: SourceTensor) -> torch.Tensor:
    """Read one tensor, opening its file for that tensor alone.

    The file is memory-mapped only while the tensor is read: a mapping kept open over a 15 GB
    checkpoint would count every page read so far towards the process's resident memory, while
    one per tensor keeps the peak at about one tensor.
    """
    assert src.file is not None
    if src.dtype not in _READABLE_DTYPES:
        raise ConversionError(
            f"tensor {src.hf_name} has dtype {src.dtype}, which the GGUF exporter does not read"
        )
    with safe_open(str(src.file), framework="pt") as f:
        return f.get_tensor(src.hf_name)


@dataclass
class PlannedTensor:
    gguf_name: str
    source: SourceTensor
    qtype: gguf.GGMLQuantizationType
    shape: tuple[int, ...]


@dataclass
class ConvertResult:
    path: Path
    arch: str
    outtype: str
    n_tensors: int
    n_params: int
    vocab: VocabInfo
    merged_tensors: int = 0
    notes: list[str] = field(default_factory=list)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ConversionError(f"{model_dir} has no config.json: it is not a Hugging Face model folder")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def arch_of(config: dict[str, Any]) -> tuple[str, ArchSpec]:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    raise ConversionError(
        f"architecture {names or config.get('model_type')} is not supported by the GGUF exporter "
        f"(supported: {', '.join(sorted(ARCHITECTURES))}); llama.cpp's convert_hf_to_gguf.py may convert it"
    )


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either config layout (transformers 5 ``rope_parameters`` or 4.x keys)."""
    params = dict(config.get("rope_parameters") or {})
    params = dict(params.get("full_attention", params))
    legacy = config.get("rope_scaling") or {}
    for k, v in legacy.items():
        params.setdefault(k, v)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params and config.get("rope_theta") is not None:
        params["rope_theta"] = config["rope_theta"]
    return params


def default_outtype(config: dict[str, Any]) -> OutType:
    """The lossless 16/32-bit type for this checkpoint: its own dtype."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")  # type: ignore[return-value]


def index_checkpoint(model_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor's file, shape and dtype from the safetensors headers (no tensor data is read)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if any(model_dir.glob("*.bin")):
            raise ConversionError(
                f"{model_dir} holds PyTorch .bin weights; re-save it with safe_serialization=True (safetensors)"
            )
        raise ConversionError(f"{model_dir} has no .safetensors weights")
    index: dict[str, SourceTensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    meta = f.get_slice(name)
                    index[name] = SourceTensor(file, name, tuple(meta.get_shape()), meta.get_dtype())
        except Exception as exc:  # safetensors raises its own error type for a damaged header
            raise ConversionError(f"{file} is not a readable safetensors file ({exc})") from exc
    return index


def permute_for_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rotary layout -> llama.cpp's interleaved pairs (rows of q/k projections)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Per-frequency scaling of Llama 3.1-style RoPE, stored as the ``rope_freqs`` tensor."""
    base = float(params.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = float(params.get("factor", 8.0))
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params.get("original_max_position_embeddings", 8192))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def head_dim_of(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def add_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], spec: ArchSpec, ftype: int) -> None:
    """Model hyperparameters, named and chosen as llama.cpp's converter writes them."""
    writer.add_block_count(int(config["num_hidden_layers"]))
    if config.get("max_position_embeddings") is not None:
        writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    rope = rope_parameters(config)
    rope_type = str(rope.get("rope_type") or "default").lower()
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", "llama3"):
        raise ConversionError(f"RoPE scaling type {rope_type!r} is not supported by the GGUF exporter")
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    if config.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if config.get("head_dim") is not None:
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    writer.add_file_type(ftype)
    if spec.arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(int(config["vocab_size"]))
        writer.add_rope_dimension_count(head_dim_of(config))


def plan_tensors(
    index: dict[str, SourceTensor],
    config: dict[str, Any],
    spec: ArchSpec,
    qtype: gguf.GGMLQuantizationType,
    merger: LoraMerger | None,
) -> list[PlannedTensor]:
    n_layers = int(config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(spec.arch, n_layers)
    sources = [s for s in index.values() if not s.hf_name.endswith(_SKIP_SUFFIXES)]
    if merger is not None and "lm_head.weight" in merger.target_names and "lm_head.weight" not in index:
        # A tied model whose adapter changes lm_head: the output matrix is no longer the embedding.
        embed = index["model.embed_tokens.weight"]
        sources.append(SourceTensor(None, "lm_head.weight", embed.shape, embed.dtype))
    rope = rope_parameters(config)
    if spec.arch == gguf.MODEL_ARCH.LLAMA and str(rope.get("rope_type", "")).lower() == "llama3":
        sources.insert(0, SourceTensor(None, "rope_freqs", (head_dim_of(config) // 2,), "F32"))
    plan: list[PlannedTensor] = []
    for src in sources:
        if src.hf_name == "rope_freqs":
            gguf_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        else:
            mapped = name_map.get_name(src.hf_name, try_suffixes=(".weight", ".bias"))
            if mapped is None:
                raise ConversionError(
                    f"tensor {src.hf_name} has no GGUF name for {spec.arch.name}; unsupported model"
                )
            gguf_name = mapped
        # llama.cpp keeps 1-D tensors and norms in F32 (its kernels expect it).
        t = (
            gguf.GGMLQuantizationType.F32
            if len(src.shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
            else qtype
        )
        plan.append(PlannedTensor(gguf_name, src, t, src.shape))
    return plan


def _to_numpy(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return t.to(torch.float16).contiguous().numpy()
    # BF16 bytes as uint16 (torch rounds to nearest even, as ggml does)
    return t.to(torch.bfloat16).contiguous().view(torch.uint16).numpy()


_NP_DTYPE: dict[Any, np.dtype[Any]] = {
    gguf.GGMLQuantizationType.F32: np.dtype(np.float32),
    gguf.GGMLQuantizationType.F16: np.dtype(np.float16),
    gguf.GGMLQuantizationType.BF16: np.dtype(np.uint16),
}


def convert_to_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    *,
    outtype: OutType | None = None,
    merger: LoraMerger | None = None,
    tokenizer_dir: str | Path | None = None,
    name: str | None = None,
    on_tensor: Callable[[int, int, str], None] | None = None,
) -> ConvertResult:
    """Write ``model_dir`` (safetensors + config + tokenizer), with ``merger``'s LoRA merged in, as GGUF.

    ``outtype`` defaults to the checkpoint's own dtype. ``on_tensor(i, n, name)`` reports progress.
    The file is written to a temporary name and renamed at the end, so a crash leaves no
    half-written GGUF behind under the final name.
    """
    model_dir = Path(model_dir)
    out_path = Path(out_path)
    config = read_config(model_dir)
    _, spec = arch_of(config)
    outtype = outtype or default_outtype(config)
    if outtype not in _OUTTYPES:
        raise ConversionError(f"outtype must be one of {sorted(_OUTTYPES)}, not {outtype!r}")
    ftype, qtype = _OUTTYPES[outtype]
    index = index_checkpoint(model_dir)
    if merger is not None:
        merger.check_targets(
            set(index) | ({"lm_head.weight"} if "model.embed_tokens.weight" in index else set())
        )
    plan = plan_tensors(index, config, spec, qtype, merger)

    arch_name = gguf.MODEL_ARCH_NAMES[spec.arch]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(out_path.name + ".partial")
    writer = gguf.GGUFWriter(tmp_path, arch_name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or model_dir.name)
        add_hparams(writer, config, spec, int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = add_tokenizer(
            writer, Path(tokenizer_dir) if tokenizer_dir else model_dir, int(config["vocab_size"])
        )
        for p in plan:
            nbytes = int(np.prod(p.shape, dtype=np.int64)) * _NP_DTYPE[p.qtype].itemsize
            writer.add_tensor_info(p.gguf_name, p.shape, _NP_DTYPE[p.qtype], nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        n_params, merged = _write_tensors(writer, plan, index, config, spec, merger, on_tensor)
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    writer.close()
    tmp_path.replace(out_path)
    return ConvertResult(
        path=out_path,
        arch=arch_name,
        outtype=outtype,
        n_tensors=len(plan),
        n_params=n_params,
        vocab=vocab,
        merged_tensors=merged,
    )


def _write_tensors(
    writer: gguf.GGUFWriter,
    plan: list[PlannedTensor],
    index: dict[str, SourceTensor],
    config: dict[str, Any],
    spec: ArchSpec,
    merger: LoraMerger | None,
    on_tensor: Callable[[int, int, str], None] | None,
) -> tuple[int, int]:
    """Each tensor of the plan, one at a time: read, its LoRA delta merged in, re-laid out, written.
    Returns (parameters written, tensors the LoRA changed)."""
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    rope = rope_parameters(config)
    n_params = merged = 0
    for i, p in enumerate(plan):
        src = p.source
        if src.hf_name == "rope_freqs":
            t = llama3_rope_factors(rope, head_dim_of(config))
        else:
            # a tied lm_head that the adapter changes starts from the embedding
            t = read_tensor(src if src.file is not None else index["model.embed_tokens.weight"])
            if merger is not None:
                before = t
                t = merger.apply(src.hf_name, t)
                merged += t is not before
            if spec.permute_qk and src.hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_for_rope(t, n_head)
            elif spec.permute_qk and src.hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute_for_rope(t, n_kv)
        n_params += t.numel()
        writer.write_tensor_data(_to_numpy(t, p.qtype))
        del t
        if on_tensor is not None:
            on_tensor(i + 1, len(plan), p.gguf_name)
    if merger is not None:
        merger.check_all_used()
    return n_params, merged
