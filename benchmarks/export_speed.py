"""Export speed: our merge+convert+quantize vs llama.cpp's convert_hf_to_gguf.py + quantize, same files.

    python benchmarks/export_speed.py --llama-cpp-source PATH/TO/llama.cpp [--small] [--workdir DIR]

First writes a random-weight model with the Qwen2.5-7B architecture (``--small``: Qwen2.5-0.5B)
in bf16 to ``--workdir``, shard by shard (never the whole model in memory), with the real Qwen2
tokenizer (read from llama.cpp's ``models/ggml-vocab-qwen2.gguf``) and a random rank-16 LoRA
adapter on every linear layer. Files are reused by later runs. Then, each step in its own child
process (wall time, and peak RSS from ``wait4``), with the files read once beforehand so both
sides start from the page cache:

- ours: merge the LoRA + convert to bf16 GGUF (engine.export.convert), then quantize to q4_k_m;
- llama.cpp: convert_hf_to_gguf.py --outtype bf16 on the base files, then the same quantizer.

Both quantize with llama.cpp's quantizer (through llama-cpp-python), so that step is the same code
on equivalent files; the difference is in the conversion (ours also merges). Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ARCHS = {
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
}
SHARD_BYTES = 2 * 1024**3
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(n):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return out


def write_model(model_dir: Path, arch: str, tokenizer_dir: Path) -> None:
    """Random bf16 weights, written shard by shard (about 2 GiB each), plus config and tokenizer."""
    import shutil

    import torch
    from safetensors.torch import save_file

    if (model_dir / "model.safetensors.index.json").is_file():
        return
    model_dir.mkdir(parents=True, exist_ok=True)
    cfg = ARCHS[arch]
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "dtype": "bfloat16",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "use_sliding_window": False,
        **cfg,
    }
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, model_dir / f.name)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    size = 0
    names: list[list[str]] = []

    def flush() -> None:  # write the shard and drop it: at most ~2 GiB of weights in memory
        nonlocal shard, size
        if shard:
            names.append(list(shard))
            save_file(
                shard, str(model_dir / f"model-{len(names):05d}.safetensors"), metadata={"format": "pt"}
            )
            shard, size = {}, 0

    for name, shape in _shapes(cfg):
        t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        nbytes = t.numel() * 2
        if size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = t
        size += nbytes
    flush()
    total = len(names)
    weight_map = {}
    for i, shard_names in enumerate(names, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        (model_dir / f"model-{i:05d}.safetensors").rename(model_dir / final)
        weight_map.update({n: final for n in shard_names})
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def write_adapter(adapter_dir: Path, model_dir: Path, arch: str, rank: int = 16) -> None:
    import torch
    from safetensors.torch import save_file

    if (adapter_dir / "adapter_config.json").is_file():
        return
    adapter_dir.mkdir(parents=True, exist_ok=True)
    shapes = dict(_shapes(ARCHS[arch]))
    gen = torch.Generator().manual_seed(1)
    state = {}
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEAR:
            out_f, in_f = shape
            key = "base_model.model." + module
            state[key + ".lora_A.weight"] = torch.randn((rank, in_f), generator=gen) * 0.01
            state[key + ".lora_B.weight"] = torch.randn((out_f, rank), generator=gen) * 0.01
    save_file(state, str(adapter_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": LINEAR,
        "base_model_name_or_path": str(model_dir),
    }
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


def build_tokenizer(llama_src: Path, out: Path) -> Path:
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_src / "models"), gguf_file="ggml-vocab-qwen2.gguf")
    tok.save_pretrained(str(out))
    return out


def warm_cache(model_dir: Path) -> None:
    for f in sorted(model_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(64 * 1024 * 1024):
                pass


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    # Popen + os.wait4 on the pid: rusage of exactly that child (ru_maxrss in KiB on Linux).
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss / 1024**2, out


def child_main(args: argparse.Namespace) -> None:
    if args.child == "ours-convert":
        from engine.export.convert import convert_to_gguf
        from engine.export.merge import load_lora

        merger = load_lora(args.adapter) if args.adapter else None
        convert_to_gguf(args.model, args.out, outtype="bf16", merger=merger)
    elif args.child == "quantize":
        from engine.export.quantize import quantize_gguf

        quantize_gguf(args.src, args.out, args.quant, nthread=args.threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp-source", type=Path, default=os.environ.get("LLAMA_CPP_SOURCE"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/backprop-export-bench"))
    ap.add_argument("--small", action="store_true", help="Qwen2.5-0.5B architecture instead of 7B")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-llama-cpp", action="store_true", help="measure ours only")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the GGUF files written")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    if args.llama_cpp_source is None or not (args.llama_cpp_source / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(
            "--llama-cpp-source must be llama.cpp's source folder (with convert_hf_to_gguf.py, models/)"
        )
    arch = "0.5b" if args.small else "7b"
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = build_tokenizer(args.llama_cpp_source, work / "tokenizer-qwen2")
    model_dir = work / f"qwen2.5-{arch}-random"
    write_model(model_dir, arch, tok)
    adapter_dir = work / f"lora-{arch}"
    write_adapter(adapter_dir, model_dir, arch)
    print(f"model files ready in {time.perf_counter() - t0:.0f} s: {model_dir}", flush=True)
    warm_cache(model_dir)
    me = [sys.executable, str(Path(__file__).resolve())]
    out = work / "out"
    out.mkdir(exist_ok=True)
    rows: list[tuple[str, float, float]] = []

    w, r, _ = run_child(
        me
        + [
            "--child",
            "ours-convert",
            "--model",
            str(model_dir),
            "--adapter",
            str(adapter_dir),
            "--out",
            str(out / "ours-bf16.gguf"),
        ]
    )
    rows.append(("ours: merge LoRA + convert (bf16)", w, r))
    w, r, _ = run_child(me + ["--child", "quantize", "--src", str(out / "ours-bf16.gguf"), "--out", str(out / f"ours-{args.quant}.gguf"), "--quant", args.quant, "--threads", str(args.threads)])  # fmt: skip
    rows.append((f"ours: quantize {args.quant}", w, r))
    if not args.skip_llama_cpp:
        w, r, _ = run_child([sys.executable, str(args.llama_cpp_source / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "bf16", "--outfile", str(out / "llamacpp-bf16.gguf")])  # fmt: skip
        rows.append(("llama.cpp: convert_hf_to_gguf.py (bf16, no merge)", w, r))
        w, r, _ = run_child(me + ["--child", "quantize", "--src", str(out / "llamacpp-bf16.gguf"), "--out", str(out / f"llamacpp-{args.quant}.gguf"), "--quant", args.quant, "--threads", str(args.threads)])  # fmt: skip
        rows.append((f"llama.cpp: quantize {args.quant}", w, r))

    print(
        f"\nQwen2.5-{arch} architecture, random bf16 weights, {os.cpu_count()} CPUs, quantizer threads {args.threads}"
    )
    print(f"| {'step':<52} | {'wall s':>8} | {'peak RSS GiB':>12} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 14}|")
    for name, w, r in rows:
        print(f"| {name:<52} | {w:8.1f} | {r:12.2f} |")
    ours = [x for x in rows if x[0].startswith("ours")]
    print(
        f"| {'ours total (merge + convert + quantize)':<52} | {sum(x[1] for x in ours):8.1f} | {max(x[2] for x in ours):12.2f} |"
    )
    theirs = [x for x in rows if x[0].startswith("llama.cpp")]
    if theirs:
        print(
            f"| {'llama.cpp total (convert + quantize)':<52} | {sum(x[1] for x in theirs):8.1f} | {max(x[2] for x in theirs):12.2f} |"
        )
    for f in sorted(out.glob("*.gguf")):
        print(f"{f.name}: {f.stat().st_size / 1024**3:.2f} GiB")
        if not args.keep_outputs:
            f.unlink()


if __name__ == "__main__":
    main()
