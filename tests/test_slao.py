"""The SLAO math (engine.training.slao): initialisation, merges, metrics, and PEFT round trips."""

from __future__ import annotations

import json

import pytest
import torch

from engine.models import adapters
from engine.models.adapters import Adapter, LoraFactors
from engine.training import slao


def _random_adapter(gen: torch.Generator, modules=("m.a", "m.b"), r=4, n=12, m=10) -> Adapter:
    return {
        key: LoraFactors(A=torch.randn(r, n, generator=gen), B=torch.randn(m, r, generator=gen))
        for key in modules
    }


def test_orthogonal_init_has_orthonormal_rows_and_keeps_directions():
    gen = torch.Generator().manual_seed(0)
    a_prev = torch.randn(6, 40, generator=gen)
    a = slao.orthogonal_init_A(a_prev)
    assert a.shape == a_prev.shape and a.dtype == a_prev.dtype
    torch.testing.assert_close(a @ a.T, torch.eye(6), atol=1e-5, rtol=0)
    # Sign fix: each new row points the same way as the old row it came from.
    assert torch.all(torch.diagonal(a_prev @ a.T) > 0)
    # Same row space: projecting the old rows onto the new ones loses nothing.
    torch.testing.assert_close(a_prev @ a.T @ a, a_prev, atol=1e-4, rtol=1e-4)


