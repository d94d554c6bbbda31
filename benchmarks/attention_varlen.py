"""Attention kernels for packed rows against causal attention on fixed rows, forward + backward.

Packed rows (several examples end to end, attention kept inside each) need a variable-length kernel;
rows of one example take causal SDPA. This times, on one GPU, for a model's attention shape and
micro-batch 4 x 2048 tokens:
- ``dense``: causal SDPA on fixed rows through cuDNN (what fixed-length rows run);
- ``flash``: torch's flash-attention varlen kernel on packed rows (``aten._flash_attention_forward``),
  with the row width as the longest piece (what CUDA graphs fix today) and with the real longest piece;
- ``fa4``: FlashAttention-4's varlen kernel (``flash-attn-4``, CuTeDSL) on the same packed rows, key/value
  heads as they are, with the row width and with the real longest piece as the bound;
- ``fa4_dense``: FlashAttention-4's fixed-length causal kernel on the fixed rows (against ``dense``);
and checks each kernel's output and gradients against SDPA one example at a time (``fa4_dense``
against dense SDPA), and that a CUDA graph captures and replays FlashAttention-4's varlen forward and
backward. Prints one JSON line per shape. (cuDNN's ragged THD kernel, tried in v9, gave wrong
gradients in torch 2.11 / cuDNN 9.19 and is no longer run.)

    python benchmarks/attention_varlen.py --shapes 0.5b,7b
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"0.5b": (14, 2, 64), "7b": (28, 4, 128)}  # query heads, key/value heads, head size


def packed_rows(rows: int, width: int, seed: int = 0) -> list[list[int]]:
    """Log-normal example lengths (median ~300, capped at ``width``) packed first-fit into ``rows``
    rows; each row's free end is one more piece (padding), as the engine's collation does."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        row, used = [], 0
        while True:
            n = min(width, max(8, int(rng.lognormvariate(math.log(300), 0.8))))
            if used + n > width:
                break
            row.append(n)
            used += n
        if used < width:
            row.append(width - used)
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="0.5b,7b")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from engine.training.varlen_attention import _fa4, _FlashVarlen, cu_seqlens_for_rows, reference_varlen

    fa4 = _fa4()

    dev = "cuda"
    segments = packed_rows(args.rows, args.width)
    cu_cpu, longest = cu_seqlens_for_rows(segments)
    cu = cu_cpu.to(dev)
    total = args.rows * args.width

    def fa4_varlen(q, k, v, max_len, scale):
        if fa4 is None:
            raise RuntimeError("flash-attn-4 does not import here")
        return fa4[0](
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
            softmax_scale=scale, causal=True,
        )[0]  # fmt: skip

    def timed(fn, *inputs) -> float:
        for _ in range(3):
            fn(*inputs).sum().backward()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.iters):
            fn(*inputs).sum().backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / args.iters

    def one_shape(shape: str) -> dict:
        heads, kv_heads, dim = SHAPES[shape]
        scale = dim**-0.5
        g = torch.Generator(device=dev).manual_seed(0)

        def leaf(*size):
            return torch.randn(*size, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_(True)

        q, k, v = leaf(total, heads, dim), leaf(total, kv_heads, dim), leaf(total, kv_heads, dim)
        rec: dict = {"shape": shape, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                     "pieces": len(cu_cpu) - 1, "longest": longest, "ms_fwd_bwd": {}, "max_err": {}}  # fmt: skip

        ref = reference_varlen(q, k, v, cu_cpu, scale)
        grad = torch.randn(ref.shape, device=dev, dtype=torch.bfloat16, generator=g)
        ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
        kr, vr = (t.detach().repeat_interleave(heads // kv_heads, dim=1).requires_grad_(True) for t in (k, v))
        kernels = {
            "flash": lambda q, k, v: _FlashVarlen.apply(q, kr, vr, cu, args.width, scale),
            "flash_longest": lambda q, k, v: _FlashVarlen.apply(q, kr, vr, cu, longest, scale),
            "fa4": lambda q, k, v: fa4_varlen(q, k, v, args.width, scale),
            "fa4_longest": lambda q, k, v: fa4_varlen(q, k, v, longest, scale),
        }
        for name, fn in kernels.items():
            try:
                out = fn(q, k, v)
                if name.startswith(
                    "flash"
                ):  # (it took repeated key/value heads: compare their summed gradients)
                    grads = list(torch.autograd.grad(out, (q, kr, vr), grad))
                    grads[1:] = [t.view(total, kv_heads, -1, dim).sum(2) for t in grads[1:]]
                else:
                    grads = list(torch.autograd.grad(out, (q, k, v), grad))
                errs = [(out.float() - ref.float()).abs().max().item()] + [
                    ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                    for a, b in zip(grads, ref_grads, strict=True)
                ]
                rec["max_err"][name] = [round(e, 5) for e in errs]
                rec["ms_fwd_bwd"][name] = round(timed(fn, q, k, v), 3)
            except Exception as exc:  # record why a kernel cannot run here, and go on
                rec["max_err"][name] = f"failed: {exc!r}"[:300]
        # dense causal SDPA on fixed rows of one example each (cuDNN on Hopper), and FlashAttention-4 there
        qd, kd, vd = (t.detach().view(args.rows, args.width, -1, dim).transpose(1, 2).requires_grad_(True)
                      for t in (q, k, v))  # fmt: skip
        dense = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        rec["ms_fwd_bwd"]["dense"] = round(timed(dense, qd, kd, vd), 3)
        if fa4 is not None:
            try:
                fa4_dense = lambda q, k, v: fa4[1](  # noqa: E731
                    *(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=scale, causal=True
                )[0].transpose(1, 2)
                ref_d = dense(qd, kd, vd)
                grad_d = torch.randn(ref_d.shape, device=dev, dtype=torch.bfloat16, generator=g)
                want = torch.autograd.grad(ref_d, (qd, kd, vd), grad_d)
                out_d = fa4_dense(qd, kd, vd)
                got = torch.autograd.grad(out_d, (qd, kd, vd), grad_d)
                rec["max_err"]["fa4_dense"] = [round((out_d.float() - ref_d.float()).abs().max().item(), 5)] + [
                    round(((a.float() - b.float()).abs().max() / b.float().abs().max()).item(), 5)
                    for a, b in zip(got, want, strict=True)
                ]  # fmt: skip
                rec["ms_fwd_bwd"]["fa4_dense"] = round(timed(fa4_dense, qd, kd, vd), 3)
            except Exception as exc:
                rec["max_err"]["fa4_dense"] = f"failed: {exc!r}"[:300]
        # a CUDA graph captures FlashAttention-4's varlen forward and backward, and replays them
        try:
            static_grad = grad.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    torch.autograd.grad(fa4_varlen(q, k, v, args.width, scale), (q, k, v), static_grad)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out_g = fa4_varlen(q, k, v, args.width, scale)
                grads_g = torch.autograd.grad(out_g, (q, k, v), static_grad)
            with torch.no_grad():
                out_g.zero_()  # poisoned: the replay must write it
            graph.replay()
            torch.cuda.synchronize()
            rec["cuda_graph"] = {
                "replayed": True,
                "max_err": round((out_g.float() - ref.float()).abs().max().item(), 5),
                "dq_rel_err": round(
                    ((grads_g[0].float() - ref_grads[0].float()).abs().max()
                     / ref_grads[0].float().abs().max()).item(), 5),
            }  # fmt: skip
        except Exception as exc:
            rec["cuda_graph"] = f"failed: {exc!r}"[:300]
        return rec

    for shape in args.shapes.split(","):
        rec = one_shape(shape)
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
