"""GRPO's graphed sampler (engine.training.graph_sampling) on the tiny model, on the CPU: its static-cache
decode loop gives transformers' ``generate``'s tokens (greedy, left-padded prompts of several lengths,
padding after an end of sequence), with a LoRA model as a GRPO job has it; a model it cannot serve goes
back to ``generate`` and the job says why. The CUDA graph around the decode step is captured only on a GPU
(tests/test_cuda_graphs.py runs there); here the same step runs eagerly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.training.graph_sampling import sample_chunk, usable
from engine.training.grpo_generate import Sampling, generate_completions

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [20, 21, 22], [30]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lora_model(tiny_model_dir: Path, attention: str = "sdpa") -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, attn_implementation=attention
    )
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config).eval()  # random B: the adapter changes what the model writes


def _generate(model: Any, prompts: list[list[int]], new: int, eos: list[int]) -> list[list[int]]:
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    config = GenerationConfig(do_sample=False, max_new_tokens=new, pad_token_id=0, eos_token_id=eos)
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return [row + [0] * (new - len(row)) for row in out[:, width:].tolist()]


def test_the_static_cache_loop_writes_what_generate_writes(tiny_model_dir: Path) -> None:
    model = _lora_model(tiny_model_dir)
    assert usable(model) is None
    with torch.no_grad():
        reference = _generate(model, PROMPTS, 20, eos=[-1])
        # an end of sequence that greedy decoding reaches in one row: that row is padded after it
        eos = [reference[1][5]]
        ended = _generate(model, PROMPTS, 20, eos=eos)
        # a temperature this low makes sampling the argmax (the logits of this model are far apart)
        ours = sample_chunk(
            model, PROMPTS, max_new_tokens=20, temperature=1e-6, top_p=1.0, pad_id=0, eos_ids=[-1],
            device="cpu", dtype=None,
        )  # fmt: skip
        ours_ended = sample_chunk(
            model, PROMPTS, max_new_tokens=20, temperature=1e-6, top_p=1.0, pad_id=0, eos_ids=eos,
            device="cpu", dtype=None,
        )  # fmt: skip
    print(f"\ngenerate: {reference[1]}\nstatic cache loop: {ours[1]}")
    assert ours == reference
    assert ours_ended == ended and ended[1][6:] == [0] * 14  # padded after its end of sequence


def test_nucleus_sampling_keeps_to_the_top_tokens(tiny_model_dir: Path) -> None:
    model = _lora_model(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        greedy = sample_chunk(
            model, PROMPTS, max_new_tokens=6, temperature=1e-6, top_p=1.0, pad_id=0, eos_ids=[-1],
            device="cpu", dtype=None,
        )  # fmt: skip
        tiny_nucleus = sample_chunk(
            model, PROMPTS, max_new_tokens=6, temperature=1.0, top_p=1e-6, pad_id=0, eos_ids=[-1],
            device="cpu", dtype=None,
        )  # fmt: skip
    assert tiny_nucleus == greedy  # a nucleus of one token is the argmax


def test_a_model_the_sampler_cannot_serve_goes_back_to_generate(tiny_model_dir: Path) -> None:
    model = _lora_model(tiny_model_dir, attention="eager")
    assert "eager" in str(usable(model))
    told: list[str] = []
    sampling = Sampling(num_generations=2, max_new_tokens=4, temperature=1.0, top_p=1.0, graphs=True)
    out = generate_completions(
        model, PROMPTS[:2], sampling, batch=4, pad_id=0, eos_ids=[-1], device="cpu", on_fallback=told.append
    )
    assert len(out.completion_ids) == 4 and all(len(c) == 4 for c in out.completion_ids)
    assert told and "not 'sdpa'" in told[0] and sampling.graphs is False  # said once, then generate


def test_a_job_samples_through_it_when_asked(tiny_model_dir: Path) -> None:
    model = _lora_model(tiny_model_dir)
    told: list[str] = []
    sampling = Sampling(num_generations=3, max_new_tokens=5, temperature=1.0, top_p=0.9, graphs=True)
    out = generate_completions(
        model, PROMPTS[:2], sampling, batch=4, pad_id=0, eos_ids=[-1], device="cpu", on_fallback=told.append
    )
    assert not told and sampling.graphs is True
    assert len(out.completion_ids) == 6 and out.truncated == [True] * 6 and out.batch == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_gpu_graphed_sampling_writes_what_generate_writes_before_and_after_an_update(
    tiny_model_dir: Path,
) -> None:
    """On a GPU the decode step is captured and replayed, through the fused LoRA layers (fp32: the same
    tokens as ``generate`` exactly); after the weights change (an optimizer step), the next call captures
    anew and follows them."""
    from engine.training import fused_lora

    model = _lora_model(tiny_model_dir).to("cuda")
    fused_lora.fuse_lora_layers(model)
    prompts = [p * 3 for p in PROMPTS]
    for _ in range(2):
        with torch.no_grad():
            reference = _generate(model, prompts, 24, eos=[-1])
            ours = sample_chunk(
                model, prompts, max_new_tokens=24, temperature=1e-6, top_p=1.0, pad_id=0, eos_ids=[-1],
                device="cuda", dtype=None,
            )  # fmt: skip
        assert ours == reference
        with torch.no_grad():  # what an optimizer step does to the adapter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p) * 0.5)
        fused_lora.weights_updated()
