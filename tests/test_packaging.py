"""What a user meets before running anything: the package metadata, the registry entry, the README's
commands, the tool descriptions a client shows, and no deprecation noise from training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import warnings
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_built_metadata_has_the_licence_and_the_package_page(tmp_path: Path) -> None:
    """setuptools itself builds the metadata (>= 77 understands the SPDX licence string)."""
    for name in ("pyproject.toml", "README.md", "README.pypi.md", "LICENSE"):
        shutil.copy(REPO / name, tmp_path / name)
    for package in ("engine", "backprop_mcp"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    code = "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel('out'))"
    (tmp_path / "out").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dist_info = tmp_path / "out" / done.stdout.strip().splitlines()[-1]
    meta = Parser().parsestr((dist_info / "METADATA").read_text())
    assert meta["License-Expression"] == "MIT"
    page = meta.get_payload()
    assert page.strip() == (REPO / "README.pypi.md").read_text().strip()
    assert "uv tool install" in page and "-e ." not in page and ".venv/bin" not in page
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"train", "export", "tensorboard", "wandb"} <= extras
    assert not any("matplotlib" in r for r in meta.get_all("Requires-Dist") or [])


def test_build_requirement_and_registry_entry_agree() -> None:
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"][0]
    server = json.loads((REPO / "server.json").read_text())
    version = PYPROJECT["project"]["version"]
    assert server["version"] == version
    (package,) = server["packages"]
    assert package["identifier"] == PYPROJECT["project"]["name"] and package["version"] == version
    (with_stack,) = package["runtimeArguments"]
    assert with_stack["name"] == "--with"
    assert with_stack["value"] == f"backprop-mcp[train,export]=={version}"  # a server that can train
    assert f"<!-- mcp-name: {server['name']} -->" in (REPO / "README.md").read_text()


def test_readme_shows_commands_that_work() -> None:
    readme = (REPO / "README.md").read_text()
    first_blocks = [block.split("```")[0].strip() for block in readme.split("```bash")[1:3]]
    assert 'pip install -e ".[train]"' in first_blocks[0] and "backprop train" in first_blocks[0]
    assert "pytest" in first_blocks[1]  # the two checkout commands stay first
    assert "mcp dev" not in readme
    assert "npx @modelcontextprotocol/inspector" in readme and "--method tools/list" in readme
    assert 'uv tool install "backprop-mcp[train,export]"' in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert first_blocks[1] in ci  # the README's test command is what CI runs


def test_tool_descriptions_carry_no_docstring_indentation(tmp_path: Path) -> None:
    from backprop_mcp.server import build_server

    server = build_server(tmp_path)
    tools = server._tool_manager.list_tools()
    assert len(tools) >= 9
    for tool in tools:
        assert not any(line.startswith((" ", "\t")) for line in tool.description.splitlines()), tool.name


def test_lora_setup_warns_nothing_about_checkpointing(tiny_model_dir: Path) -> None:
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from engine.contract.spec import LoraSettings
    from engine.training.lora import add_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = add_lora(model, LoraSettings(rank=4), gradient_checkpointing=True, loaded_info={})
    noisy = [str(w.message) for w in caught if "checkpointing" in str(w.message)]
    assert noisy == []
    assert any(getattr(m, "gradient_checkpointing", False) for m in peft_model.modules())  # still on


def test_the_train_extra_brings_liger_on_linux_x86_64_only() -> None:
    """The README's install command trains at the measured figures (Liger's kernels) where Triton ships;
    elsewhere the requirement's marker leaves it out (checked with uv pip compile for macOS arm64,
    Windows x86_64 and Linux aarch64: the extra resolves there)."""
    from packaging.requirements import Requirement

    (liger,) = [
        Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["train"] if "liger" in r
    ]
    assert liger.name == "liger-kernel" and liger.marker is not None
    where = {
        ("linux", "x86_64"): True,
        ("linux", "aarch64"): False,
        ("darwin", "arm64"): False,
        ("win32", "AMD64"): False,
    }
    for (platform, machine), wanted in where.items():
        assert liger.marker.evaluate({"sys_platform": platform, "platform_machine": machine}) is wanted
