"""The training fast path against the plain code it replaces, exactly, in fp32 on the CPU.

Each fused piece (fused LoRA forward/backward, sync-free loss gather, varlen attention for packed
rows) runs here on real tiny models and real peft/bitsandbytes layers; the GPU-only kernels (the
flash varlen kernel, the CUDA dequantize buffer) are not reachable on the CPU and the tests check
that the same code falls back to its reference there. Speed is measured on a GPU
(benchmarks/train_speed.py), never asserted here.
"""

from __future__ import annotations

import pytest
import torch

from engine.training import fused_lora
from engine.training.batching import collate
from engine.training.fast_step import loss_sum, prepare_batches
from engine.training.loop import Tokenized
from engine.training.loss import causal_lm_loss_sum
from engine.training.varlen_attention import (
    NAME,
    VARLEN_FLAG,
    cu_seqlens_for_rows,
    flash_varlen_available,
    reference_varlen,
    varlen_attention,
)


def _peft_model(tiny_model_dir, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():  # peft starts B at zero; a non-zero B exercises every term of the maths
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _data(lengths: list[int], seed: int = 3) -> Tokenized:
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(10, 200, (n,), generator=g).tolist() for n in lengths]
    return Tokenized(ids, [list(x) for x in ids], dropped=0)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss_sum(model, batch.input_ids, batch.position_ids, batch.targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_fused_lora_equals_peft_forward_and_backward_on_a_model(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    data = _data([20, 13, 31, 8])
    batch = collate([[0, 1], [2, 3]], data.input_ids, data.labels, pad_id=0)
    ref_loss, ref_grads = _loss_and_grads(model, batch)

    fused, skipped = fused_lora.fuse_lora_layers(model)
    assert fused == 2 * 7 and not skipped  # two decoder layers x seven projections
    loss, grads = _loss_and_grads(model, batch)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name

    fused_lora.unfuse_lora_layers(model)
    again, _ = _loss_and_grads(model, batch)
    assert torch.equal(again, ref_loss)


def test_fused_mlp_equals_peft_and_keeps_no_product(tiny_model_dir):
    """The MLP's activation inside the down projection's node: loss and every LoRA gradient equal peft's
    (fp32); the node keeps gate and up but not their product; unfused, the MLP's own forward is back."""
    from engine.training.fused_mlp import SiluMulLoraLinearFn, fuse_gated_mlps, unfuse_gated_mlps

    model = _peft_model(tiny_model_dir)
    data = _data([20, 13, 31, 8])
    batch = collate([[0, 1], [2, 3]], data.input_ids, data.labels, pad_id=0)
    ref_loss, ref_grads = _loss_and_grads(model, batch)

    fused_lora.fuse_lora_layers(model)
    assert fuse_gated_mlps(model) == 2  # one a decoder layer
    loss, grads = _loss_and_grads(model, batch)
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
    for name, g in grads.items():
        assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name

    mlp = next(m for m in model.modules() if hasattr(m, "down_proj") and hasattr(m, "gate_proj"))
    x = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    out = mlp(x)
    assert type(out.grad_fn).__name__ == f"{SiluMulLoraLinearFn.__name__}Backward"
    kept = {t.shape for t in out.grad_fn.saved_tensors}
    intermediate = model.config.intermediate_size
    assert sum(1 for t in out.grad_fn.saved_tensors if t.shape == (10, intermediate)) == 2  # gate, up
    assert kept <= {(10, intermediate), (10, 4), (4, intermediate), (model.config.hidden_size, 4)}

    with model.disable_adapter():  # DPO's reference pass: the plain MLP with the adapter off
        plain = model.base_model.model(input_ids=batch.input_ids).logits
    unfuse_gated_mlps(model)
    fused_lora.unfuse_lora_layers(model)
    assert "forward" not in mlp.__dict__
    with model.disable_adapter():
        assert torch.allclose(model.base_model.model(input_ids=batch.input_ids).logits, plain)
    again, _ = _loss_and_grads(model, batch)
    assert torch.equal(again, ref_loss)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            id="gpu",  # Liger's SwiGLU kernels where liger-kernel is installed
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_fused_mlp_under_bf16_autocast_is_as_close_to_fp32_as_the_unfused_path(tiny_model_dir, device):
    """bf16 autocast (the GPU's compute dtype): against the same model in fp32, the fused MLP's loss and
    gradients are no further off than the unfused path's (its bf16 rounding, not a new error)."""
    from engine.training.fused_mlp import fuse_gated_mlps

    data = _data([20, 13, 31, 8])
    batch = collate([[0, 1], [2, 3]], data.input_ids, data.labels, pad_id=0).to(device)
    model = _peft_model(tiny_model_dir).to(device)
    fused_lora.fuse_lora_layers(model)
    exact_loss, exact = _loss_and_grads(model, batch)  # fp32
    errors = []
    for with_mlp in (False, True):
        if with_mlp:
            fuse_gated_mlps(model)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, grads = _loss_and_grads(model, batch)
        off = max((grads[n] - g).norm().item() / g.norm().item() for n, g in exact.items())
        errors.append((abs(loss.item() - exact_loss.item()), off))
    (plain_loss, plain_grads), (fused_loss, fused_grads) = errors
    print(
        f"bf16 against fp32: loss {plain_loss:.2e} / {fused_loss:.2e}, worst gradient {plain_grads:.3f} / {fused_grads:.3f}"
    )
    assert fused_loss <= 2 * plain_loss + 1e-3 and fused_grads <= 1.5 * plain_grads + 1e-3


def test_fused_lora_refreshes_its_cast_weights_after_a_fused_optimizer_step(tiny_model_dir):
    """bf16 casts are cached within a step and renewed after it, also with fused AdamW (which
    updates parameters without bumping their version counter: the GPU loop's optimizer)."""
    from engine.training.fast_step import run_step
    from engine.training.step import StepInputs

    model = _peft_model(tiny_model_dir)
    data = _data([16, 16])
    fused_lora.fuse_lora_layers(model)
    layer = next(m for m in model.modules() if "forward" in m.__dict__)
    a = layer.lora_A[layer.active_adapters[0]].weight
    bf = fused_lora._cached_cast(layer, "a", a, torch.bfloat16)
    assert fused_lora._cached_cast(layer, "a", a, torch.bfloat16) is bf  # cached within a step
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    before = a.detach().clone()
    run_step(StepInputs(model, opt, [[0], [1]], data, 2, 0, "cpu", torch.bfloat16, 1.0))
    assert not torch.equal(a.detach(), before)
    fresh = fused_lora._cached_cast(layer, "a", a, torch.bfloat16)
    assert fresh is not bf and torch.equal(fresh, a.detach().to(torch.bfloat16))


def test_fused_lora_under_bf16_autocast_learns_like_peft(tiny_model_dir):
    """Several steps with bf16 autocast and fused AdamW (the GPU's set-up, on the CPU): the fused
    path's losses follow peft's within bf16 noise, on rows seen again (where stale weights show)."""
    from engine.training.fast_step import run_step
    from engine.training.step import StepInputs

    data = _data([24] * 4, seed=5)
    runs = []
    for fused in (False, True):
        model = _peft_model(tiny_model_dir)
        if fused:
            fused_lora.fuse_lora_layers(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, fused=True)
        inputs = StepInputs(model, opt, [[0], [1], [2], [3]], data, 4, 0, "cpu", torch.bfloat16, 1.0)
        runs.append([run_step(inputs).loss for _ in range(6)])
    assert runs[0][-1] < runs[0][0] - 0.4 and runs[1][-1] < runs[1][0] - 0.4  # both learn the rows
    assert runs[1] == pytest.approx(runs[0], abs=0.15)  # bf16 rounding differs, and compounds


def test_fused_lora_on_a_4bit_base_equals_peft_on_cpu():
    """bitsandbytes NF4 base (CPU backend, fp32 compute): fused output and gradients equal peft's."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            dense = torch.nn.Linear(128, 64, bias=True)
            self.proj = bnb.nn.Linear4bit(128, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
            self.proj.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4").to(
                "cpu"
            )
            self.proj.bias = torch.nn.Parameter(dense.bias.data, requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    net = get_peft_model(Net(), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"]))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    assert type(net.base_model.model.proj.base_layer.weight).__name__ == "Params4bit"
    x = torch.randn(3, 5, 128, requires_grad=True)

    def run():
        net.zero_grad(set_to_none=True)
        x.grad = None
        out = net(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
        return out.detach(), x.grad.clone(), grads

    ref_out, ref_dx, ref_grads = run()
    fused, _ = fused_lora.fuse_lora_layers(net)
    assert fused == 1
    out, dx, grads = run()
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(dx, ref_dx, atol=1e-5)
    for n, g in grads.items():
        assert torch.allclose(g, ref_grads[n], rtol=1e-4, atol=1e-5), n


def test_layers_that_cannot_be_fused_keep_peft_forward(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    fused, skipped = fused_lora.fuse_lora_layers(model)
    assert fused == 0 and skipped == {"LoRA dropout": 14}


def test_sync_free_loss_equals_the_plain_loss_with_gradients(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    data = _data([20, 13, 31, 8, 5])
    data.labels[1] = [-100] * 13  # a prompt-only example: no target at all
    rows = [[0, 1], [2], [3, 4]]
    batch = collate(rows, data.input_ids, data.labels, pad_id=0)
    ref_loss, ref_grads = _loss_and_grads(model, batch)

    [dev] = prepare_batches(rows, data, 3, 0, "cpu", varlen=False)
    assert dev.n_targets == batch.target_tokens and dev.attn_kwargs == {}
    model.zero_grad(set_to_none=True)
    loss = loss_sum(model, dev)
    loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref_grads[n], rtol=1e-5, atol=1e-7), n


def test_cu_seqlens_cover_every_piece_of_every_row():
    cu, longest = cu_seqlens_for_rows([[5, 3, 0], [4, 4]])
    assert cu.tolist() == [0, 5, 8, 12, 16] and cu.dtype == torch.int32 and longest == 5


def test_reference_varlen_attends_only_inside_each_example():
    torch.manual_seed(0)
    q, k, v = torch.randn(11, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    cu = torch.tensor([0, 6, 11], dtype=torch.int32)
    out = reference_varlen(q, k, v, cu, 8**-0.5)
    for s, e in ((0, 6), (6, 11)):  # each example alone, keys/values repeated for the query heads
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),
            k[s:e].repeat_interleave(2, 1).transpose(0, 1),
            v[s:e].repeat_interleave(2, 1).transpose(0, 1),
            is_causal=True,
        ).transpose(0, 1)
        assert torch.allclose(out[s:e], alone, atol=1e-6)


def test_packed_loss_with_varlen_attention_equals_the_dense_block_mask_path(tiny_model_dir):
    """CPU: the varlen interface falls back to per-example SDPA; loss and grads equal the masked path."""
    assert not flash_varlen_available("cpu", torch.bfloat16, 16)
    model = _peft_model(tiny_model_dir)
    data = _data([20, 13, 31, 8, 30, 9])
    rows = [[0, 1], [2, 3], [4, 5]]
    batch = collate(rows, data.input_ids, data.labels, pad_id=0)
    ref_loss, ref_grads = _loss_and_grads(model, batch)  # transformers' block-causal mask from positions

    [dev] = prepare_batches(rows, data, 3, 0, "cpu", varlen=True)
    length = batch.input_ids.shape[1]
    assert dev.attn_kwargs["max_length_q"] == 31
    assert dev.attn_kwargs["cu_seq_lens_q"][-1].item() == 3 * length
    cfg = model.config
    model.zero_grad(set_to_none=True)
    with varlen_attention(model):
        assert cfg._attn_implementation == NAME
        loss = loss_sum(model, dev)
        loss.backward()
    assert cfg._attn_implementation == "sdpa"
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, ref_grads[n], rtol=1e-4, atol=1e-5), (
                n
            )  # fp32; max |diff| measured 3e-6


def test_fast_step_loop_with_every_piece_on_matches_the_plain_peft_loop(tiny_model_dir, tmp_path):
    """train_adapter on a fused, varlen-flagged model: same per-step losses as peft's own loop."""
    from engine.contract.events import EventWriter
    from engine.training.loop import train_adapter

    data = _data([24] * 8, seed=2)

    class R:  # the resolved settings train_adapter reads
        steps, learning_rate, warmup_steps, lr_scheduler = 4, 1e-2, 0, "constant"
        micro_batch_size, gradient_accumulation, max_seq_length, packing = 2, 1, 24, False
        rows_per_step = 2  # rows of the step plan (ResolvedTraining's property)
        weight_decay, max_grad_norm, seed, checkpoint_every = 0.0, 1e9, 0, None

    class Tok:
        pad_token_id = 0

    def run(fast: bool) -> list[float]:
        model = _peft_model(tiny_model_dir)
        if fast:
            fused_lora.fuse_lora_layers(model)
            model.__dict__[VARLEN_FLAG] = True
        with EventWriter(tmp_path / f"events-{fast}.jsonl") as ev:
            out = train_adapter(model, Tok(), data, R, device="cpu", events=ev)
        return [h["loss"] for h in out.loss_history]

    assert run(True) == pytest.approx(run(False), abs=1e-5)


def test_the_next_step_collated_ahead_trains_exactly_like_collating_each_step(tiny_model_dir):
    """run_step's ``next_rows``: the next step's batches, collated while the current step runs, give the
    same losses as collating each step when it comes; batches collated for other rows are not used."""
    from engine.training.fast_step import _NEXT_BATCHES, run_step
    from engine.training.step import StepInputs

    data = _data([24, 11, 30, 7, 19, 26, 14, 9], seed=4)
    steps = [[[0, 1], [2]], [[3, 4], [5]], [[6], [7]], [[1], [0, 2]]]

    def train(ahead: bool, wrong: bool = False) -> list[float]:
        model = _peft_model(tiny_model_dir)
        fused_lora.fuse_lora_layers(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for i, rows in enumerate(steps):
            nxt = steps[(i + 2) % 4] if wrong else steps[i + 1] if i + 1 < len(steps) else None
            nxt = nxt if ahead else None
            losses.append(
                run_step(StepInputs(model, opt, rows, data, 2, 0, "cpu", None, 1.0, next_rows=nxt)).loss
            )
            assert (_NEXT_BATCHES in model.__dict__) == (nxt is not None)
        return losses

    ref = train(ahead=False)
    assert train(ahead=True) == ref
    assert train(ahead=True, wrong=True) == ref  # a mismatch is collated again, not reused


def test_backend_setting_maps_onto_the_loader_and_is_validated():
    from pydantic import ValidationError

    from engine.contract.spec import DatasetSettings, FinetuneSpec, TrainSettings
    from engine.training.backend import apply_fast_path, backend_name, unsloth_mode

    def spec(**kw):
        return FinetuneSpec(train=TrainSettings(**kw), dataset=DatasetSettings(path="d.jsonl"))

    assert unsloth_mode(spec(backend="native")) == "never"
    assert unsloth_mode(spec(backend="unsloth")) == "require"
    assert unsloth_mode(spec()) == "auto"  # Unsloth if it imports on a CUDA GPU (never on this CPU)
    with pytest.raises(ValidationError, match="backend"):
        TrainSettings(backend="fast")
    assert (
        backend_name({"path": "unsloth"}) == "unsloth" and backend_name({"path": "transformers"}) == "native"
    )
    assert apply_fast_path(object(), "cpu", {"path": "transformers"}) == []


def test_backend_auto_takes_the_native_path_while_cuda_graphs_are_on(tiny_model_dir):
    """auto's measured rule: the native path with CUDA graphs, at every size (RESULTS v7/v8)."""
    from engine.contract.spec import DatasetSettings, FinetuneSpec, TrainSettings
    from engine.training.backend import auto_prefers_native

    def spec(**kw):
        return FinetuneSpec(
            model=str(tiny_model_dir), train=TrainSettings(**kw), dataset=DatasetSettings(path="d.jsonl")
        )

    why = auto_prefers_native(spec())
    assert why is not None and "CUDA graphs" in why
    big = FinetuneSpec(model="qwen2.5-7b", dataset=DatasetSettings(path="d.jsonl"))
    assert auto_prefers_native(big) is not None  # measured ahead at 7B too
    assert auto_prefers_native(spec(backend="unsloth")) is None
    assert auto_prefers_native(spec(backend="native")) is None  # (native anyway: nothing to weigh)
    assert auto_prefers_native(spec(cuda_graphs=False)) is None  # Unsloth where it imports


def test_compiled_decoder_layers_train_like_eager_ones_fixed_and_packed(tiny_model_dir):
    """train.compile: torch.compile (inductor, CPU) of each checkpointed decoder layer, with fused
    LoRA and varlen attention on: the same per-step losses as eager layers (fp32, to 1e-5: compiled
    kernels sum in another order); fixed-length rows compile once for every layer and step; a
    forward without gradients (evaluation) compiles nothing. Packed rows run the varlen interface's
    CPU reference eager inside the compiled layer (the flash kernel it stands for is GPU-only)."""
    from torch._dynamo.utils import counters

    from engine.training.backend import compile_decoder_layers
    from engine.training.fast_step import run_step
    from engine.training.lora import enable_activation_checkpointing
    from engine.training.step import StepInputs

    def train(rows: list[list[int]], data: Tokenized, compiled: bool) -> tuple[list[float], object]:
        model = _peft_model(tiny_model_dir)
        enable_activation_checkpointing(model.base_model.model)
        fused_lora.fuse_lora_layers(model)
        model.__dict__[VARLEN_FLAG] = True
        if compiled:
            assert compile_decoder_layers(model) == 2
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return [
            run_step(StepInputs(model, opt, rows, data, 2, 0, "cpu", None, 1.0)).loss for _ in range(3)
        ], model

    torch._dynamo.reset()
    counters.clear()
    fixed = _data([24] * 4, seed=2)
    rows = [[0], [1], [2], [3]]
    compiled, model = train(rows, fixed, True)
    assert compiled == pytest.approx(train(rows, fixed, False)[0], abs=1e-5)
    with torch.no_grad():
        loss_sum(model, prepare_batches(rows, fixed, 4, 0, "cpu", varlen=True)[0])
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    # packed: two micro-batches of one layout (row length, pieces, longest piece), so one compile
    packed = _data([20, 12, 32, 10, 22, 32], seed=4)
    rows = [[0, 1], [2], [3, 4], [5]]
    assert train(rows, packed, True)[0] == pytest.approx(train(rows, packed, False)[0], abs=1e-5)


def test_uncompiled_layers_are_the_eager_checkpointed_layers_again(tiny_model_dir):
    """uncompile_decoder_layers restores each layer's own forward and its checkpointing, exactly:
    a benchmark can switch compile on and off on one loaded model (profile_step.py --rounds)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from engine.training.backend import compile_decoder_layers, uncompile_decoder_layers
    from engine.training.fast_step import run_step
    from engine.training.lora import enable_activation_checkpointing
    from engine.training.step import StepInputs

    data = _data([24] * 4, seed=3)
    rows = [[0], [1], [2], [3]]

    def losses(model) -> list[float]:
        init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        out = [run_step(StepInputs(model, opt, rows, data, 2, 0, "cpu", None, 1.0)).loss for _ in range(2)]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(init[n])
        return out

    model = _peft_model(tiny_model_dir)
    enable_activation_checkpointing(model.base_model.model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    eager = losses(model)
    assert compile_decoder_layers(model) == 2 and not any(m.gradient_checkpointing for m in layers)
    assert uncompile_decoder_layers(model) == 2
    assert all(m.gradient_checkpointing and "forward" not in m.__dict__ for m in layers)
    assert losses(model) == eager  # the same eager code: bit for bit


_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


@_GPU
def test_gpu_flash_varlen_kernel_equals_the_reference_forward_and_backward():
    from engine.training.varlen_attention import _FlashVarlen

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    lens = [300, 17, 1024, 5, 700]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    n = sum(lens)
    q = torch.randn(n, 28, 128, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(n, 4, 128, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(n, 4, 128, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(n, 28, 128, device=dev, dtype=dt)
    assert flash_varlen_available(dev, dt, 128)
    out = _FlashVarlen.apply(q, k, v, cu, max(lens), 128**-0.5)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = reference_varlen(q.float(), k.float(), v.float(), cu, 128**-0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.float())
    assert (out.float() - ref).abs().max() < 2e-2
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a.float() - b.float()).abs().max() < 5e-2 * max(1.0, b.float().abs().max().item())


@_GPU
def test_gpu_fused_lora_on_nf4_equals_peft_under_autocast():
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            dense = torch.nn.Linear(1024, 512, bias=True)
            self.proj = bnb.nn.Linear4bit(
                1024, 512, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4"
            )
            self.proj.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
            self.proj.bias = torch.nn.Parameter(dense.bias.data.to(torch.bfloat16), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x)

    net = get_peft_model(Net().cuda(), LoraConfig(r=16, lora_alpha=32, target_modules=["proj"]))
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.randn(4, 256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run():
        net.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x)
        out.float().pow(2).mean().backward()
        return (
            out.detach().float(),
            x.grad.float(),
            {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad},
        )

    ref_out, ref_dx, ref_g = run()
    assert fused_lora.fuse_lora_layers(net)[0] == 1
    out, dx, g = run()
    assert (out - ref_out).abs().max() < 3e-2 * ref_out.abs().max()
    assert (dx - ref_dx).abs().max() < 3e-2 * ref_dx.abs().max()
    for n, t in g.items():
        assert t.dtype == torch.float32
        assert (t - ref_g[n]).abs().max() < 3e-2 * ref_g[n].abs().max(), n


def test_backend_unsloth_without_a_gpu_is_a_clear_error(tiny_model_dir):
    from engine.contract.spec import DatasetSettings, FinetuneSpec, TrainSettings
    from engine.models.presets import ModelError
    from engine.training.base_model import load_for_training

    spec = FinetuneSpec(
        model=str(tiny_model_dir),
        train=TrainSettings(backend="unsloth"),
        dataset=DatasetSettings(path="d.jsonl"),
    )
    with pytest.raises(ModelError, match="backend is 'unsloth'.*CUDA GPU.*'auto' or 'native'"):
        load_for_training(spec, "cpu")


def test_profile_step_benchmark_reports_kernels_and_host_time_in_its_cpu_smoke_mode(tmp_path):
    """benchmarks/profile_step.py --tiny --profile --rounds 2: the plain and fast steps on the same rows from the
    same init (equal losses on the CPU, where 'fast' is the same step without the GPU-only pieces), a
    torch.profiler table and a cProfile breakdown of the host's Python for each."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(root / "benchmarks" / "profile_step.py"), "--tiny", "--model-dir", str(tmp_path / "m"),
        "--steps", "1", "--warmup", "1", "--seq-len", "32", "--batch", "2", "--variants", "plain,fast",
        "--profile", "--rounds", "2", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=root, capture_output=True, timeout=600)
    report = json.loads((out / "profile_step-fixed-mb2.json").read_text())
    assert report["parity_max_abs_loss_diff"]["fast"] == 0.0
    for variant in ("plain", "fast"):
        rounds = report["variants"][variant]["rounds_tokens_per_s"]  # interleaved rounds, median reported
        assert len(rounds) == 2 and min(rounds) <= report["variants"][variant]["tokens_per_s"] <= max(rounds)
        host = report["variants"][variant]["host"]
        assert host["step_s_under_cprofile"] > 0 and host["top_own_time"]
        assert "run_backward" in (out / f"pyprofile-{variant}.txt").read_text()  # the backward pass is in it
        assert (out / f"profile-{variant}.txt").read_text().strip()
