"""CUDA graphs of the training step (engine.training.cuda_graphs) and the fixed shapes they need.

On the CPU these tests check what the graphs rely on, with the real code on a tiny model in fp32:
padding a micro-batch to a fixed shape changes neither its loss nor its gradients, a step with
graphs asked for where capture cannot happen trains exactly like the eager step, and the reasons
for not using graphs. Capture itself needs a GPU: the last test runs there (skipped here), and the
speed is measured by benchmarks/profile_step.py, never asserted.
"""

from __future__ import annotations

import pytest
import torch

from engine.training import fused_lora
from engine.training.batching import IGNORE, StaticShapes
from engine.training.cuda_graphs import StepGraphs, why_not
from engine.training.fast_step import loss_sum, prepare_batches, run_step
from engine.training.loop import Tokenized
from engine.training.step import StepInputs
from engine.training.varlen_attention import VARLEN_FLAG, varlen_attention

_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


def _peft_model(tiny_model_dir, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).to(device)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():  # peft starts B at zero; a non-zero B exercises every term
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    fused_lora.fuse_lora_layers(model)
    model.__dict__[VARLEN_FLAG] = True  # varlen attention (the CPU reference on the CPU)
    return model


def _data(lengths: list[int], seed: int = 3) -> Tokenized:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(10, 200, (n,), generator=g).tolist() for n in lengths]
    labels = [list(x) for x in ids]
    labels[1] = [IGNORE] * 5 + labels[1][5:]  # a prompt part without targets
    return Tokenized(ids, labels, dropped=0)


def test_static_shapes_are_few_and_never_smaller_than_the_batch():
    packed = StaticShapes(max_seq_length=1085, packing=True, loss_chunk=441)
    assert packed.width(300) == packed.width(1085) == 1088  # packed rows: always the full width
    unpacked = StaticShapes(max_seq_length=2048, packing=False, loss_chunk=441)
    assert [unpacked.width(n) for n in (1, 100, 129, 700, 2048)] == [128, 128, 256, 1024, 2048]
    cells = 4 * 1088
    sizes = {packed.loss_positions(n, cells) for n in range(cells + 1)}
    assert len(sizes) <= 5  # zero and at most four quarters, in whole loss chunks
    assert all(packed.loss_positions(n, cells) >= n for n in range(0, cells + 1, 7))
    assert [packed.boundaries(n, 4) for n in (1, 2, 5, 8, 9)] == [1, 2, 8, 8, 16]  # pieces unknown
    known = StaticShapes(max_seq_length=1085, packing=True, loss_chunk=441, pieces_per_row=6)
    assert {known.boundaries(n, 4) for n in range(2, 26)} == {25}  # one count for the whole run


@pytest.mark.parametrize("packing", [True, False])
def test_padding_to_a_fixed_shape_changes_neither_loss_nor_gradients(tiny_model_dir, packing):
    model = _peft_model(tiny_model_dir)
    data = _data([20, 13, 31, 8, 30, 9])
    rows = [[0, 1], [2, 3], [4, 5]] if packing else [[0], [2], [4]]
    shapes = StaticShapes(max_seq_length=64 if packing else 200, packing=packing, loss_chunk=16)

    def loss_and_grads(shapes):
        [b] = prepare_batches(rows, data, 3, 0, "cpu", varlen=True, shapes=shapes)
        model.zero_grad(set_to_none=True)
        with varlen_attention(model):
            loss = loss_sum(model, b)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return b, loss.detach(), grads

    plain, ref_loss, ref_grads = loss_and_grads(None)
    padded, loss, grads = loss_and_grads(shapes)
    width = padded.input_ids.shape[1]
    assert width == (64 if packing else 128) > plain.input_ids.shape[1]
    assert padded.n_targets == plain.n_targets < padded.gather_index.numel()
    if packing:  # boundaries padded with zero-length pieces; rows of one example take causal SDPA
        cu = padded.attn_kwargs["cu_seq_lens_q"]
        assert cu.numel() == shapes.boundaries(cu.numel(), 3) and padded.attn_kwargs["max_length_q"] == width
    else:
        assert padded.attn_kwargs == {}
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], rtol=1e-5, atol=1e-6), n


