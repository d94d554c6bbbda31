"""A PEFT LoRA adapter as a GGUF LoRA file (llama.cpp ``--lora``, Ollama ``ADAPTER``).

llama.cpp applies ``scale * alpha / rank * B @ A`` with one ``adapter.lora.alpha`` for the file
and each tensor's own rank, so per-module ranks/alphas (rank_pattern, alpha_pattern, rsLoRA) are
folded into B to keep every module's effective scale exact. For the LLAMA architecture the rows of
q/k projections are re-ordered for llama.cpp's RoPE layout; B carries the output rows, so B is
permuted the same way and A is left alone.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from engine.export.convert import ARCHITECTURES, arch_of, permute_for_rope, read_config
from engine.export.merge import LoraMerger
from engine.models.adapters import AdapterError


def convert_adapter_to_gguf(
    merger: LoraMerger, base_dir: str | Path, out_path: str | Path, *, outtype: str = "f16"
) -> Path:
    base_dir, out_path = Path(base_dir), Path(out_path)
    config = read_config(base_dir)
    _, spec = arch_of(config)
    assert spec in ARCHITECTURES.values()
    if merger.replacements or any(p.bias is not None for p in merger.pairs.values()):
        raise AdapterError(
            "this adapter also retrains full tensors or biases (modules_to_save / lora_bias), which a GGUF LoRA "
            "file cannot carry; export the merged model instead (adapter_gguf=False)"
        )
    qtype = gguf.GGMLQuantizationType.F16 if outtype == "f16" else gguf.GGMLQuantizationType.F32
    np_dtype = np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    name_map = gguf.get_tensor_name_map(spec.arch, int(config["num_hidden_layers"]))

    writer = gguf.GGUFWriter(out_path, gguf.MODEL_ARCH_NAMES[spec.arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(merger.alpha))
    writer.add_name(merger.adapter_dir.name)
    for hf_name, pair in sorted(merger.pairs.items()):
        target = name_map.get_name(hf_name, try_suffixes=(".weight",))
        if target is None:
            raise AdapterError(
                f"adapter targets {hf_name}, which has no GGUF name; cannot write a GGUF adapter"
            )
        rank = pair.a.shape[0]
        fold = pair.scale / (merger.alpha / rank)  # 1.0 for a plain LoRA config
        b = pair.b.float() * fold
        if spec.permute_qk and hf_name.endswith("q_proj.weight"):
            b = permute_for_rope(b, n_head)
        elif spec.permute_qk and hf_name.endswith("k_proj.weight"):
            b = permute_for_rope(b, n_kv)
        writer.add_tensor(target + ".lora_a", pair.a.float().numpy().astype(np_dtype), raw_dtype=qtype)
        writer.add_tensor(target + ".lora_b", b.to(torch.float32).numpy().astype(np_dtype), raw_dtype=qtype)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
