"""An install without the training stack refuses training work up front and names the install command.

``pip install backprop-mcp`` (what ``uvx backprop-mcp`` gives) has no torch. The test builds such an
environment for real: a fresh virtual environment whose site-packages holds links to every package
of this one except the ``train`` and ``export`` extras' modules, so ``import torch`` genuinely fails
there. The real server (over stdio) and the real CLI then run in it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from engine.contract.spec import FinetuneSpec
from engine.hardware.installed import EXTRA_MODULES, MissingExtra, require, require_for_spec

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "examples" / "data" / "chat.jsonl"
HIDDEN = {*EXTRA_MODULES["train"], *EXTRA_MODULES["export"]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def python_without_ml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Python whose environment lacks torch, transformers, peft, gguf, llama_cpp (and the rest)."""
    venv = tmp_path_factory.mktemp("no-ml") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        top = entry.name.split("-")[0].split(".")[0].lower()
        if top in HIDDEN or entry.name.endswith(".pth"):  # .pth: editable installs point at a checkout
            continue
        (target / entry.name).symlink_to(entry)
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, check=False)
    assert probe.returncode != 0, "torch is still importable in the stripped environment"
    return python


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BACKPROP_WORKER_COMMAND"}
    return {**env, "BACKPROP_HOME": str(home), "PYTHONPATH": str(REPO)}


def test_the_full_install_passes() -> None:
    require("train", "start_finetune")
    require("export", "export_gguf")
    require_for_spec(FinetuneSpec(dataset={"path": str(CHAT)}, train={"report_to": ["tensorboard"]}), "x")


def test_a_missing_module_names_the_extra_and_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXTRA_MODULES, "wandb", ("wandb", "no_such_module_for_backprop_tests"))
    with pytest.raises(MissingExtra) as info:
        require("wandb", "backprop train with report_to wandb")
    text = str(info.value)
    assert "'wandb' extra" in text and "no_such_module_for_backprop_tests" in text
    assert f'"{sys.executable}" -m pip install' in text and "[wandb]" in text
    monkeypatch.setenv("BACKPROP_WORKER_COMMAND", '["/opt/other/python", "-m", "engine", "run"]')
    require("wandb", "x")  # jobs run in another Python: its packages can't be checked from here


def test_backend_unsloth_needs_the_unsloth_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXTRA_MODULES, "unsloth", ("no_such_module_for_backprop_tests",))
    with pytest.raises(MissingExtra, match=r"(?s)backend 'unsloth' needs the 'unsloth' extra.*\[unsloth\]"):
        require_for_spec(FinetuneSpec(dataset={"path": str(CHAT)}, train={"backend": "unsloth"}), "x")
    require_for_spec(FinetuneSpec(dataset={"path": str(CHAT)}, train={"backend": "native"}), "x")


def test_cli_without_torch_refuses_before_any_job(python_without_ml: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    done = subprocess.run(
        [str(python_without_ml), "-m", "engine.cli.main", "train", "--data", str(CHAT), "--steps", "2"],
        capture_output=True,
        text=True,
        env=env_for(home),
        cwd=str(tmp_path),
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "'train' extra" in done.stderr and "torch" in done.stderr
    assert "pip install" in done.stderr and "uv tool install" in done.stderr
    assert not (home / "jobs").exists()
    gpu = subprocess.run(
        [str(python_without_ml), "-m", "engine.cli.main", "gpu"],
        capture_output=True,
        text=True,
        env=env_for(home),
        check=False,
    )
    assert gpu.returncode == 0 and "tiny" in gpu.stdout, gpu.stderr  # what needs no torch still works


def _error_text(result: Any) -> str:
    assert result.is_error, result
    return " ".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.anyio
async def test_server_without_torch_refuses_training_tools(python_without_ml: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    params = StdioServerParameters(
        command=str(python_without_ml), args=["-m", "backprop_mcp"], env=env_for(home), cwd=str(tmp_path)
    )
    async with Client(params) as client:
        gpu = await client.call_tool("inspect_gpu", {})
        assert not gpu.is_error  # the server itself works without torch
        text = _error_text(await client.call_tool("start_finetune", {"dataset_path": str(CHAT)}))
        assert "start_finetune needs the 'train' extra" in text and "pip install" in text
        assert "uv tool install" in text
        text = _error_text(await client.call_tool("check_dataset", {"path": str(CHAT)}))
        assert "'train' extra" in text
        text = _error_text(await client.call_tool("export_gguf", {"adapter_path": str(tmp_path)}))
        assert "'train' and 'export' extras" in text and "gguf" in text
        listed = await client.call_tool("list_jobs", {})
        assert json.loads(listed.content[0].text)["count"] == 0  # type: ignore[union-attr]
    assert not (home / "jobs").exists() or not any((home / "jobs").iterdir())
