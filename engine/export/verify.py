"""Prove an export: llama.cpp's logits on the GGUF vs transformers' logits on the merged model.

Both sides get the same token ids (from the Hugging Face tokenizer), so the logit comparison tests
the weights and the architecture settings alone; that llama.cpp's own tokenizer produces the same
ids is recorded separately (``tokenizer_match``). Every position of every prompt is compared, not
only the last, which gives a few hundred argmax decisions from a handful of prompts.

Thresholds (minimum argmax agreement with the reference):
- f32, f16, q8_0: 100% (8-bit and 16-bit noise is far below logit margins of a
  trained model, and was on the test models too);
- bf16: 99% — bf16 keeps 8 mantissa bits, so its rounding of the *merged* weights is coarser than
  f16's; on a trained model it does not move the argmax, but a near-tie can flip;
- q6_k 98%, q5_k_m 97%, q5_0 96% — error grows roughly 2x per bit removed, we scale the allowed
  disagreement with it, between q8_0's 100% and q4_k_m's 95%;
- q4_k_m 95%, q4_0 92% (q4_0 has no per-sub-block scales and is visibly coarser).
A failed check fails the export: a GGUF that changes the model's answers is not shipped.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine.export.quantize import llama_cpp_module

ARGMAX_THRESHOLDS: dict[str, float] = {
    "f32": 1.0,
    "f16": 1.0,
    "bf16": 0.99,
    "q8_0": 1.0,
    "q6_k": 0.98,
    "q5_k_m": 0.97,
    "q5_0": 0.96,
    "q4_k_m": 0.95,
    "q4_0": 0.92,
}

# A disagreement counts only when transformers prefers its token by more than this (nats):
# quantization legitimately swaps near-tied tokens, which is not a broken export.
NEAR_TIE_NATS: dict[str, float] = {
    "f32": 0.01,
    "f16": 0.05,
    "bf16": 0.1,
    "q8_0": 0.1,
    "q6_k": 0.2,
    "q5_k_m": 0.3,
    "q5_0": 0.3,
    "q4_k_m": 0.5,
    "q4_0": 0.6,
}
# Mean |Δlogit| as a fraction of the reference logits' spread. A broken export (wrong layout,
# wrong tokenizer ids, wrong merge) gives ~1.0 or more whatever the model.
RELATIVE_ERROR_LIMITS: dict[str, float] = {
    "f32": 0.01,
    "f16": 0.02,
    "bf16": 0.05,
    "q8_0": 0.05,
    "q6_k": 0.1,
    "q5_k_m": 0.15,
    "q5_0": 0.15,
    "q4_k_m": 0.25,
    "q4_0": 0.3,
}

DEFAULT_CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Write a haiku about gradient descent."},
    ],
]
DEFAULT_TEXTS: list[str] = [
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


@dataclass
class ParityReport:
    quantization: str
    passed: bool
    argmax_agreement: float  # llama.cpp's top token == transformers' top token
    near_tie_agreement: float  # ... or within NEAR_TIE_NATS of transformers' best logit (the pass criterion)
    threshold: float
    relative_error: float  # mean |Δlogit| / std of the reference logits
    relative_error_limit: float
    max_abs_diff: float
    mean_abs_diff: float
    positions: int
    prompts: int
    tokenizer_match: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def default_prompts(tokenizer: Any) -> list[str]:
    """Chat-formatted and plain prompts, as text the tokenizer encodes with its special tokens.

    A chat template that prints the BOS token would get a second one from the tokenizer, so a
    leading BOS is removed from the rendered chat (the tokenizer, like llama.cpp, adds it back).
    """
    prompts: list[str] = []
    if getattr(tokenizer, "chat_template", None):
        bos = getattr(tokenizer, "bos_token", None)
        for chat in DEFAULT_CHATS:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            if bos and adds_bos(tokenizer) and text.startswith(bos):
                text = text[len(bos) :]
            prompts.append(text)
    return prompts + DEFAULT_TEXTS


def open_gguf(path: str | Path, n_ctx: int = 512, lora_path: str | Path | None = None) -> Any:
    """A llama.cpp model for evaluation (all-position logits). Call ``.close()`` when done."""
    llama_cpp = llama_cpp_module()
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=True,
        n_gpu_layers=-1 if gpu else 0,
        n_threads=max(1, os.cpu_count() or 1),
        lora_path=str(lora_path) if lora_path is not None else None,
        verbose=False,
    )


def gguf_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def reference_logits(model: Any, ids: list[int]) -> np.ndarray:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(torch.tensor([ids], device=device)).logits[0]
    return out.float().cpu().numpy()


def check_parity(
    gguf_path: str | Path,
    quantization: str,
    model: Any,
    tokenizer: Any,
    prompts: list[str] | None = None,
    *,
    lora_path: str | Path | None = None,
) -> ParityReport:
    """Compare next-token logits of the GGUF with ``model`` (the merged transformers model)."""
    prompts = prompts or default_prompts(tokenizer)
    encoded = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    bos = adds_bos(tokenizer)
    tie = NEAR_TIE_NATS.get(quantization, 0.5)
    n_ctx = max(64, max(len(e) for e in encoded) + 8)
    llm = open_gguf(gguf_path, n_ctx=n_ctx, lora_path=lora_path)
    agree = agree_tie = positions = 0
    max_diff = sum_diff = 0.0
    n_values = 0
    ref_sq = ref_sum = 0.0
    tokenizer_match = True
    try:
        for prompt, ids in zip(prompts, encoded, strict=True):
            ours = gguf_logits(llm, ids)
            ref = reference_logits(model, ids)
            if ours.shape != ref.shape:
                raise ValueError(f"logit shapes differ: GGUF {ours.shape} vs transformers {ref.shape}")
            diff = np.abs(ours - ref)
            max_diff = max(max_diff, float(diff.max()))
            sum_diff += float(diff.sum())
            n_values += diff.size
            ref64 = ref.astype(np.float64)
            ref_sq += float((ref64**2).sum())
            ref_sum += float(ref64.sum())
            top_ours = ours.argmax(-1)
            top_ref = ref.argmax(-1)
            agree += int((top_ours == top_ref).sum())
            # the reference's own logit for llama.cpp's choice, against its best
            chosen = ref[np.arange(len(ids)), top_ours]
            agree_tie += int((chosen >= ref.max(-1) - tie).sum())
            positions += len(ids)
            native = llm.tokenize(prompt.encode("utf-8"), add_bos=bos, special=True)
            tokenizer_match = tokenizer_match and list(native) == list(ids)
    finally:
        llm.close()
    mean_diff = sum_diff / max(1, n_values)
    ref_std = max(1e-12, (ref_sq / max(1, n_values) - (ref_sum / max(1, n_values)) ** 2) ** 0.5)
    relative_error = mean_diff / ref_std
    agreement = agree / max(1, positions)
    tie_agreement = agree_tie / max(1, positions)
    threshold = ARGMAX_THRESHOLDS.get(quantization, 0.95)
    max_rel = RELATIVE_ERROR_LIMITS.get(quantization, 0.5)
    passed = tie_agreement >= threshold and relative_error <= max_rel
    message = (
        f"{quantization}: argmax agreement {agreement:.1%} ({tie_agreement:.1%} counting near-ties within "
        f"{tie} nats; need {threshold:.0%}) over {positions} positions, mean |Δlogit| {relative_error:.3f} of the "
        f"logit spread (limit {max_rel}), max |Δlogit| {max_diff:.4f}"
        + ("" if tokenizer_match else "; llama.cpp tokenizes the prompts differently from transformers")
    )
    return ParityReport(
        quantization=quantization,
        passed=passed,
        argmax_agreement=agreement,
        near_tie_agreement=tie_agreement,
        threshold=threshold,
        relative_error=relative_error,
        relative_error_limit=max_rel,
        max_abs_diff=max_diff,
        mean_abs_diff=mean_diff,
        positions=positions,
        prompts=len(prompts),
        tokenizer_match=tokenizer_match,
        message=message,
    )


def load_reference(
    base_dir: str | Path, adapter_dir: str | Path | None, *, trust_remote_code: bool = False
) -> Any:
    """The merged model in transformers, merged by peft (independent of our streaming merge)."""
    cuda = torch.cuda.is_available()
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(base_dir), dtype=torch.float32, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True
    )
    n_params = sum(p.numel() for p in model.parameters())
    if not cuda and n_params > 4e9:
        # fp32 of a 7B is 28 GB; bf16 halves it and still resolves argmax on a trained model.
        model = model.to(torch.bfloat16)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if cuda:
        model = model.to("cuda")
    model.eval()
    return model