def test_orthogonal_init_of_rank_deficient_A_is_still_orthonormal():
    a_prev = torch.zeros(3, 8)
    a_prev[0, 0] = 2.0  # rows 1 and 2 are zero (a pruned or untrained adapter)
    a = slao.orthogonal_init_A(a_prev)
    torch.testing.assert_close(a @ a.T, torch.eye(3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rank r"):
        slao.orthogonal_init_A(torch.randn(9, 8))


def test_effective_weights_after_five_runs_match_the_paper():
    # The paper's weights of each fine-tuned B after five merges with λ = 1/√i. B_ft(k) = k-th
    # basis direction, so the merged B's entries are the weights of each fine-tuned B.
    expected = [0.034, 0.083, 0.160, 0.276, 0.447]
    merged = None
    for i in range(1, 6):
        b = torch.zeros(5, 1)
        b[i - 1, 0] = 1.0
        ft = {"w": LoraFactors(A=torch.ones(1, 3) * i, B=b)}
        merged = slao.slao_merge(merged, ft, i, "inv_sqrt")
    assert merged is not None
    assert [round(float(x), 3) for x in merged["w"].B[:, 0]] == expected
    torch.testing.assert_close(merged["w"].A, torch.ones(1, 3) * 5)  # A is replaced, not merged
    # With λ = 1/i the merge is a plain average.
    merged = None
    for i in range(1, 5):
        b = torch.zeros(4, 1)
        b[i - 1, 0] = 1.0
        merged = slao.slao_merge(merged, {"w": LoraFactors(A=torch.ones(1, 3), B=b)}, i, "inv")
    assert merged is not None
    assert merged["w"].B[:, 0].tolist() == pytest.approx([0.25] * 4)


def test_slao_init_takes_the_finetuned_B_and_orthogonalises_A():
    gen = torch.Generator().manual_seed(1)
    ft = _random_adapter(gen)
    init = slao.slao_init(ft, qr_init=True)
    for key in ft:
        torch.testing.assert_close(init[key].B, ft[key].B)
        torch.testing.assert_close(init[key].A @ init[key].A.T, torch.eye(4), atol=1e-5, rtol=0)
    plain = slao.slao_init(ft, qr_init=False)
    for key in ft:
        torch.testing.assert_close(plain[key].A, ft[key].A)
        assert plain[key].A.data_ptr() != ft[key].A.data_ptr()  # a copy, training can't alias it


def test_linear_merge_is_exact_when_runs_share_A_and_optimal_otherwise():
    gen = torch.Generator().manual_seed(2)
    shared_a = torch.randn(4, 12, generator=gen)
    runs = [{"w": LoraFactors(A=shared_a, B=torch.randn(10, 4, generator=gen))} for _ in range(3)]
    merged, report = slao.linear_merge(runs)
    want = sum(r["w"].delta() for r in runs) / 3
    torch.testing.assert_close(merged["w"].delta(), want, atol=1e-5, rtol=1e-5)
    assert report.exact and report.max_relative_error < 1e-6
    assert merged["w"].rank == 4

    runs = [_random_adapter(gen, modules=("w",)) for _ in range(3)]  # rank of the average: 10 > 4
    merged, report = slao.linear_merge(runs)
    average = sum(r["w"].delta() for r in runs) / 3
    b_best, a_best, err = slao.dense_truncate(average, 4)
    assert not report.exact
    assert report.max_relative_error == pytest.approx(err, rel=1e-6)
    torch.testing.assert_close(merged["w"].delta(), (b_best @ a_best).float(), atol=1e-4, rtol=1e-4)


def _full_rank(*deltas: list[list[float]]) -> list[slao.Adapter]:
    # A = I makes ΔW = B, and r = n keeps every merge exactly representable.
    return [{"w": LoraFactors(A=torch.eye(2), B=torch.tensor(d))} for d in deltas]


def test_ties_merge_trims_elects_signs_and_averages_agreeing_entries():
    runs = _full_rank([[1.0, -2.0], [3.0, 0.0]], [[3.0, 1.0], [-1.0, 0.0]])
    merged, _ = slao.ties_merge(runs, density=1.0)
    torch.testing.assert_close(
        merged["w"].delta(), torch.tensor([[2.0, -2.0], [3.0, 0.0]]), atol=1e-5, rtol=0
    )
    runs = _full_rank([[1.0, -2.0], [3.0, 0.0]], [[3.0, 1.5], [-1.0, 0.0]])
    merged, report = slao.ties_merge(runs, density=0.5)  # keeps the two largest entries of each
    torch.testing.assert_close(
        merged["w"].delta(), torch.tensor([[3.0, -2.0], [3.0, 0.0]]), atol=1e-5, rtol=0
    )
    assert report.exact


def test_dare_merge_without_drop_is_the_average_and_is_reproducible():
    runs = _full_rank([[1.0, -2.0], [3.0, 4.0]], [[3.0, 1.0], [-1.0, 0.0]])
    merged, _ = slao.dare_merge(runs, drop=0.0)
    torch.testing.assert_close(
        merged["w"].delta(), torch.tensor([[2.0, -0.5], [1.0, 2.0]]), atol=1e-5, rtol=0
    )
    gen = torch.Generator().manual_seed(3)
    runs = [_random_adapter(gen, modules=("w",)) for _ in range(2)]
    first, _ = slao.dare_merge(runs, drop=0.5, seed=7)
    again, _ = slao.dare_merge(runs, drop=0.5, seed=7)
    torch.testing.assert_close(first["w"].delta(), again["w"].delta())
    with pytest.raises(ValueError, match="drop probability"):
        slao.dare_merge(runs, drop=1.0)


def test_dare_merge_keeps_or_drops_whole_entries_and_rescales_the_survivors():
    """Each entry of the merge is the mean of the runs' entries, each kept (×1/(1−p)) or dropped."""
    gen = torch.Generator().manual_seed(8)
    runs = [_random_adapter(gen, modules=("w",), r=4, n=6, m=5) for _ in range(2)]
    merged, report = slao.dare_merge(runs, drop=0.5, seed=1, rank=5)  # rank 5 = full: no truncation
    assert report.exact
    d1, d2, got = runs[0]["w"].delta(), runs[1]["w"].delta(), merged["w"].delta()
    options = torch.stack([torch.zeros_like(d1), d1, d2, d1 + d2])  # (kept1·d1 + kept2·d2)·2/2
    assert bool((options - got).abs().min(dim=0).values.max() < 1e-4)
    assert 0 < int((got.abs() < 1e-6).sum()) < got.numel()  # some entries dropped in both, not all


def test_state_dict_round_trip_and_clear_errors():
    gen = torch.Generator().manual_seed(4)
    state = {
        "base_model.model.x.q_proj.lora_A.default.weight": torch.randn(2, 6, generator=gen),
        "base_model.model.x.q_proj.lora_B.default.weight": torch.randn(5, 2, generator=gen),
        "base_model.model.head.modules_to_save.default.weight": torch.randn(3, 3, generator=gen),
    }
    factors, other, style = adapters.split_lora_state(state)
    assert list(factors) == ["base_model.model.x.q_proj"] and style == "lora_A.default.weight"
    assert list(other) == ["base_model.model.head.modules_to_save.default.weight"]
    assert adapters.join_lora_state(factors, other, style).keys() == state.keys()
    with pytest.raises(ValueError, match="A without B"):
        adapters.split_lora_state({"p.lora_A.weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="no LoRA weights"):
        adapters.split_lora_state({"p.weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="different ranks"):
        slao.slao_merge(
            {"w": LoraFactors(A=torch.zeros(2, 3), B=torch.zeros(4, 2))},
            {"w": LoraFactors(A=torch.zeros(3, 3), B=torch.zeros(4, 3))},
            2,
        )


def test_forgetting_metrics_follow_the_definitions():
    r = [[0.9, None, None], [0.6, 0.8, None], [0.5, 0.7, 0.95]]
    got = slao.forgetting_metrics(r)
    assert got["average"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert got["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert got["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert got["plasticity"] == pytest.approx((0.9 + 0.8 + 0.95) / 3)
    # Losses: rising loss on an old task is forgetting (negative BWT, positive forgetting).
    loss = slao.forgetting_metrics([[1.0, None], [1.5, 0.5]], higher_is_better=False)
    assert loss["backward_transfer"] == pytest.approx(-0.5)
    assert loss["forgetting"] == pytest.approx(0.5)
    assert loss["average"] == pytest.approx(1.0)
    assert slao.forgetting_metrics([[0.3]])["backward_transfer"] is None


def test_forward_transfer_and_intransigence_follow_the_definitions():
    # Full matrix: R[t][t+1] is task t+1 scored before it is trained on (the super-diagonal).
    r = [[0.9, 0.3, 0.1], [0.6, 0.8, 0.2], [0.5, 0.7, 0.95]]
    base, independent = [0.05, 0.1, 0.15], [0.95, 0.9, 0.9]
    got = slao.forgetting_metrics(r, base_scores=base, independent_scores=independent)
    assert got["forward_transfer"] == pytest.approx(((0.3 - 0.1) + (0.2 - 0.15)) / 2)
    assert got["intransigence"] == pytest.approx(((0.95 - 0.9) + (0.9 - 0.8) + (0.9 - 0.95)) / 3)
    assert got["average"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)  # the first four are unchanged
    # Only asked-for references appear (the series' results keep their keys).
    plain = slao.forgetting_metrics(r)
    assert "forward_transfer" not in plain and "intransigence" not in plain
    # Losses: a task whose loss fell below the base's before training on it is positive transfer,
    # and a series loss above the independent adapter's is positive intransigence.
    loss = slao.forgetting_metrics(
        [[1.0, 2.0], [1.5, 0.5]],
        higher_is_better=False,
        base_scores=[3.0, 2.5],
        independent_scores=[0.8, 0.4],
    )
    assert loss["forward_transfer"] == pytest.approx(0.5)
    assert loss["intransigence"] == pytest.approx(((1.0 - 0.8) + (0.5 - 0.4)) / 2)
    assert slao.forgetting_metrics([[0.3]], base_scores=[0.1])["forward_transfer"] is None  # needs 2 tasks


def test_forward_transfer_needs_the_super_diagonal_and_one_reference_per_task():
    lower = [[0.9, None], [0.6, 0.8]]
    with pytest.raises(ValueError, match=r"R\[0\]\[1\] is missing"):
        slao.forgetting_metrics(lower, base_scores=[0.0, 0.0])
    with pytest.raises(ValueError, match="one reference score per task"):
        slao.forgetting_metrics(lower, independent_scores=[0.9])


def test_saved_merged_adapter_loads_in_peft_as_base_plus_scaled_BA(tmp_path):
    """The deliverable is an ordinary PEFT folder: peft gives W0 + s·B_m·A_m, exactly."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = Qwen2ForCausalLM(config).eval()
    base.save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(Qwen2ForCausalLM.from_pretrained(tmp_path / "base"), lora)
    peft_model.save_pretrained(tmp_path / "template")
    adapter_config = json.loads((tmp_path / "template" / adapters.ADAPTER_CONFIG).read_text())
    template, other, _ = adapters.split_lora_state(get_peft_model_state_dict(peft_model))
    assert len(template) == 4  # 2 layers × (q_proj, down_proj)

    gen = torch.Generator().manual_seed(5)
    merged = None
    finetuned = None
    for i in range(1, 4):  # three "runs": random fine-tuned factors of the right shapes
        start = slao.slao_init(finetuned, qr_init=True) if finetuned else template
        finetuned = {
            k: LoraFactors(
                A=f.A + 0.1 * torch.randn(f.A.shape, generator=gen), B=torch.randn(f.B.shape, generator=gen)
            )
            for k, f in start.items()
        }
        merged = slao.slao_merge(merged, finetuned, i)
    assert merged is not None
    # The series' own path to the deliverable: factors into the peft model, then save_pretrained.
    adapters.write_factors(peft_model, merged, other)
    peft_model.save_pretrained(tmp_path / "merged")
    s = adapter_config["lora_alpha"] / adapter_config["r"]
    assert s == 3.0
    loaded = PeftModel.from_pretrained(
        Qwen2ForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "merged"
    )
    loaded.eval()
    ids = torch.randint(0, 64, (2, 7), generator=gen)
    with torch.no_grad():
        peft_logits = loaded(input_ids=ids).logits
    folded = loaded.merge_and_unload()
    base_modules = dict(base.named_modules())
    for name, module in folded.named_modules():
        key = f"base_model.model.{name}"
        if key not in merged:
            continue
        want = base_modules[name].weight + s * merged[key].B @ merged[key].A
        torch.testing.assert_close(module.weight, want, atol=1e-6, rtol=1e-6)

    # And the outputs equal a base model whose weights were updated by hand.
    manual = Qwen2ForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        for name, module in manual.named_modules():
            key = f"base_model.model.{name}"
            if key in merged:
                module.weight += s * merged[key].B @ merged[key].A
        torch.testing.assert_close(peft_logits, manual(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    with pytest.raises(RuntimeError, match="size mismatch"):  # factors of another rank do not fit
        bad = {k: LoraFactors(A=f.A[:2], B=f.B[:, :2]) for k, f in merged.items()}
        adapters.write_factors(peft_model, bad)
    loaded_back, _ = adapters.load_factors(tmp_path / "merged")
    assert adapters.read_adapter_config(tmp_path / "merged")["r"] == 4
    torch.testing.assert_close(loaded_back[next(iter(merged))].B, next(iter(merged.values())).B)
