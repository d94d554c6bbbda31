"""Checkpointed layer inputs offloaded to pinned host memory (engine.training.offload).

The real code on a tiny model: ``add_lora`` with offload wraps every checkpointing layer, and the
steps train exactly as without it: on the CPU, where the hooks leave host tensors alone (the wiring
into transformers' checkpoint call is what is checked there), and on a GPU, where every layer input
really goes to host memory and back (skipped here; it runs in benchmarks/speed_call.sh's part 0).
Memory and speed are measured by benchmarks/profile_step.py (``fast+off``), never asserted.
"""

from __future__ import annotations

import pytest
import torch

from engine.contract.spec import LoraSettings
from engine.data.tokenizing import Tokenized
from engine.training.fast_step import run_step
from engine.training.step import StepInputs

_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def _train(tiny_model_dir, device: str, offload: bool) -> tuple[list[float], dict, object]:
    from transformers import AutoModelForCausalLM

    from engine.training.lora import add_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(device)
    model = add_lora(
        base, LoraSettings(rank=4), gradient_checkpointing=True, loaded_info={}, offload_activations=offload
    )
    with torch.no_grad():  # peft starts B at zero; a non-zero B gives every layer a gradient path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.train()  # (layers checkpoint only in training mode)
    offloader = model.get_base_model().__dict__.get("_engine_offload")
    seen: list[int] = []
    if offloader is not None:
        offloader.min_bytes = 0  # the tiny model's layer inputs are a few KB: move them all
        pack = offloader._pack
        offloader._pack = lambda t: seen.append(1) or pack(t)  # counts what the hooks are given
    g = torch.Generator().manual_seed(5)
    lengths = [30, 17, 44, 9, 26, 38, 12, 21]
    ids = [torch.randint(10, 200, (n,), generator=g).tolist() for n in lengths]
    data = Tokenized(ids, [list(x) for x in ids], dropped=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    steps = ([[0, 1], [2, 3]], [[4, 5], [6, 7]])
    losses = [run_step(StepInputs(model, opt, s, data, 2, 0, device, None, 1.0)).loss for s in steps]
    lora = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert (len(seen) > 0) == offload  # every checkpointed layer's saved inputs went through the hooks
    return losses, lora, offloader


def _same_training(tiny_model_dir, device: str):
    ref_losses, ref_weights, _ = _train(tiny_model_dir, device, offload=False)
    losses, weights, offloader = _train(tiny_model_dir, device, offload=True)
    assert offloader is not None
    # On the CPU the two runs are bitwise the same maths; on a GPU, fp32 SDPA's backward (the
    # memory-efficient kernel) adds in no fixed order, so two identical runs differ in the last bits.
    rel = 1e-6 if device == "cpu" else 1e-4
    assert losses == pytest.approx(ref_losses, rel=rel, abs=1e-7)
    for name, w in ref_weights.items():
        torch.testing.assert_close(weights[name], w, rtol=10 * rel, atol=1e-6)
    return offloader


def test_offloaded_checkpointing_wraps_every_layer_and_trains_the_same_on_the_cpu(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from engine.training.lora import enable_activation_checkpointing
    from engine.training.offload import offload_checkpointed_inputs

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    enable_activation_checkpointing(base)
    layers = base.model.layers
    assert offload_checkpointed_inputs(base) >= len(layers)  # (the decoder itself carries the flag too)
    assert all(m._gradient_checkpointing_func.__name__ == "offloaded_checkpoint" for m in layers)
    offloader = _same_training(tiny_model_dir, "cpu")
    assert offloader.offloaded_bytes == 0  # host tensors are left where they are


@_GPU
def test_gpu_offloaded_inputs_go_to_host_memory_and_train_the_same(tiny_model_dir):
    offloader = _same_training(tiny_model_dir, "cuda")
    assert offloader.offloaded_bytes > 0