def test_graphs_asked_for_where_capture_cannot_happen_train_exactly_like_the_eager_step(tiny_model_dir):
    """On the CPU the capture fails (no CUDA stream): graphs switch off, say why, and every
    micro-batch, padded or not, runs eagerly with the same losses and weights as the plain step."""
    data = _data([20, 13, 31, 8, 30, 9, 17, 22], seed=5)
    steps = [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[0, 1], [2, 3]]]

    def train(use_graphs: bool):
        model = _peft_model(tiny_model_dir)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        graphs = StepGraphs(model, "cpu", 64, True, pieces_per_row=3) if use_graphs else None
        losses = []
        for rows in steps:
            losses.append(run_step(StepInputs(model, opt, rows, data, 1, 0, "cpu", None, 1e9, graphs)).loss)
        weights = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        return losses, weights, graphs

    ref_losses, ref_weights, _ = train(False)
    losses, weights, graphs = train(True)
    assert losses == pytest.approx(ref_losses, abs=1e-5)
    for a, b in zip(weights, ref_weights, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert graphs.failure and graphs.captured == 0 and graphs.replays == 0 and graphs.eager == 6
    assert graphs.shapes.pieces_per_row == 3  # two examples and the padding, from the plan
    assert "off after a failed capture" in graphs.summary()


def test_why_graphs_are_not_used_is_said(tiny_model_dir):
    model = _peft_model(tiny_model_dir)

    class On:
        cuda_graphs = True

    class Off:
        cuda_graphs = False

    assert why_not(model, "cpu", Off, distributed=False) == "train.cuda_graphs is off"
    assert why_not(model, "cpu", On, distributed=False) == "not on a CUDA GPU"
    assert "several devices" in why_not(model, "cuda:0", On, distributed=True)
    assert why_not(model, "cuda:0", On, distributed=False, method_step=True) == (  # dpo, kto, orpo, grpo
        "the method's own step is not captured (CUDA graphs serve the next-token step of sft)"
    )
    model.__dict__.pop(VARLEN_FLAG)
    assert "varlen" in why_not(model, "cuda:0", On, distributed=False)
    fused_lora.unfuse_lora_layers(model)
    assert "not every LoRA layer is fused" in why_not(model, "cuda:0", On, distributed=False)


def test_checkpointing_keeps_rng_state_only_where_there_is_dropout(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from engine.contract.spec import LoraSettings
    from engine.training.lora import add_lora

    def preserve(dropout: float) -> bool:
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = add_lora(
            base, LoraSettings(rank=4, dropout=dropout), gradient_checkpointing=True, loaded_info={}
        )
        layer = model.get_base_model().model.layers[0]
        return layer._gradient_checkpointing_func.keywords["preserve_rng_state"]

    assert preserve(0.0) is False and preserve(0.1) is True
    from transformers import GPT2Config, Qwen2Config

    from engine.training.fused_lora import config_has_dropout

    assert config_has_dropout(GPT2Config())  # resid_pdrop/attn_pdrop 0.1 by default
    assert not config_has_dropout(Qwen2Config())  # attention_dropout 0.0


@_GPU
def test_gpu_graphed_steps_train_like_eager_steps(tiny_model_dir):
    """Real capture and replay on the GPU (a bf16 base as a 4-bit load computes in, fp32 LoRA, flash
    varlen): packed rows of varying content in a few padded shapes; losses follow the eager step's
    within bf16 rounding."""
    data = _data([20, 13, 31, 8, 30, 9, 17, 22, 40, 3, 25, 11], seed=7)
    rows = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    steps = [rows[i % 6 : i % 6 + 2] or rows[:2] for i in range(0, 12, 2)] * 2

    def train(use_graphs: bool):
        model = _peft_model(tiny_model_dir, "cuda", torch.bfloat16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
        graphs = StepGraphs(model, "cuda", 64, True, pieces_per_row=3) if use_graphs else None
        out = [
            run_step(StepInputs(model, opt, s, data, 1, 0, "cuda", torch.bfloat16, 1.0, graphs)).loss
            for s in steps
        ]
        return out, graphs

    ref, _ = train(False)
    got, graphs = train(True)
    assert graphs.failure is None, graphs.failure
    assert graphs.captured >= 1 and graphs.replays >= 1
    assert got == pytest.approx(ref, rel=2e-2)
