"""Quantize a GGUF file with llama.cpp's own quantizer (through llama-cpp-python's binding)."""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

# ExportQuant name -> llama.cpp file type constant name (llama_cpp.LLAMA_FTYPE_*)
FTYPE_NAMES: dict[str, str] = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
FLOAT_TYPES = ("f32", "f16", "bf16")


class QuantizeError(RuntimeError):
    """llama.cpp refused or failed to quantize."""


def llama_cpp_module():  # type: ignore[no-untyped-def]
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the install
        raise QuantizeError(
            "GGUF quantization and verification need llama-cpp-python: "
            "pip install 'backprop-mcp[export]' (it compiles llama.cpp, a few minutes on first install)"
        ) from e
    return llama_cpp


def quantize_gguf(src: str | Path, dst: str | Path, quant: str, *, nthread: int | None = None) -> Path:
    """Write ``dst`` as the ``quant`` version of the GGUF ``src`` (any float source llama.cpp reads)."""
    if quant not in FTYPE_NAMES:
        raise QuantizeError(f"unknown quantization {quant!r}; choose one of {', '.join(FTYPE_NAMES)}")
    llama_cpp = llama_cpp_module()
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPE_NAMES[quant])
    params.nthread = nthread if nthread is not None else (os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise QuantizeError(
            f"llama.cpp could not quantize {src.name} to {quant} (return code {rc}); see worker.log"
        )
    tmp.replace(dst)
    return dst


def copy_or_link(src: Path, dst: Path) -> Path:
    """The intermediate file already has the requested type: hard-link it (copy across devices)."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst
