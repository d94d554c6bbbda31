"""The preference losses are trl's: the engine's own step (log-probabilities from hidden states in chunks,
engine.training.preference_objectives) against trl's trainers' loss methods on the same batch and policy
(fp32 on the CPU, the tiny model with LoRA): DPOTrainer for every DPO loss type the spec exposes,
KTOTrainer for both KTO loss types (in one forward, and under gradient accumulation: trl's training_step per
micro-batch), trl.experimental.orpo.ORPOTrainer. Losses, the logged figures and the LoRA gradients agree to
1e-5. The reference is the frozen copy trl makes of a PEFT model's adapter
('ref', as for init_adapter) or, for a fresh adapter, the base with the adapter switched off."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.contract.preference import DpoLoss, KtoLoss, PreferenceSettings
from engine.data.preference_tokens import PreferenceTokens
from engine.training.batching import IGNORE
from engine.training.preference_objectives import Compute, mismatched_partners, objective_for
from engine.training.preference_step import step_totals
from engine.training.reference import Reference, reference_logps
from engine.training.token_logps import token_logps

pytest.importorskip("trl")

ATOL = 1e-5
PAIRS = [  # (prompt ids, chosen ids, rejected ids): different lengths, so padding is exercised
    ([5, 6, 7, 8], [9, 10, 11], [12, 13]),
    ([20, 21], [22, 23, 24, 25], [26, 27, 28]),
    ([30, 31, 32], [33], [34, 35, 36, 37, 38]),
]
JUDGED = [([5, 6, 7, 8], [9, 10, 11], True), ([20, 21], [22, 23, 24, 25], False), ([30, 31, 32], [33], True),
          ([40, 41], [42, 43], False)]  # fmt: skip


def _peft_model(tiny_model_dir: Path, fresh: bool = False) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    if not fresh:
        _nudge(model, "")
    return model


def _nudge(model: Any, adapter: str, scale: float = 0.05) -> None:
    """Move the LoRA B factors (all adapters, or one) off zero: policy and reference then differ."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and adapter in name:
                p.add_(torch.randn_like(p) * scale)


def _pairs_data() -> PreferenceTokens:
    ids, labels, prompts, units = [], [], [], []
    for prompt, *answers in PAIRS:
        units.append([len(ids), len(ids) + 1])
        for answer in answers:
            ids.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
            prompts.append(len(prompt))
    return PreferenceTokens(ids, labels, prompts, units)


def _grads(model: Any) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _ours(
    method: str,
    model: Any,
    data: PreferenceTokens,
    settings: PreferenceSettings,
    ref_adapter: str | None,
    micro: int | None = None,
):
    """The engine's loss and figures on every unit of ``data`` as one step (and its backward), in
    micro-batches of ``micro`` units (default: one)."""
    c = Compute(pad_id=0, device="cpu")
    objective = objective_for(method, data, settings, c)
    if objective.needs_reference:
        ref = Reference(model, ref_adapter)
        seqs = objective.reference_sequences()
        objective.set_reference(
            reference_logps(ref, objective.view, seqs, batch=8, pad_id=0, device="cpu", autocast_dtype=None)
        )
    model.train()
    units = list(range(len(data.units)))
    loss, figures, _ = step_totals(objective, model, units, micro or len(units), train=True)
    return loss.item(), objective.means({k: v.item() for k, v in figures.items()}, len(units)), _grads(model)


