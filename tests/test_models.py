"""Presets, resolving model names, shapes without weights, and loading the tiny model on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.contract.spec import DatasetSettings, FinetuneSpec, TrainSettings
from engine.models import presets as models
from engine.models.presets import PRESETS, ModelError, model_shape, privacy_environment, resolve_model
from engine.models.shape import ModelShape
from engine.planning.memory import estimate_memory
from engine.training import base_model
from engine.training.base_model import load_for_inference, load_for_training, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_dir(tiny_model_dir: Path, test_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The session's tiny model, also reachable as the preset "tiny" (BACKPROP_HOME points at its cache)."""
    monkeypatch.setenv("BACKPROP_HOME", str(test_cache_dir))
    assert tiny_model_dir.parent == test_cache_dir / "models"
    return tiny_model_dir


def _spec(model: str, quantization: str = "auto", **kw) -> FinetuneSpec:
    return FinetuneSpec(
        model=model, quantization=quantization, dataset=DatasetSettings(path="unused.jsonl"), **kw
    )


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "tiny"])
def test_preset_shape_matches_transformers_parameter_count(name):
    """The preset's numbers, built into a real config on the meta device, give the published size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = PRESETS[name].shape
    config = AutoConfig.for_model(
        p.model_type,
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads,
        vocab_size=p.vocab_size,
        max_position_embeddings=p.max_context,
        tie_word_embeddings=p.tie_word_embeddings,
        **({"head_dim": p.hidden_size // p.num_heads} if p.model_type != "qwen2" else {}),
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    real = sum(t.numel() for t in model.parameters())
    assert p.params == real
    assert real / 1e9 == pytest.approx(PRESETS[name].params_b, rel=0.01)
    assert model_shape(name) == p


def test_preset_vram_needs_come_from_the_estimate():
    def need(name: str, quant: str) -> float:  # LoRA rank 16, one 2048-token row, as preset_fits reports
        return estimate_memory(PRESETS[name].shape, quant, 16, 1, 2048, device="cuda").total_gib

    assert 5.5 < need("qwen2.5-7b", "4bit") < 9.0
    assert 14.0 < need("qwen2.5-7b", "16bit") < 22.0
    for name in PRESETS:
        assert need(name, "4bit") < need(name, "16bit")
    assert need("qwen2.5-0.5b", "4bit") < need("qwen2.5-3b", "4bit") < need("qwen2.5-7b", "4bit")


def test_known_architecture_numbers():
    q7 = PRESETS["qwen2.5-7b"].shape
    assert (
        q7.hidden_size,
        q7.intermediate_size,
        q7.num_layers,
        q7.num_heads,
        q7.num_kv_heads,
        q7.vocab_size,
    ) == (
        3584,
        18944,
        28,
        28,
        4,
        152064,
    )
    assert PRESETS["llama3.2-1b"].shape.head_dim == 64
    assert PRESETS["mistral-7b"].hf_id == "mistralai/Mistral-7B-Instruct-v0.3"


# ---------------------------------------------------------------- resolving names


def test_resolve_presets_folders_and_hub_names(tiny_dir, tmp_path):
    r = resolve_model("Qwen2.5-7B")  # case-insensitive
    assert r.source == "preset" and r.target == "Qwen/Qwen2.5-7B-Instruct" and r.local_path is None
    assert (tiny_dir / "config.json").is_file()
    t = resolve_model("tiny")
    assert t.local_path == tiny_dir and t.target == str(tiny_dir)
    local = resolve_model(str(tiny_dir))
    assert local.source == "local" and local.local_path == tiny_dir.resolve()
    hub = resolve_model("someone/some-model")
    assert hub.source == "hub" and hub.target == "someone/some-model"
    assert resolve_model("gpt2").source == "hub"  # a legacy bare hub name


def test_bad_names_give_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no folder"):
        resolve_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelError, match="no folder"):
        resolve_model("./not-here")
    with pytest.raises(ModelError, match="did you mean 'qwen2.5-7b'"):
        resolve_model("qwen2.5-7")
    with pytest.raises(ModelError, match="required"):
        resolve_model("  ")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="LoRA adapter folder"):
        resolve_model(str(adapter))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="GGUF files are for inference"):
        resolve_model(str(gguf))
    with pytest.raises(ModelError, match="not a valid hub name"):
        resolve_model("owner/bad name")


def test_unreachable_hub_gives_an_actionable_message():
    """The hub is unreachable here; HF_HUB_OFFLINE makes that immediate instead of minutes of retries."""
    code = (
        "from engine.models.presets import model_shape, ModelError\n"
        "from engine.training.base_model import load_tokenizer\n"
        "for name in ('Qwen/Qwen2.5-0.5B-Instruct', 'someone/not-cached'):\n"
        "    for f in (load_tokenizer, model_shape):\n"
        "        try:\n"
        "            f(name)\n"
        "            print('OK', f.__name__, name)\n"
        "        except ModelError as e:\n"
        "            print('ERR', f.__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 4, out.stderr[-3000:]
    preset_tok, preset_shape, other_tok, other_shape = lines
    # A preset's hub id: its shape is known without the hub; its tokenizer must be downloaded.
    assert preset_shape.startswith("OK model_shape")
    assert preset_tok.startswith("ERR load_tokenizer")
    assert (
        "download" in preset_tok.lower() and "local folder" in preset_tok and "HF_HUB_OFFLINE" in preset_tok
    )
    for line in (other_tok, other_shape):
        assert line.startswith("ERR") and "someone/not-cached" in line and "tiny" in line


# ---------------------------------------------------------------- shapes without weights


def test_model_shape_reads_config_without_weights(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    shape = model_shape(str(tiny_dir))
    assert shape.hidden_size == cfg["hidden_size"] and shape.vocab_size == cfg["vocab_size"]
    assert shape.num_layers == cfg["num_hidden_layers"] and shape.num_kv_heads == cfg["num_key_value_heads"]
    assert shape.attention_bias is True  # Qwen2 has q/k/v biases
    assert model_shape("tiny") == shape
    # The count from the safetensors headers equals the formula for this architecture.
    assert shape.params == ModelShape(**{**shape.to_dict(), "params": 0}).params
    # The tiny preset's nominal numbers follow engine.models.tiny.
    p = PRESETS["tiny"].shape
    assert (p.hidden_size, p.num_layers, p.intermediate_size, p.num_heads) == (
        shape.hidden_size,
        shape.num_layers,
        shape.intermediate_size,
        shape.num_heads,
    )


def test_model_shape_from_other_config_styles():
    gpt2 = model_shape(
        {
            "model_type": "gpt2",
            "n_embd": 768,
            "n_layer": 12,
            "n_head": 12,
            "vocab_size": 50257,
            "n_positions": 1024,
        }
    )
    assert gpt2.intermediate_size == 3072 and gpt2.num_kv_heads == 12 and gpt2.max_context == 1024
    nested = model_shape(
        {
            "model_type": "x",
            "text_config": {
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 100,
            },
        }
    )
    assert nested.hidden_size == 64
    with pytest.raises(ModelError, match="lacks hidden_size"):
        model_shape({"model_type": "bert", "vocab_size": 10})


# ---------------------------------------------------------------- loading


def _forward_ok(model, tokenizer) -> torch.Tensor:
    ids = tokenizer("Hello there, what is 2 + 3?", return_tensors="pt").input_ids
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    assert out.logits.shape[:2] == ids.shape
    return out.loss


def test_load_tiny_fp32_on_cpu(tiny_dir):
    loaded = load_for_training(_spec("tiny", "auto"), "cpu")
    info = loaded.info
    assert info["quantization"] == "fp32" and info["compute_dtype"] == "float32"
    assert info["path"] == "transformers" and info["device"] == "cpu"
    assert info["attn_implementation"] == "sdpa" and loaded.model.config._attn_implementation == "sdpa"
    assert info["parameters"] == model_shape("tiny").params
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    _forward_ok(loaded.model, loaded.tokenizer)
    assert loaded.tokenizer.chat_template


def test_load_tiny_4bit_on_cpu_with_bitsandbytes(tiny_dir):
    import bitsandbytes as bnb

    loaded = load_for_training(_spec(str(tiny_dir), "4bit"), "cpu")
    model = loaded.model
    assert loaded.info["quantization"] == "nf4" and loaded.info["compute_dtype"] == "float32"
    assert loaded.info["model_source"] == "local"
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quantisation
    # Embeddings and the output head stay unquantised.
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert loaded.info["parameters"] == model_shape("tiny").params
    # The QLoRA path itself: a LoRA adapter on the 4-bit layers gets gradients on CPU.
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    loss = _forward_ok(peft_model, loaded.tokenizer)
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_load_tiny_16bit_on_cpu(tiny_dir):
    loaded = load_for_training(_spec("tiny", "16bit"), "cpu")
    assert loaded.info["quantization"] == "bf16"
    assert loaded.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    _forward_ok(loaded.model, loaded.tokenizer)


def test_unsloth_rules_on_cpu(tiny_dir):
    with pytest.raises(ModelError, match="train.backend is 'unsloth'.*CUDA GPU"):
        load_for_training(_spec("tiny", train=TrainSettings(backend="unsloth")), "cpu")
    loaded = load_for_training(_spec("tiny", train=TrainSettings(backend="native")), "cpu")
    assert loaded.info["path"] == "transformers" and "native" in loaded.info["path_reason"]
    auto = base_model._unsloth_decision("auto", "cpu", "fp32")
    assert auto[0] is False and "CPU" in auto[1]
    if (
        importlib.util.find_spec("unsloth") is None
    ):  # as here: on a GPU, the refusal names the extra's command
        with pytest.raises(ModelError, match=r"not installed.*'unsloth' extra.*pip install.*\[unsloth\]"):
            base_model._unsloth_decision("require", "cuda:0", "nf4")
        auto = base_model._unsloth_decision("auto", "cuda:0", "nf4")
        assert auto[0] is False and "not installed" in auto[1]


def test_load_for_inference_and_tokenizer(tiny_dir, tmp_path):
    model, tok = load_for_inference("tiny", device="cpu")
    assert not model.training
    with torch.no_grad():
        _forward_ok(model, tok)
    assert load_tokenizer(str(tiny_dir)).eos_token == tok.eos_token
    with pytest.raises(ModelError, match="not a LoRA adapter folder"):
        load_for_inference("tiny", adapter=str(tmp_path), device="cpu")


def test_privacy_environment_keeps_user_choices(monkeypatch):
    for name in models.PRIVACY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DO_NOT_TRACK", "0")  # the user's own value wins
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    set_now = privacy_environment()
    assert os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    assert os.environ["UNSLOTH_DISABLE_STATISTICS"] == "1"
    assert os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] == "1"
    assert os.environ["DO_NOT_TRACK"] == "0" and "DO_NOT_TRACK" not in set_now
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert privacy_environment() == {}  # idempotent
