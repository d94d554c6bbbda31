"""Export inputs that must fail early with a message that says what to do (no llama.cpp needed).

Uses the offline tiny preset model (conftest ``tiny_model_dir``); the tests run in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.contract.spec import (
    DatasetSettings,
    ExportSpec,
    FinetuneSpec,
    JobResult,
    write_result,
    write_spec,
)
from engine.export.convert import ConversionError, convert_to_gguf
from engine.export.merge import load_lora
from engine.export.source import SourceError, resolve_source
from engine.export.vocab import TokenizerExportError, detect_pre_tokenizer
from engine.models.adapters import AdapterError


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir: Path, test_cache_dir: Path) -> Path:
    out = test_cache_dir / "export-errors-adapter"
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(str(out))
    return out


def test_tiny_model_converts_with_merge(tiny_model_dir: Path, tiny_adapter: Path, tmp_path: Path) -> None:
    import gguf

    merger = load_lora(tiny_adapter)
    res = convert_to_gguf(tiny_model_dir, tmp_path / "t.gguf", outtype="f16", merger=merger)
    assert res.merged_tensors == 4 and res.vocab.pre == "qwen2" and res.arch == "qwen2"
    reader = gguf.GGUFReader(res.path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert "<|im_start|>" in reader.fields["tokenizer.chat_template"].contents()
    assert not (tmp_path / "t.gguf.partial").exists()


def test_adapter_for_another_base_is_refused(
    tiny_model_dir: Path, tiny_adapter: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, bad)
    from safetensors.torch import load_file, save_file

    state = load_file(str(bad / "adapter_model.safetensors"))
    save_file(
        {k.replace("q_proj", "qkv_proj"): v for k, v in state.items()}, str(bad / "adapter_model.safetensors")
    )
    with pytest.raises(AdapterError, match="base model does not have"):
        convert_to_gguf(tiny_model_dir, tmp_path / "x.gguf", merger=load_lora(bad))
    assert not (tmp_path / "x.gguf").exists()


def test_dora_and_missing_weights_are_explained(tiny_adapter: Path, tmp_path: Path) -> None:
    bad = tmp_path / "dora"
    shutil.copytree(tiny_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="DoRA"):
        load_lora(bad)
    (bad / "adapter_model.safetensors").unlink()
    cfg["use_dora"] = False
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        load_lora(bad)


def test_unsupported_architecture(tmp_path: Path, tiny_model_dir: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="not supported"):
        convert_to_gguf(model, tmp_path / "x.gguf")


def test_unknown_pre_tokenizer() -> None:
    with pytest.raises(TokenizerExportError, match="convert_hf_to_gguf"):
        detect_pre_tokenizer({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[a-z]+"}}})
    assert detect_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"


def _job(root: Path, status: str, artifacts: dict[str, str] | None) -> Path:
    job = root / f"job-{status}"
    job.mkdir()
    write_spec(job, FinetuneSpec(model="tiny", dataset=DatasetSettings(path="d.jsonl")))
    if artifacts is not None:
        write_result(job, JobResult(status=status, kind="finetune", artifacts=artifacts))  # type: ignore[arg-type]
    return job


def test_source_errors(tmp_path: Path, tiny_model_dir: Path, tiny_adapter: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        resolve_source(ExportSpec(source=str(tmp_path / "nope")))
    with pytest.raises(SourceError, match="has not finished"):
        resolve_source(ExportSpec(source=str(_job(tmp_path, "running", None))))
    with pytest.raises(SourceError, match="ended failed"):
        resolve_source(ExportSpec(source=str(_job(tmp_path, "failed", {}))))
    with pytest.raises(SourceError, match="no adapter artifact"):
        resolve_source(ExportSpec(source=str(_job(tmp_path, "succeeded", {}))))
    # an adapter folder names its base; base_model= overrides it
    src = resolve_source(ExportSpec(source=str(tiny_adapter), base_model=str(tiny_model_dir)))
    assert src.adapter_dir == tiny_adapter.resolve() and src.base_dir == tiny_model_dir.resolve()
    # a plain model folder exports as it is
    assert resolve_source(ExportSpec(source=str(tiny_model_dir))).adapter_dir is None