def _assert_same(
    trl_loss: Any, trl_figures: dict[str, float], trl_grads: dict[str, torch.Tensor], ours: Any
) -> None:
    loss, figures, grads = ours
    assert loss == pytest.approx(trl_loss.item(), abs=ATOL)
    shared = set(trl_figures) & set(figures)
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= shared
    for name in shared:
        assert figures[name] == pytest.approx(trl_figures[name], abs=ATOL), name
    assert grads.keys() == trl_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, trl_grads[name], atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def dpo(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """trl's DPOTrainer on the tiny model with a trained-looking adapter, which it copies as 'ref'."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = _peft_model(tiny_model_dir)
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("dpo")), report_to=[], use_cpu=True, bf16=False,
        per_device_train_batch_size=len(PAIRS),
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=args, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}),
    )  # fmt: skip
    assert set(model.peft_config) == {"default", "ref"}
    _nudge(model, ".default.")  # the policy moves away from its frozen reference
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]
    return trainer, trainer.data_collator(examples)


@pytest.mark.parametrize("loss_type", typing.get_args(DpoLoss))
def test_dpo_loss_equals_trls(dpo: Any, loss_type: str) -> None:
    trainer, batch = dpo
    smoothing = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
    trainer.loss_types, trainer.loss_weights, trainer.beta, trainer.label_smoothing = (
        [loss_type],
        [1.0],
        0.3,
        smoothing,
    )
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    figures, grads = {k: v[-1] for k, v in trainer._metrics["train"].items()}, _grads(trainer.model)
    settings = PreferenceSettings(beta=0.3, loss_type=loss_type, label_smoothing=smoothing)
    ours = _ours("dpo", trainer.model, _pairs_data(), settings, ref_adapter="ref")
    _assert_same(loss, figures, grads, ours)
    assert ours[1]["rewards/accuracies"] == pytest.approx(figures["rewards/accuracies"], abs=ATOL)


def test_dpo_reference_of_a_fresh_adapter_is_the_base_with_it_switched_off(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = DPOTrainer(
        model=base, args=DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    assert set(trainer.model.peft_config) == {"default"}
    _nudge(trainer.model, ".default.")
    batch = trainer.data_collator(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]
    )
    trainer.model.train()
    loss = trainer._compute_loss(trainer.model, batch, False)
    loss.backward()
    figures, grads = {k: v[-1] for k, v in trainer._metrics["train"].items()}, _grads(trainer.model)
    ours = _ours("dpo", trainer.model, _pairs_data(), PreferenceSettings(), ref_adapter=None)
    _assert_same(loss, figures, grads, ours)


@pytest.mark.parametrize("micro", [len(JUDGED), 2], ids=["one-forward", "accumulated"])
@pytest.mark.parametrize("loss_type", typing.get_args(KtoLoss))
def test_kto_loss_equals_trls(tiny_model_dir: Path, tmp_path: Path, loss_type: str, micro: int) -> None:
    """With ``accumulated``, two micro-batches make the step: trl's training_step on each (its loss divided
    by the accumulation steps, z0 measured on that micro-batch alone) against the engine's step."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    model = _peft_model(tiny_model_dir)
    weights = {"desirable_weight": 1.3, "undesirable_weight": 0.7}
    accumulation = len(JUDGED) // micro
    args = KTOConfig(
        output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, beta=0.2, loss_type=loss_type,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation, **weights,
    )  # fmt: skip
    trainer = KTOTrainer(
        model=model, args=args, processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_dict({"prompt": ["a", "b"], "completion": ["b", "c"], "label": [True, False]}),
    )  # fmt: skip
    trainer.current_gradient_accumulation_steps = accumulation  # set by trl's training loop, which we skip
    _nudge(model, ".default.")
    data = PreferenceTokens(
        [p + q for p, q, _ in JUDGED], [[IGNORE] * len(p) + q for p, q, _ in JUDGED], [len(p) for p, _, _ in JUDGED],
        [[i] for i in range(len(JUDGED))], desirable=[good for *_, good in JUDGED],
    )  # fmt: skip
    partner = mismatched_partners(data)  # the engine's mismatched answers are trl's KL completions
    examples = [
        {"prompt_ids": p, "completion_ids": q, "label": good, "KL_completion_ids": JUDGED[partner[i]][1]}
        for i, (p, q, good) in enumerate(JUDGED)
    ]
    if loss_type != "kto":  # apo_zero_unpaired needs no reference point
        for example in examples:
            del example["KL_completion_ids"]
    loss = sum(
        trainer.training_step(model, trainer.data_collator(examples[i : i + micro]))
        for i in range(0, len(examples), micro)
    )
    # what trl logs for the step: the mean of each forward's figures
    figures = {k: sum(v) / len(v) for k, v in trainer._metrics["train"].items()}
    assert len(trainer._metrics["train"]["kl"]) == accumulation
    grads = _grads(model)
    settings = PreferenceSettings(beta=0.2, loss_type=loss_type, **weights)
    ours = _ours("kto", model, data, settings, ref_adapter="ref", micro=micro)
    _assert_same(loss, figures, grads, ours)
    if loss_type == "kto":
        assert ours[1]["kl"] == pytest.approx(figures["kl"], abs=ATOL)


def test_orpo_loss_equals_trls(tiny_model_dir: Path, tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model = _peft_model(tiny_model_dir)
    trainer = ORPOTrainer(
        model=model,
        args=ORPOConfig(
            output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, beta=0.2, max_length=64
        ),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}),
    )

    def padded(rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(map(len, rows))
        return torch.tensor([row + [value] * (width - len(row)) for row in rows])

    batch = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        batch[f"{side}_input_ids"] = padded([pair[0] + pair[k] for pair in PAIRS], 0)
        batch[f"{side}_attention_mask"] = padded([[1] * len(pair[0] + pair[k]) for pair in PAIRS], 0)
        batch[f"{side}_labels"] = padded([[IGNORE] * len(pair[0]) + pair[k] for pair in PAIRS], IGNORE)
    model.train()
    loss, figures = trainer.get_batch_loss_metrics(model, batch)
    loss.backward()
    grads = _grads(model)
    ours = _ours("orpo", model, _pairs_data(), PreferenceSettings(beta=0.2), ref_adapter=None)
    _assert_same(loss, figures, grads, ours)
    for name in ("nll_loss", "log_odds_ratio", "log_odds_chosen", "rewards/accuracies"):
        assert ours[1][name] == pytest.approx(figures[name], abs=ATOL), name


def test_token_logps_in_chunks_equal_full_log_softmax_with_gradients() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, requires_grad=True)
    weight = torch.randn(40_000, 16)  # a frozen head with a large vocabulary: several chunks
    targets = torch.randint(0, 40_000, (300,))
    upstream = torch.randn(300)  # a different weight per token, as a preference loss gives
    (token_logps(hidden, weight, targets) * upstream).sum().backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    full = torch.log_softmax(hidden @ weight.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (full * upstream).sum().backward()
    torch.testing.assert_close(ours, hidden.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(token_logps(hidden, weight, targets), full.detach(), atol=1e-4, rtol=1e-5)
