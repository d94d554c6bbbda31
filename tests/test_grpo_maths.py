"""GRPO's maths is trl's: advantages and loss (and its gradients, and the KL) of the engine's step equal
trl's GRPOTrainer's on the same batch and policy, fp32 on the CPU, within 1e-5.

trl generates its own completions; here its generation is replaced by fixed completions (the one thing
changed), so that both sides score, normalise and differentiate the very same tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine.contract.grpo import GrpoSettings
from engine.rewards.scoring import build_rewards, score
from engine.training.grpo_batch import collate_completions
from engine.training.grpo_loss import advantages, completion_logps, policy_loss

G = 4  # completions per prompt
MICRO = 4  # completions per micro-batch (trl: per_device_train_batch_size)
MAX_LEN = 12
TEMPERATURE = 0.7


def _model(tiny_model_dir: Path) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, config)  # random A and B: the policy differs from the reference


def _rows() -> list[dict[str, Any]]:
    return [
        {"prompt": [{"role": "user", "content": "What is 2+2? Answer in a box."}], "answer": "4"},
        {"prompt": [{"role": "user", "content": "And 3+4?"}], "answer": "7"},
    ]


def _completions(tokenizer: Any) -> list[list[int]]:
    """G completions per prompt, of different lengths (some ending in the end-of-turn token, some cut)."""
    texts = [r"\boxed{4}", "four", r"\boxed{5} no", "4", r"\boxed{7}", "seven", "7", r"\boxed{7}"]
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: MAX_LEN - 1]
        out.append(ids + [eot] if i % 3 != 2 else ids)
    return out


def _trl_step(model: Any, tokenizer: Any, rewards: list[Any], settings: dict[str, Any], tmp: Path) -> Any:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp), num_generations=G, per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=2 * G // MICRO, max_completion_length=MAX_LEN,
        temperature=TEMPERATURE, report_to=[], use_cpu=True, bf16=False, logging_steps=1,
        reward_weights=[r.weight for r in rewards], **settings,
    )  # fmt: skip
    funcs = [r.fn for r in rewards]
    trainer = GRPOTrainer(
        model=model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(_rows()),
        processing_class=tokenizer,
    )  # fmt: skip
    with torch.no_grad():  # the policy moves away from trl's reference (its "ref" copy of the adapter)
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    fixed = _completions(tokenizer)
    trainer._generate_single_turn = lambda *a, **k: (fixed, None)  # the only change: these completions
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    model.train()
    inputs = [row for row in _rows() for _ in range(G)]
    return trainer, trainer._generate_and_score_completions(inputs)


def _grads(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "settings",
    [
        {"loss_type": "dapo", "beta": 0.0, "scale_rewards": "group"},
        {"loss_type": "dapo", "beta": 0.04, "scale_rewards": "group"},
        {"loss_type": "grpo", "beta": 0.1, "scale_rewards": "batch"},
        {"loss_type": "dr_grpo", "beta": 0.0, "scale_rewards": "none"},
        {"loss_type": "bnpo", "beta": 0.02, "scale_rewards": "group"},
    ],
    ids=lambda s: f"{s['loss_type']}-beta{s['beta']}-{s['scale_rewards']}",
)
def test_advantages_loss_gradients_and_kl_equal_trls(
    tiny_model_dir: Path, tmp_path: Path, settings: dict[str, Any]
) -> None:
    from transformers import AutoTokenizer
    from trl.trainer.utils import use_adapter

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = _model(tiny_model_dir)
    grpo = GrpoSettings(
        rewards=[
            {"name": "answer", "weight": 1.0},
            {"name": "format", "pattern": r"\\boxed\{.*\}", "weight": 0.5},
        ]
    )
    rewards = build_rewards(grpo.rewards, MAX_LEN)
    trainer, out = _trl_step(model, tokenizer, rewards, settings, tmp_path)

    # The same prompts and completions, as trl tokenized them
    prompt_ids = [
        row[m.bool()].tolist() for row, m in zip(out["prompt_ids"], out["prompt_mask"], strict=True)
    ]
    completion_ids = [
        row[m.bool()].tolist() for row, m in zip(out["completion_ids"], out["completion_mask"], strict=True)
    ]
    assert completion_ids == _completions(tokenizer)
    rows = [row for row in _rows() for _ in range(G)]
    texts = [
        [{"role": "assistant", "content": tokenizer.decode(c, skip_special_tokens=True)}]
        for c in completion_ids
    ]
    scores = score(
        rewards, [r["prompt"] for r in rows], texts, completion_ids, {"answer": [r["answer"] for r in rows]}
    )
    per_func = torch.tensor([[scores.per_function[r.label][i] for r in rewards] for i in range(len(rows))])
    ours = advantages(per_func, torch.tensor([r.weight for r in rewards]), G, settings["scale_rewards"])
    torch.testing.assert_close(ours.advantages, out["advantages"], atol=1e-5, rtol=0)
    print(
        f"\n{settings}: rewards {ours.rewards.tolist()}\n  advantages {[round(a, 4) for a in ours.advantages.tolist()]}"
    )

    # trl's loss over the step's micro-batches, and its gradients
    model.zero_grad()
    trl_loss = 0.0
    for start in range(0, len(rows), MICRO):
        micro = {
            k: (v[start : start + MICRO] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in out.items()
        }
        loss = trainer._compute_loss(model, micro)
        loss.backward()
        trl_loss += loss.item()
    trl_grads = _grads(model)
    trl_kl = trainer._metrics["train"].get("kl", [])

    # the engine's
    model.zero_grad()
    step_tokens = sum(len(c) for c in completion_ids)
    our_loss, our_kl = 0.0, []
    for start in range(0, len(rows), MICRO):
        b = collate_completions(
            prompt_ids[start : start + MICRO], completion_ids[start : start + MICRO], 0, "cpu"
        )
        args = (b.input_ids, b.position_ids, b.where, b.targets, b.mask, TEMPERATURE)
        ref = None
        if settings["beta"]:  # trl's reference for a model that comes with an adapter: a frozen copy, "ref"
            with torch.no_grad(), use_adapter(model, "ref"):
                ref = completion_logps(model, *args)
            trl_ref = out["ref_per_token_logps"][start : start + MICRO, : b.mask.shape[1]]
            torch.testing.assert_close(ref, trl_ref * b.mask, atol=1e-5, rtol=0)
        logps = completion_logps(model, *args)
        part = policy_loss(
            logps, b.mask, ours.advantages[start : start + MICRO], ref, beta=settings["beta"],
            loss_type=settings["loss_type"], step_tokens=step_tokens, step_completions=len(rows),
            max_completion_length=MAX_LEN,
        )  # fmt: skip
        part.loss.backward()
        our_loss += part.loss.item()
        if part.kl_sum is not None:
            our_kl.append(part.kl_sum.item() / b.completion_tokens)
    print(f"  loss: trl {trl_loss:.8f}, engine {our_loss:.8f}; kl: trl {trl_kl}, engine {our_kl}")
    assert our_loss == pytest.approx(trl_loss, abs=1e-5)
    our_grads = _grads(model)
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert our_kl == pytest.approx(trl_kl, abs=1e-5)
    if settings["beta"]:
        assert min(our_kl) > 1e-4  # the policy differs from the reference: the KL term is exercised


def test_a_lora_on_the_output_head_counts_in_the_log_probs_and_the_loss(tiny_model_dir: Path) -> None:
    """lora_target_modules with lm_head: the head's adapter is not in its ``.weight``, so the losses from
    hidden states would leave it out; they use the model's own head instead (engine.training.loss)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from engine.training.loss import causal_lm_loss_sum, supports_hidden_state_loss

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    model = get_peft_model(base, config)
    assert not supports_hidden_state_loss(model)
    ids = torch.randint(3, 200, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    logits = model(input_ids=ids, position_ids=positions).logits.float()
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    torch.testing.assert_close(causal_lm_loss_sum(model, ids, positions, targets), expected)
    b = collate_completions([ids[0, :5].tolist()], [ids[0, 5:].tolist()], 0, "cpu")
    got = completion_logps(model, b.input_ids, b.position_ids, b.where, b.targets, b.mask, 1.0)
    want = torch.log_softmax(logits[0, 4:11], dim=-1).gather(1, ids[0, 5:].unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(got[0], want)
