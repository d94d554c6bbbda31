"""Proof that the preference methods learn, on the CPU with the tiny model (tests/preference_tasks.py: the
answer names the colour the prompt asks for). Supervised tuning on noisy demonstrations leaves a model that
answers "blue" to most prompts; DPO and KTO from that adapter (its frozen copy the reference), and ORPO from
the base on the same prompts' pairs, each reach a held-out reward accuracy over its threshold and follow the
rule in more held-out prompts (greedy generation) than the supervised model alone. Both numbers are printed.
KTO's reward accuracy is the share of held-out answers on their label's side of its reference point z0 (it
has no pairs to compare), a harder bar than a pair's, hence its lower threshold.

The jobs run in this process (engine.jobs.dispatch.run_recipe, what the worker runs) on one CPU thread: on a
small shared machine more threads only wait for each other.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from preference_tasks import follows_rule, write_task

from engine.contract.events import EventWriter, read_events
from engine.contract.preference import PreferenceSettings
from engine.contract.spec import DatasetSettings, FinetuneSpec, LoraSettings, TrainSettings
from engine.jobs.dispatch import run_recipe

# method -> (held-out reward accuracy it must reach, steps, learning rate, starts from the sft adapter)
METHODS = {"dpo": (0.9, 80, 2e-3, True), "kto": (0.65, 80, 1e-3, True), "orpo": (0.9, 120, 3e-3, False)}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return write_task(tmp_path_factory.mktemp("colours"))


def _run(tiny: Path, job_dir: Path, data: Path, eval_fraction: float = 0.0, **settings: Any) -> Any:
    dataset = DatasetSettings(path=str(data), eval_fraction=eval_fraction)
    spec = FinetuneSpec(model=str(tiny), lora=LoraSettings(rank=8), dataset=dataset, **settings)
    job_dir.mkdir(parents=True)
    with EventWriter(job_dir / "events.jsonl") as events:
        result = run_recipe(spec, job_dir, events, lambda: False)
    assert result.status == "succeeded"
    return result


def _rule_followed(tiny: Path, adapter: str, held_out: list[tuple[str, str]]) -> int:
    """Held-out prompts whose greedy answer follows the rule."""
    from engine.data.tokenizing import render_prompt
    from engine.training.base_model import load_for_inference

    model, tok = load_for_inference(str(tiny), adapter=adapter, device="cpu")
    followed = 0
    for text, colour in held_out:
        ids = tok(
            render_prompt([{"role": "user", "content": text}], tok),
            return_tensors="pt",
            add_special_tokens=False,
        )
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id or 0)
        followed += follows_rule(
            tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True), colour
        )
    return followed


@pytest.fixture(scope="module")
def sft(
    tiny_model_dir: Path, task: dict[str, Any], tmp_path_factory: pytest.TempPathFactory, one_thread: None
) -> tuple[str, int]:
    """The supervised adapter on the noisy demonstrations, and how many held-out prompts it answers by the rule."""
    job = tmp_path_factory.mktemp("sft") / "job"
    result = _run(
        tiny_model_dir,
        job,
        task["sft"],
        train=TrainSettings(steps=120, learning_rate=3e-3, micro_batch_size=8, gradient_accumulation=1),
    )
    adapter = result.artifacts["adapter"]
    return adapter, _rule_followed(tiny_model_dir, adapter, task["held_out"])


@pytest.mark.parametrize("method", list(METHODS))
def test_preference_tuning_learns_the_rule(
    method: str,
    sft: tuple[str, int],
    task: dict[str, Any],
    tiny_model_dir: Path,
    tmp_path: Path,
    one_thread: None,
) -> None:
    threshold, steps, lr, from_sft = METHODS[method]
    sft_adapter, sft_followed = sft
    data = task["judged" if method == "kto" else "pairs"]
    result = _run(
        tiny_model_dir, tmp_path / "job", data, 0.25, method=method, init_adapter=sft_adapter if from_sft else None,
        preference=PreferenceSettings(beta=0.3 if method != "orpo" else 0.1),
        train=TrainSettings(steps=steps, learning_rate=lr, micro_batch_size=8, gradient_accumulation=1),
    )  # fmt: skip
    accuracy = result.metrics["eval_rewards/accuracies"]
    followed = _rule_followed(tiny_model_dir, result.artifacts["adapter"], task["held_out"])
    held = len(task["held_out"])
    print(
        f"\n{method}: held-out reward accuracy {accuracy:.2f} (threshold {threshold}); greedy answers by the rule: "
        f"{followed}/{held} after {method}, {sft_followed}/{held} after sft alone"
    )
    assert accuracy >= threshold
    assert followed > sft_followed
    evals = [e for e in read_events(tmp_path / "job" / "events.jsonl")[0] if e.type == "eval"]
    assert evals and evals[-1].metrics is not None and evals[-1].metrics["rewards/accuracies"] == accuracy
