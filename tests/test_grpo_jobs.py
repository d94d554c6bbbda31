"""GRPO jobs end to end on the CPU, the real worker, the tiny model: it learns; the user's reward file runs.

Proof that it learns: a short SFT teaches the tiny model to answer "yes", and "yes." (a sentence with
its full stop) one time in ten; then GRPO, from that SFT adapter, rewards the full stop (a format
reward: ``\\w+\\.`` for the whole completion). Its mean reward starts at or under 0.2 and reaches 0.8
within the run's 40 steps (at a constant learning rate of 1e-3; on this machine it got there
by step 14-20 in five runs of various settings). (The LoRA covers lm_head too: the tiny model's random head, frozen, caps any
token's probability near 7%, so a frozen-head LoRA cannot make any answer likely.)

The workers run torch on one thread (OMP_NUM_THREADS=1): on a shared machine with two cores the default
thread pool is tens of times slower for this model.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine.api import JobFailed, Trainer
from engine.contract.events import read_events

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
WORDS = ["cat", "dog", "sun", "tree", "car", "book", "fish", "bird", "moon", "rain", "star", "road"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _prompt(rng: random.Random) -> str:
    return f"Tell me about the {rng.choice(WORDS)} number {rng.randint(1, 9)}."


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rewards(job_dir: Path) -> list[float]:
    events, _ = read_events(job_dir / "events.jsonl")
    return [
        e.metrics["reward"] for e in events if e.type == "progress" and e.metrics and "reward" in e.metrics
    ]


def test_grpo_after_sft_raises_a_format_reward(tmp_path: Path, tiny_model_dir: Path) -> None:
    rng = random.Random(0)
    sft = _write(
        tmp_path / "sft.jsonl",
        [{"prompt": _prompt(rng), "completion": "yes." if rng.random() < 0.1 else "yes"} for _ in range(400)],
    )
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": _prompt(rng)} for _ in range(64)])
    trainer = Trainer(str(tiny_model_dir), workdir=tmp_path / "jobs", device="cpu")
    first = trainer.train(sft, steps=80, learning_rate=5e-3, lora_target_modules=TARGETS)
    grpo = trainer.train(
        prompts,
        method="grpo",
        init_adapter=str(first.job_dir),
        steps=40,
        learning_rate=1e-3,
        lr_scheduler="constant",
        grpo_num_generations=8,
        grpo_max_completion_length=10,
        grpo_rewards=[{"name": "format", "pattern": r"\w+\."}],
    )
    rewards = _rewards(grpo.job_dir)
    smoothed = [sum(rewards[i - 2 : i + 1]) / 3 for i in range(2, len(rewards))]
    print(f"\nSFT loss {first.metrics['first_loss']:.3f} -> {first.metrics['final_loss']:.3f}")
    print(f"GRPO mean format reward per step: {[round(r, 3) for r in rewards]}")
    print(
        f"GRPO metrics: { {k: grpo.metrics[k] for k in ('first_reward', 'final_reward_avg', 'prompts_per_s')} }"
    )
    assert len(rewards) == 40
    assert rewards[0] <= 0.2, rewards
    assert max(smoothed) >= 0.8, rewards  # three steps in a row average 0.8 or more
    lines = (grpo.job_dir / "completions.jsonl").read_text().splitlines()
    assert len(lines) == 40 * 8 and any(json.loads(x)["completion"].endswith(".") for x in lines[-8:])
    assert grpo.metrics["method"] == "grpo" and grpo.adapter_path is not None


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BACKPROP_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "engine.cli.main", *args],
        capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600, check=False,
    )  # fmt: skip


def test_a_user_reward_file_from_the_cli_and_its_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    rng = random.Random(1)
    data = _write(tmp_path / "math.jsonl", [{"prompt": _prompt(rng), "answer": str(i)} for i in range(8)])
    reward = tmp_path / "my_reward.py"
    reward.write_text(
        "def reward(prompts, completions, answer, **columns):\n"
        "    return [float(len(c)) / 10 + (1.0 if a in c else 0.0) for c, a in zip(completions, answer)]\n"
    )
    common = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--device",
        "cpu",
        "--method",
        "grpo",
        "--steps",
        "2",
    ]
    common += ["--grpo-num-generations", "2", "--grpo-max-completion-length", "6", "--json"]
    done = _cli(
        tmp_path / "home", "train", *common, "--grpo-rewards", str(reward), "--grpo-rewards", "length"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (job,) = (tmp_path / "home" / "jobs").iterdir()
    events, _ = read_events(job / "events.jsonl")
    metrics = [e.metrics for e in events if e.type == "progress" and e.metrics]
    print(f"\nCLI job's step figures: {metrics}")
    assert len(metrics) == 2 and {"rewards/my_reward/mean", "rewards/length/mean"} <= set(metrics[0])
    sample = json.loads((job / "completions.jsonl").read_text().splitlines()[0])
    assert set(sample["rewards"]) == {"my_reward", "length"}

    # a reward file that exits at the second step: the job fails with its file and line, and the first
    # step's completions stay listed (an agent reads what the model wrote before it failed)
    broken = tmp_path / "broken_reward.py"
    broken.write_text(
        "import sys\n"
        "calls = []\n"
        "def reward(prompts, completions, **columns):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        sys.exit('no more')\n"
        "    return [1.0 for _ in completions]\n"
    )
    with pytest.raises(
        JobFailed, match=rf"{broken}:6: the reward function 'reward' raised SystemExit: no more"
    ) as failed:
        Trainer(str(tiny_model_dir), workdir=tmp_path / "jobs", device="cpu").train(
            data, method="grpo", steps=2, grpo_num_generations=2, grpo_max_completion_length=4,
            grpo_rewards=[str(broken)],
        )  # fmt: skip
    kept = Path(failed.value.result.artifacts["completions"])
    assert [json.loads(x)["step"] for x in kept.read_text().splitlines()] == [1, 1]
