"""Which kernel packed rows' attention takes (engine.training.varlen_attention.varlen_kernel), and on a
GPU with FlashAttention-4 installed, that its varlen kernel computes what SDPA computes one example at a
time, forward and backward (the GPU test is skipped here: no GPU, no flash-attn-4)."""

from __future__ import annotations

import pytest
import torch

from engine.training import varlen_attention as va


def test_no_varlen_kernel_on_the_cpu_and_asking_for_fa4_there_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(va.KERNEL_ENV, raising=False)
    assert va.varlen_kernel("cpu", torch.bfloat16, 64, 14, 2) is None
    monkeypatch.setenv(va.KERNEL_ENV, "torch")
    assert va.varlen_kernel("cpu", torch.bfloat16, 64, 14, 2) is None
    monkeypatch.setenv(va.KERNEL_ENV, "fa4")
    with pytest.raises(RuntimeError, match="pip install flash-attn-4"):
        va.varlen_kernel("cpu", torch.bfloat16, 64, 14, 2)
    monkeypatch.setenv(va.KERNEL_ENV, "triton")
    with pytest.raises(ValueError, match="auto, fa4 or torch"):
        va.varlen_kernel("cpu", torch.bfloat16, 64, 14, 2)


def test_the_context_switches_the_models_kernel_on_and_back():
    model = torch.nn.Linear(2, 2)
    model.config = type("Config", (), {"_attn_implementation": "sdpa"})()
    model.__dict__[va.VARLEN_FLAG] = "fa4"
    with va.varlen_attention(model):
        assert va._ACTIVE["kernel"] == "fa4" and model.config._attn_implementation == va.NAME
    assert va._ACTIVE["kernel"] == "torch" and model.config._attn_implementation == "sdpa"
    assert "FlashAttention-4" in va.kernel_description("fa4")
    assert "torch" in va.kernel_description("torch")


def test_on_the_cpu_packed_rows_fall_back_to_sdpa_one_example_at_a_time():
    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 8
    segments = [[3, 5], [6, 2]]
    cu, longest = va.cu_seqlens_for_rows(segments)
    q, k, v = (torch.randn(2, n, 8, dim) for n in (heads, kv_heads, kv_heads))
    out, _ = va.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=longest)
    flat = [t.transpose(1, 2).reshape(16, t.shape[1], dim) for t in (q, k, v)]
    ref = va.reference_varlen(*flat, cu, dim**-0.5)
    assert torch.allclose(out.reshape(16, heads, dim), ref)


@pytest.mark.skipif(
    not torch.cuda.is_available() or va._fa4() is None, reason="needs a CUDA GPU and flash-attn-4"
)
@pytest.mark.parametrize("shape", [(14, 2, 64), (28, 4, 128)])  # Qwen2.5-0.5B, Qwen2.5-7B
def test_gpu_fa4_varlen_equals_sdpa_one_example_at_a_time(shape):
    heads, kv_heads, dim = shape
    assert va.varlen_kernel("cuda", torch.bfloat16, dim, heads, kv_heads) == "fa4"
    segments = [[700, 900, 448], [2048], [100, 1000, 948], [1500, 548]]
    cu_cpu, _ = va.cu_seqlens_for_rows(segments)
    cu = cu_cpu.cuda()
    g = torch.Generator(device="cuda").manual_seed(0)

    def leaf(n: int) -> torch.Tensor:
        return torch.randn(4, n, 2048, dim, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    q, k, v = leaf(heads), leaf(kv_heads), leaf(kv_heads)
    model = torch.nn.Module()
    model.__dict__[va.VARLEN_FLAG] = "fa4"
    with va.varlen_attention(model):  # (no configs to switch: only the kernel matters here)
        out, _ = va.varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu, max_length_q=2048)
    grad = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    got = torch.autograd.grad(out, (q, k, v), grad)
    flat = [t.transpose(1, 2).reshape(4 * 2048, t.shape[1], dim) for t in (q, k, v)]
    ref = va.reference_varlen(*flat, cu_cpu, dim**-0.5).view(out.shape)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(out, ref) < 1e-2
    for a, b in zip(got, want, strict=True):
        assert rel(a, b) < 2e-2
