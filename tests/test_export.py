"""GGUF export end to end on tiny Qwen2 (tied embeddings) and Llama (untied) models.

Each family is exported once per session from a finished-job folder, with every quantization and
the adapter GGUF; the tests then check the result, the files and the events. llama.cpp's own
converter (from its source tree, see tests/export_models.py) is the reference for tokenizer
metadata and tensors. Ollama registration runs against a local stand-in for its HTTP API (no
Ollama server can be installed here) for Qwen2, and against a closed port for Llama.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from export_models import (
    FAMILIES,
    OllamaStandIn,
    build_adapter,
    build_job,
    build_model,
    build_tokenizer,
    closed_port_url,
    llama_cpp_source,
    read_gguf,
)

from engine.contract.events import EventWriter, read_events
from engine.contract.spec import EVENTS_FILE, ExportSpec, JobResult

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (pip install 'backprop-mcp[export]')"
)
gguf = pytest.importorskip("gguf")

QUANTS = ["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]


@dataclass
class Assets:
    tokenizer: Path
    model: Path
    adapter: Path
    job: Path


@pytest.fixture(scope="session")
def llama_src() -> Path:
    src = llama_cpp_source()
    if src is None:
        pytest.skip(
            "llama.cpp source tree not found (set LLAMA_CPP_SOURCE; see tests/export_models.py): it provides the "
            "real tokenizers (ggml-vocab-*.gguf) and the reference converter convert_hf_to_gguf.py"
        )
    return src


@pytest.fixture(scope="session")
def assets(
    test_cache_dir: Path, llama_src: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Assets]:
    cache = test_cache_dir / "export"
    cache.mkdir(parents=True, exist_ok=True)
    jobs = tmp_path_factory.mktemp("jobs")
    out = {}
    for fam in FAMILIES:
        tok = build_tokenizer(cache, fam, llama_src)
        model = build_model(cache, fam, tok)
        adapter = build_adapter(cache, fam, model)
        out[fam] = Assets(tok, model, adapter, build_job(jobs, fam, model, adapter))
    return out


@dataclass
class Exported:
    job_dir: Path
    result: JobResult
    stand_in: OllamaStandIn | None


@pytest.fixture(scope="session")
def exported(assets: dict[str, Assets], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    from engine.export.run import run_export

    out = {}
    for fam in FAMILIES:
        job_dir = tmp_path_factory.mktemp(f"export-{fam}")
        stand_in = OllamaStandIn() if fam == "qwen2" else None
        host = stand_in.url if stand_in else closed_port_url()
        spec = ExportSpec(
            source=str(assets[fam].job),
            quantizations=QUANTS,  # type: ignore[arg-type]
            adapter_gguf=True,
            register_ollama=True,
            ollama_name=f"tiny-{fam}",
            ollama_host=host,
            system_prompt="You are a test." if fam == "qwen2" else None,
        )
        with EventWriter(job_dir / EVENTS_FILE) as events:
            if stand_in:
                with stand_in:
                    result = run_export(spec, job_dir, events)
            else:
                result = run_export(spec, job_dir, events)
        out[fam] = Exported(job_dir, result, stand_in)
    return out


@pytest.fixture(scope="session")
def reference_models(assets: dict[str, Assets]) -> dict[str, tuple]:
    from transformers import AutoTokenizer

    from engine.export.verify import load_reference

    return {
        fam: (load_reference(a.model, a.adapter), AutoTokenizer.from_pretrained(str(a.tokenizer)))
        for fam, a in assets.items()
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("quant", QUANTS)
def test_each_quantization_exports_loads_and_passes_parity(exported: dict, family: str, quant: str) -> None:
    from engine.export.verify import ARGMAX_THRESHOLDS

    res = exported[family].result
    path = Path(res.artifacts[f"gguf_{quant}"])
    assert path.is_file()
    assert res.metrics["files"][quant]["bytes"] == path.stat().st_size
    parity = res.metrics["parity"][quant]
    assert parity["passed"] and parity["tokenizer_match"], parity["message"]
    assert parity["positions"] >= 40
    expected_min = {"f16": 1.0, "q8_0": 1.0, "q4_k_m": 0.95}.get(quant, ARGMAX_THRESHOLDS[quant])
    assert parity["argmax_agreement"] >= expected_min
    # k-quants must really be k-quants (sizes are multiples of 256), not a silent fallback
    types = {t for t, _, _ in read_gguf(path)[1].values()}
    wanted = {
        "q4_k_m": "Q4_K",
        "q5_k_m": "Q5_K",
        "q6_k": "Q6_K",
        "q8_0": "Q8_0",
        "q4_0": "Q4_0",
        "bf16": "BF16",
    }
    if quant in wanted:
        assert wanted[quant] in types, types


def test_sizes_shrink_with_bits(exported: dict) -> None:
    files = exported["qwen2"].result.metrics["files"]
    assert files["f16"]["bytes"] > files["q8_0"]["bytes"] > files["q6_k"]["bytes"] > files["q4_k_m"]["bytes"]


@pytest.mark.parametrize("family", FAMILIES)
def test_stage_events_and_result(exported: dict, family: str) -> None:
    ex = exported[family]
    events, _ = read_events(ex.job_dir / EVENTS_FILE)
    stages = [e.name for e in events if e.type == "stage"]
    assert stages == ["merge", "convert", "quantize", "verify", "register"]
    assert any(e.type == "progress" and e.stage == "convert" for e in events)
    metrics = ex.result.metrics
    assert metrics["convert"]["merged_tensors"] == 14  # 7 linear layers x 2 blocks
    assert Path(ex.result.artifacts["modelfile"]).is_file()
    assert Path(ex.result.artifacts["adapter_gguf"]).is_file()
    assert not list(ex.job_dir.glob("gguf/*.intermediate.gguf"))
    if family == "qwen2":  # registered with the stand-in server
        assert ex.result.status == "succeeded", ex.result.error
        assert metrics["ollama_run"] == "ollama run tiny-qwen2"
        (req,) = ex.stand_in.created
        assert req["files"] == {"tiny-qwen2-q4_k_m.gguf": next(iter(ex.stand_in.blobs))}
        assert req["system"] == "You are a test." and "<|im_end|>" in req["parameters"]["stop"]
        modelfile = Path(ex.result.artifacts["modelfile"]).read_text()
        assert modelfile.startswith("FROM ./tiny-qwen2-q4_k_m.gguf\nTEMPLATE ")
    else:  # no Ollama reachable: files kept, the error says how to register by hand
        assert ex.result.status == "failed"
        assert ex.result.error["type"] == "OllamaUnavailable"
        assert "ollama create tiny-llama -f" in ex.result.error["message"]
        assert Path(ex.result.artifacts["gguf_q4_k_m"]).is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_from_f16_equals_transformers(
    exported: dict, reference_models: dict, family: str
) -> None:
    import torch

    from engine.export.verify import open_gguf

    model, tok = reference_models[family]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Count to five."}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, pad_token_id=0)[
            0, len(ids) :
        ]
    llm = open_gguf(exported[family].result.artifacts["gguf_f16"])
    try:  # greedy continuation by argmax of llama.cpp's logits (no sampler, no penalties)
        llm.eval(ids)
        ours = []
        for _ in range(16):
            ours.append(int(llm.scores[llm.n_tokens - 1].argmax()))
            llm.eval([ours[-1]])
    finally:
        llm.close()
    assert ours == ref.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_converter_matches_llama_cpp(assets: dict, llama_src: Path, tmp_path: Path, family: str) -> None:
    """Our converter and llama.cpp's convert_hf_to_gguf.py, same model: same metadata, same tensors."""
    from engine.export.convert import convert_to_gguf

    model = assets[family].model
    theirs = tmp_path / "llama-cpp.gguf"
    proc = subprocess.run(
        [
            sys.executable,
            str(llama_src / "convert_hf_to_gguf.py"),
            str(model),
            "--outtype",
            "f16",
            "--outfile",
            str(theirs),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = convert_to_gguf(model, tmp_path / "ours.gguf", outtype="f16").path
    (kv_a, ta), (kv_b, tb) = read_gguf(ours), read_gguf(theirs)
    for kv in (kv_a, kv_b):  # free-form naming: llama.cpp derives a display name and size label
        kv.pop("general.name", None)
        kv.pop("general.size_label", None)
    tokenizer_keys = {k for k in kv_b if k.startswith("tokenizer.")}
    assert {
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.pre",
        "tokenizer.chat_template",
    } <= (tokenizer_keys)
    assert kv_a.keys() == kv_b.keys()
    for key in kv_b:
        assert kv_a[key] == kv_b[key], key
    assert ta.keys() == tb.keys()
    for name, (ttype, shape, raw) in tb.items():
        assert ta[name][0] == ttype and ta[name][1] == shape, name
        assert ta[name][2] == raw, name  # bit-identical tensor data


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_gguf_on_base_equals_merged_model(
    assets: dict, exported: dict, reference_models: dict, tmp_path: Path, family: str
) -> None:
    from engine.export.convert import convert_to_gguf
    from engine.export.verify import check_parity

    base = convert_to_gguf(assets[family].model, tmp_path / "base.gguf", outtype="f32").path
    model, tok = reference_models[family]
    report = check_parity(
        base, "f32", model, tok, lora_path=exported[family].result.artifacts["adapter_gguf"]
    )
    assert report.passed and report.argmax_agreement == 1.0, report.message
