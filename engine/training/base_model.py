"""Loading a base model and its tokenizer, for LoRA/QLoRA training or for generation.

The weights are stored as ``engine.planning.memory.storage_dtype`` decides (NF4 codes through
bitsandbytes with double quantisation; embeddings and lm_head never quantised) and computed in
16-bit on a GPU, fp32 on the CPU; attention is SDPA. Unsloth's ``FastLanguageModel`` loads the
model where ``train.backend`` allows it and it can run (``_unsloth_decision``), else transformers.

transformers, peft and bitsandbytes load inside the functions, after ``privacy_environment()``
(the hub library reads its settings when first imported; one-shot commands import this module
before they run it); Unsloth only where it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.contract.files import PathError, checked_path, quoted
from engine.hardware.installed import install_command, missing_modules
from engine.models.adapters import is_adapter_folder
from engine.models.presets import ModelError, ResolvedModel, hub_errors, privacy_environment, resolve_model
from engine.planning.memory import StorageDtype, storage_dtype
from engine.training import quantized_cache
from engine.training.backend import auto_prefers_native, unsloth_mode
from engine.training.ranks import active_rank


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer (preset, folder or hub name)."""
    privacy_environment()
    resolved = resolve_model(name_or_path)
    from transformers import AutoTokenizer

    with hub_errors(resolved, "tokenizer"):
        return AutoTokenizer.from_pretrained(resolved.target, trust_remote_code=trust_remote_code)


@dataclass
class LoadedModel:
    model: Any  # the base model, not yet wrapped with LoRA
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """'tiny, 2.6M parameters, fp32 on cpu (transformers)': the line a person reads."""
        i = self.info
        n = float(i.get("parameters") or 0)
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        weights = f"; weights: {i['weights_from']}" if i.get("weights_from") else ""
        return f"{i.get('model')}, {size} parameters, {i.get('quantization')} on {i.get('device')} ({i.get('path')}){weights}"


_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _cuda_bf16(device: str) -> bool:
    index = torch.device(device).index or 0
    return torch.cuda.get_device_capability(index)[0] >= 8


def _unsloth_decision(mode: str, device: str, storage: StorageDtype) -> tuple[bool, str]:
    """Whether to load through Unsloth, and why (raises for 'require' when it cannot be used)."""
    if mode == "never":
        return False, "train.backend is 'native'"
    problem, fix = None, "Set train.backend to 'auto' or 'native'"
    if not device.startswith("cuda"):
        problem = "Unsloth needs a CUDA GPU and the device is the CPU"
    elif storage == "fp32":
        problem = "Unsloth trains in 4-bit or 16-bit, and fp32 (quantization 'none') was asked for"
    elif missing_modules("unsloth"):
        problem = "Unsloth is not installed in this Python"
        fix = f"Install the 'unsloth' extra ({install_command(['unsloth'])}), or set train.backend to 'auto' or 'native'"
    else:
        try:
            import unsloth  # noqa: F401  (import for its patches, as Unsloth asks)
        except Exception as exc:  # its own checks failing (no GPU, versions)
            problem = f"Unsloth is not usable here ({type(exc).__name__}: {str(exc).strip()[:200] or 'import failed'})"
    if problem is None:
        asked = "unsloth" if mode == "require" else "auto"
        return True, f"train.backend is '{asked}' and Unsloth imported on a CUDA GPU"
    if mode == "require":
        raise ModelError(f"train.backend is 'unsloth' but {problem}. {fix}.")
    return False, f"{problem}: using transformers"


