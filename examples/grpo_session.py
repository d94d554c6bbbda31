"""The session of examples/grpo_session.md, run again: an MCP client drives the server in this process
(the real workers, in their own processes) through check_dataset -> SFT -> GRPO -> try_model -> export_gguf
on the offline tiny model, and prints each tool's answer.

    python examples/grpo_session.py            # state in a temporary BACKPROP_HOME; a few minutes on a CPU
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("BACKPROP_HOME", tempfile.mkdtemp(prefix="grpo-session-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # small models on a shared CPU: one thread is faster

from mcp import Client  # noqa: E402 - after the environment above
from session_tools import call, finished  # noqa: E402 - beside this file

from backprop_mcp.server import build_server  # noqa: E402


async def main() -> None:
    rewards = [{"name": "answer"}, {"name": "format", "pattern": r".*\\boxed\{\d+\}\.?", "weight": 0.5}]
    prompts = str(DATA / "math_prompts.jsonl")
    async with Client(build_server()) as client:
        await call(
            client,
            "check_dataset",
            {"path": prompts, "model": "tiny", "method": "grpo", "grpo_rewards": rewards[:1]},
        )
        sft = await call(
            client,
            "start_finetune",
            {
                "dataset_path": str(DATA / "math_sft.jsonl"),
                "model": "tiny",
                "steps": 60,
                "learning_rate": 0.005,
            },
        )
        await finished(client, sft["job_id"])
        grpo = await call(
            client, "start_finetune",
            {"dataset_path": prompts, "model": "tiny", "method": "grpo", "init_adapter": sft["job_id"], "steps": 8,
             "grpo_rewards": rewards, "grpo_num_generations": 4, "grpo_max_completion_length": 16, "grpo_temperature": 0.5},
        )  # fmt: skip
        await finished(client, grpo["job_id"])
        await call(
            client,
            "try_model",
            {
                "job_id": grpo["job_id"],
                "prompt": "What is 12 + 30? Put the answer in \\boxed{}.",
                "max_new_tokens": 16,
            },
        )
        export = await call(client, "export_gguf", {"job_id": grpo["job_id"], "quantizations": ["q8_0"]})
        await finished(client, export["job_id"])


if __name__ == "__main__":
    asyncio.run(main())
