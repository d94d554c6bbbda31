"""The session of examples/preference_session.md, run again: an MCP client drives the server in this process
(the real workers, in their own processes) through check_dataset -> SFT -> DPO from its adapter -> try_model ->
export_gguf on the offline tiny model, and prints each tool's answer.

The data is the colour task of tests/preference_tasks.py (the one the learning tests use), written into the
session's state folder: the answer names the colour the prompt asks for; the supervised demonstrations are
noisy (most answer "blue"), the pairs prefer the right colour. The tiny model learns the rule from the pairs.

    python examples/preference_session.py      # state in a temporary BACKPROP_HOME; a few minutes on a CPU
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # preference_tasks: the colour task
os.environ.setdefault("BACKPROP_HOME", tempfile.mkdtemp(prefix="preference-session-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # small models on a shared CPU: one thread is faster

from mcp import Client  # noqa: E402 - after the environment above
from preference_tasks import follows_rule, write_task  # noqa: E402
from session_tools import call, finished  # noqa: E402 - beside this file

from backprop_mcp.server import build_server  # noqa: E402


async def answer(client: Client, job_id: str, prompt: str) -> str:
    result = await client.call_tool("try_model", {"job_id": job_id, "prompt": prompt, "max_new_tokens": 4})
    return str((result.structured_content or {}).get("text", ""))


async def main() -> None:
    data = Path(os.environ["BACKPROP_HOME"]) / "data"
    data.mkdir(parents=True, exist_ok=True)
    task = write_task(data)
    pairs = str(task["pairs"])
    batch = {"micro_batch_size": 8, "gradient_accumulation": 1, "lora_rank": 8}
    async with Client(build_server()) as client:
        await call(client, "check_dataset", {"path": pairs, "model": "tiny", "method": "dpo"})
        sft = await call(
            client, "start_finetune",
            {"dataset_path": str(task["sft"]), "model": "tiny", "steps": 120, "learning_rate": 0.003, **batch},
        )  # fmt: skip
        await finished(client, sft["job_id"])
        dpo = await call(
            client, "start_finetune",
            {"dataset_path": pairs, "model": "tiny", "method": "dpo", "init_adapter": sft["job_id"], "beta": 0.3,
             "steps": 80, "learning_rate": 0.002, "eval_fraction": 0.25, **batch},
        )  # fmt: skip
        await finished(client, dpo["job_id"])
        # every held-out prompt (filler words no training prompt has), greedy, after sft and after dpo
        answers = {job["job_id"]: [await answer(client, job["job_id"], text) for text, _ in task["held_out"]]
                   for job in (sft, dpo)}  # fmt: skip
        for name, job in (("sft", sft), ("dpo", dpo)):
            right = sum(
                follows_rule(a, c) for a, (_, c) in zip(answers[job["job_id"]], task["held_out"], strict=True)
            )
            print(f"\n{name}: {right} of {len(task['held_out'])} held-out prompts answered by the rule")
        wrong = [i for i, (a, (_, c)) in enumerate(zip(answers[sft["job_id"]], task["held_out"], strict=True))
                 if not follows_rule(a, c)]  # fmt: skip
        text, colour = task["held_out"][wrong[0] if wrong else 0]  # one the supervised model gets wrong
        print(f"\n(the prompt below asks for {colour})")
        for job in (sft, dpo):
            await call(client, "try_model", {"job_id": job["job_id"], "prompt": text, "max_new_tokens": 4})
        export = await call(client, "export_gguf", {"job_id": dpo["job_id"], "quantizations": ["q8_0"]})
        await finished(client, export["job_id"])


if __name__ == "__main__":
    asyncio.run(main())
