"""GRPO jobs end to end on the CPU, the real worker, the tiny model: it learns; the user's reward file runs;
a session through the MCP tools runs SFT -> GRPO -> try -> export.

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
from tool_calls import structured, until_done

from engine.api import JobFailed, Trainer
from engine.contract.events import read_events
from engine.contract.grpo_figures import step_figures

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"
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


def test_the_grpo_speed_benchmark_runs_in_its_cpu_smoke_mode(tmp_path: Path) -> None:
    """benchmarks/grpo_speed.py --tiny, at its smallest (one prompt of two completions of 4 tokens a step):
    the engine's job with and without sampling graphs and trl's GRPOTrainer run to their records, and the
    lines for RESULTS.md name the job's default (graphs) plainly and the other run by its setting."""
    pytest.importorskip("trl")
    records = tmp_path / "speed.jsonl"
    command = [
        sys.executable, str(REPO / "benchmarks" / "grpo_speed.py"), "--tiny", "--steps", "1", "--warmup", "1",
        "--prompts-per-step", "1", "--generations", "2", "--max-completion", "4", "--micro", "2",
        "--workdir", str(tmp_path / "work"), "--jsonl", str(records),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["variant"] for r in runs] == ["engine, sampling graphs", "trl GRPOTrainer", "engine"]
    for run in runs:
        assert run["prompts_per_s"] > 0 and run["mean_completion_tokens"] == 4.0, run
    headlines = [line for line in done.stdout.splitlines() if line.startswith("GRPO ")]
    assert [line.split(":")[0] for line in headlines] == [
        "GRPO 0.5B-tiny none",
        "GRPO 0.5B-tiny none with grpo_sampling_graphs false",
    ], done.stdout
    assert all("× trl's GRPOTrainer, peak memory not measured (no GPU) (CPU, " in line for line in headlines)


def test_the_grpo_speed_line_for_results_reads_as_the_issue_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default run's line, with GPU figures: GRPO 0.5B QLoRA: X× trl's GRPOTrainer, Y× its peak memory
    (card, date)."""
    import argparse
    import contextlib
    import datetime
    import io

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import grpo_speed

    runs = [
        {"variant": "engine, sampling graphs", "prompts_per_s": 0.9, "peak_mem_gib": 1.2},
        {"variant": "trl GRPOTrainer", "prompts_per_s": 0.3, "peak_mem_gib": 1.5},
    ]
    printed = io.StringIO()
    days = [datetime.date.today().isoformat()]  # (the day before and after the call: midnight may pass)
    with contextlib.redirect_stdout(printed):
        grpo_speed.report(runs, argparse.Namespace(arch="qwen2.5-0.5b", tiny=False, quantization="4bit"))
    days.append(datetime.date.today().isoformat())
    card = grpo_speed.card()
    assert printed.getvalue().splitlines()[-1] in {
        f"GRPO 0.5B QLoRA: 3.00× trl's GRPOTrainer, 0.80× its peak memory ({card}, {day})" for day in days
    }


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.slow
@pytest.mark.anyio
async def test_sft_then_grpo_from_its_adapter_then_try_then_export_through_the_tools(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """examples/grpo_session.md's session, short: the example's math data, a few steps each."""
    from mcp import Client

    from backprop_mcp.server import build_server

    prompts = str(EXAMPLES / "math_prompts.jsonl")
    rewards = [{"name": "answer"}, {"name": "format", "pattern": r".*\\boxed\{\d+\}\.?", "weight": 0.5}]
    common = {"model": str(tiny_model_dir), "device": "cpu", "lora_rank": 4}
    async with Client(build_server(tmp_path / "home")) as client:
        check = structured(
            await client.call_tool(
                "check_dataset",
                {"path": prompts, "model": str(tiny_model_dir), "method": "grpo", "grpo_rewards": rewards},
            )
        )
        assert check["format"] == "prompt", check
        sft = structured(
            await client.call_tool(
                "start_finetune",
                {
                    "dataset_path": str(EXAMPLES / "math_sft.jsonl"),
                    "steps": 3,
                    "learning_rate": 5e-3,
                    **common,
                },
            )
        )
        assert (await until_done(client, sft["job_id"]))["state"] == "succeeded"
        grpo = structured(
            await client.call_tool(
                "start_finetune",
                {
                    "dataset_path": prompts,
                    "method": "grpo",
                    "init_adapter": sft["job_id"],
                    "steps": 2,
                    "grpo_rewards": rewards,
                    "grpo_num_generations": 2,
                    "grpo_max_completion_length": 6,
                    **common,
                },
            )  # fmt: skip
        )
        status = await until_done(client, grpo["job_id"])
        assert status["state"] == "succeeded", status
        # job_status carries the last step's figures under the engine's names, and the kept completions
        assert list(status["progress"]["metrics"]) == step_figures(["answer", "format"], with_kl=False)
        assert status["metrics"]["method"] == "grpo" and status["metrics"]["steps"] == 2
        completions = Path(status["artifacts"]["completions"]).read_text().splitlines()
        assert len(completions) == 2 * 2 and set(json.loads(completions[0])["rewards"]) == {
            "answer",
            "format",
        }
        tried = structured(
            await client.call_tool(
                "try_model", {"job_id": grpo["job_id"], "prompt": "What is 12 + 30?", "max_new_tokens": 8}
            )
        )
        assert isinstance(tried["text"], str)
        pytest.importorskip("llama_cpp")
        export = structured(
            await client.call_tool("export_gguf", {"job_id": grpo["job_id"], "quantizations": ["f16"]})
        )
        exported = await until_done(client, export["job_id"])
        assert exported["state"] == "succeeded", exported
        assert any(name.startswith("gguf_") for name in exported["artifacts"]), exported["artifacts"]
