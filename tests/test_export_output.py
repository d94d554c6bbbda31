"""Exports go where the user asks: ``Trainer.export(output_dir=...)`` for real on the tiny model, and
the ``export_gguf`` tool's ``output_dir`` checked before a job exists (its jobs run the stand-in
worker, as in test_server.py). The CLI's ``--output-dir`` is in test_cli.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.types import TextContent

from backprop_mcp.server import build_server
from engine import Trainer
from engine.contract.spec import read_spec

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).with_name("test_server_worker_standin.py")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.slow
def test_trainer_export_writes_into_output_dir(tmp_path: Path) -> None:
    trainer = Trainer("tiny", workdir=tmp_path / "jobs", verbose=False)
    trainer.train(REPO / "examples" / "data" / "chat.jsonl", steps=2)
    out = tmp_path / "my" / "gguf"
    result = trainer.export("gguf", quantization="q8_0", output_dir=out, model_name="mine")
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "mine-q8_0.gguf"]
    assert result.artifacts["gguf_q8_0"] == str(out.resolve() / "mine-q8_0.gguf")
    assert result.artifacts["modelfile"] == str(out.resolve() / "Modelfile")
    assert "gguf=" in repr(result) and len(repr(result)) < 400
    assert not list((result.job_dir / "gguf").glob("*.gguf*"))  # nothing left behind, nothing partial


@pytest.mark.anyio
async def test_export_tool_takes_an_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("BACKPROP_HOME", str(home))
    adapter = tmp_path / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}))
    (tmp_path / "a-file").write_text("x")
    server = build_server(home, worker_command=[sys.executable, str(STANDIN), "--steps", "1"])

    async def call(**args: Any) -> Any:
        return await client.call_tool("export_gguf", {"adapter_path": str(adapter), **args})

    def error(result: Any) -> str:
        assert result.is_error, result.structured_content
        return " ".join(c.text for c in result.content if isinstance(c, TextContent))

    async with Client(server) as client:
        assert "relative path" in error(await call(output_dir="gguf"))
        assert "is a file" in error(await call(output_dir=str(tmp_path / "a-file")))
        assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())  # refused: nothing made
        started = await call(output_dir=str(tmp_path / "exports"))
        assert not started.is_error, started.content
        job_dir = Path(started.structured_content["job_dir"])
        assert read_spec(job_dir).output_dir == str(tmp_path / "exports")  # type: ignore[union-attr]