def load_for_training(spec: Any, device: str, *, max_seq_length: int | None = None) -> LoadedModel:
    """Load the base model and tokenizer of a FinetuneSpec/SeriesSpec on ``device`` ("cpu", "cuda", "cuda:N").

    ``max_seq_length`` only matters to Unsloth (it sizes its RoPE caches); default: the spec's or 2048.
    """
    privacy_environment()
    if device == "cuda":
        device = f"cuda:{spec.gpu_index}"
    on_gpu = device.startswith("cuda")
    resolved = resolve_model(spec.model)
    bf16_ok = _cuda_bf16(device) if on_gpu else True
    storage = storage_dtype(spec.quantization, device, bf16_supported=bf16_ok)
    # NF4 computes in 16-bit on a GPU and in fp32 on the CPU (bf16 matmuls are slow on most CPUs).
    compute = storage if storage != "nf4" else ("bf16" if bf16_ok else "fp16") if on_gpu else "fp32"
    native_why = auto_prefers_native(spec) if on_gpu and storage != "fp32" else None
    if native_why is not None:
        use_unsloth, why = False, f"train.backend is 'auto': {native_why}"
    else:
        use_unsloth, why = _unsloth_decision(unsloth_mode(spec), device, storage)
    info: dict[str, Any] = {
        "model": spec.model,
        "model_source": resolved.source,
        "model_target": resolved.target,
        "quantization": storage,
        "quantization_requested": spec.quantization,
        "compute_dtype": _DTYPE_NAMES[compute],
        "device": device,
        "path": "unsloth" if use_unsloth else "transformers",
        "path_reason": why,
        "attn_implementation": "sdpa",
        "trust_remote_code": bool(spec.trust_remote_code),
    }
    with hub_errors(resolved, "weights"):
        if use_unsloth:
            seq = max_seq_length or getattr(getattr(spec, "train", None), "max_seq_length", None) or 2048
            model, tokenizer = _load_unsloth(resolved, storage, compute, device, seq, spec.trust_remote_code)
        else:
            sharded = (rank := active_rank()) is not None and rank.sharded
            model, weights_from = _load_with_copy(spec, resolved, storage, compute, device, sharded)
            if weights_from:
                info["weights_from"] = weights_from
            tokenizer = load_tokenizer(resolved.target, trust_remote_code=spec.trust_remote_code)
    info["parameters"] = sum(  # a 4-bit parameter counts the weights it packs, not its bytes
        p.quant_state.shape.numel() if type(p).__name__ == "Params4bit" else p.numel()
        for p in model.parameters()
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def _torch_dtype(name: str) -> Any:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def bnb_nf4_config(compute: str, sharded: bool = False) -> Any:
    """The QLoRA quantisation: NF4 codes, double quantisation, 16-bit (GPU) or fp32 (CPU) compute.

    ``sharded`` (FSDP-QLoRA): the 4-bit codes are packed into tensors of the compute dtype, like every
    other weight, so FSDP can slice and gather them (it shards floating-point tensors only).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_torch_dtype(compute),
        # transformers already leaves the output embedding (lm_head) unquantised; naming it keeps
        # that true for architectures whose head it does not detect. Embeddings are never Linear.
        llm_int8_skip_modules=["lm_head"],
        **({"bnb_4bit_quant_storage": _torch_dtype(compute)} if sharded else {}),
    )


def _load_with_copy(
    spec: Any, resolved: ResolvedModel, storage: str, compute: str, device: str, sharded: bool
) -> tuple[Any, str | None]:
    """The base model through transformers, from the 4-bit copy an earlier job kept where there is one (a
    copy that fails to load is removed and the weights load as usual); and the line that says which."""
    folder = _copy_folder(spec, resolved, storage)
    kept = quantized_cache.lookup(folder, compute) if folder is not None else None
    load = (resolved, storage, compute, device, spec.trust_remote_code, sharded)
    note = ""
    if kept is not None:
        try:
            return _load_transformers(*load, kept), f"the 4-bit copy kept by an earlier job ({kept})"
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged copy costs its speed-up, not the job
            quantized_cache.drop(kept)
            note = f"the kept 4-bit copy {kept} did not load ({type(e).__name__}) and was removed; "
    model = _load_transformers(*load)
    if folder is not None and quantized_cache.keep_after_job(model, folder, compute) is not None:
        note += "quantized now; a 4-bit copy is kept after this job for the next ones"
    return model, note or None


def _copy_folder(spec: Any, resolved: ResolvedModel, storage: str) -> Path | None:
    """The local folder of the weights, where a 4-bit copy may be kept or loaded in their place (one device,
    NF4, no remote code, ``keep_quantized``: engine.training.quantized_cache); else None. A hub model's is
    its downloaded snapshot (None before the first download)."""
    if storage != "nf4" or active_rank() is not None or spec.trust_remote_code:
        return None
    if not getattr(spec, "keep_quantized", False):
        return None
    if resolved.local_path is not None:
        return resolved.local_path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved.target, local_files_only=True))
    except Exception:  # noqa: BLE001 - not downloaded yet (or not a hub id): no copy this time
        return None


def _load_transformers(
    resolved: ResolvedModel,
    storage: str,
    compute: str,
    device: str,
    trust_remote_code: bool,
    sharded: bool = False,
    kept: Path | None = None,
) -> Any:
    """The base model through transformers; from ``kept`` (a 4-bit copy: engine.training.quantized_cache)
    when given, which carries its own quantization config."""
    from transformers import AutoModelForCausalLM

    # Sharded (FSDP) 16/32-bit weights load into host memory; sharding moves each rank's share to its
    # card. 4-bit weights are quantised on the card by bitsandbytes, so they load there whole first.
    host = sharded and storage != "nf4"
    kwargs: dict[str, Any] = {
        "dtype": _torch_dtype(compute),
        "attn_implementation": "sdpa",
        "trust_remote_code": trust_remote_code,
        "device_map": {"": "cpu" if host else device},
    }
    if storage == "nf4":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:
            raise ModelError(
                f"4-bit loading needs bitsandbytes, which failed to import ({type(exc).__name__}: {exc}). "
                "Install it (pip install bitsandbytes) or use quantization '16bit' or 'none'."
            ) from exc
        if kept is None:
            kwargs["quantization_config"] = bnb_nf4_config(compute, sharded)
    return AutoModelForCausalLM.from_pretrained(str(kept or resolved.target), **kwargs)


def _load_unsloth(
    resolved: ResolvedModel,
    storage: str,
    compute: str,
    device: str,
    max_seq_length: int,
    trust_remote_code: bool,
) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel

    return FastLanguageModel.from_pretrained(  # (model, tokenizer)
        model_name=resolved.target,
        max_seq_length=max_seq_length,
        dtype=_torch_dtype(compute),
        load_in_4bit=storage == "nf4",
        full_finetuning=False,
        trust_remote_code=trust_remote_code,
        device_map={"": device},
    )


def load_for_inference(
    name_or_path: str, *, adapter: str | None = None, device: str = "cpu", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """A model for generation: bf16 (fp16 without bf16) on a GPU, fp32 on CPU, plus an optional LoRA adapter."""
    privacy_environment()
    resolved = resolve_model(name_or_path)
    on_gpu = device.startswith("cuda")
    compute = ("bf16" if _cuda_bf16(device) else "fp16") if on_gpu else "fp32"
    with hub_errors(resolved, "weights"):
        model = _load_transformers(resolved, compute, compute, device, trust_remote_code)
        tokenizer = load_tokenizer(resolved.target, trust_remote_code=trust_remote_code)
    if adapter:
        try:  # by type, before anything opens it
            adapter_path = checked_path(adapter, "adapter", expect="dir")
        except PathError as exc:
            raise ModelError(str(exc)) from None
        if not is_adapter_folder(adapter_path):
            raise ModelError(f"{quoted(adapter)} is not a LoRA adapter folder (no adapter_config.json)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path))
    model.eval()
    return model, tokenizer
