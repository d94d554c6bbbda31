"""Ollama: the Modelfile next to the GGUF, and registration through Ollama's HTTP API or CLI.

Registration uses the official ``ollama`` Python client: ``create_blob`` uploads the GGUF (and the
adapter GGUF) to ``POST /api/blobs/sha256:<digest>``, then ``create`` posts ``/api/create`` with
the file digests, TEMPLATE, SYSTEM and stop parameters. When the client package is missing but
the ``ollama`` CLI is on PATH, ``ollama create NAME -f Modelfile`` does the same. When neither can
reach a server, the GGUF and Modelfile stay on disk and the error says how to register by hand.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from engine.contract.files import atomic_write_text
from engine.export.templates import OllamaTemplate

MODELFILE = "Modelfile"


class OllamaError(RuntimeError):
    """Registration failed; the message says how to register by hand."""


@dataclass
class Registration:
    name: str
    method: str  # "api" or "cli"
    host: str | None
    run_command: str


def default_model_name(text: str) -> str:
    """A valid Ollama model name from a job id or folder name."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return (name or "backprop-model")[:100]


def _quote(text: str, what: str) -> str:
    if '"""' in text:
        raise OllamaError(f'the {what} contains """, which a Modelfile cannot quote; remove it')
    return f'"""{text}"""'


def modelfile_text(
    gguf_path: Path,
    template: OllamaTemplate | None,
    *,
    system: str | None = None,
    adapter_path: Path | None = None,
    relative_to: Path | None = None,
) -> str:
    """A Modelfile: FROM the GGUF, ADAPTER, TEMPLATE in Go syntax, stop PARAMETERs, SYSTEM."""

    def ref(p: Path) -> str:
        if relative_to is not None and p.parent.resolve() == relative_to.resolve():
            return "./" + p.name
        return str(p.resolve())

    lines = [f"FROM {ref(gguf_path)}"]
    if adapter_path is not None:
        lines.append(f"ADAPTER {ref(adapter_path)}")
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template.template, 'chat template')}")
        for stop in template.stop:
            lines.append(f'PARAMETER stop "{stop}"')
    if system:
        lines.append(f"SYSTEM {_quote(system, 'system prompt')}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def _by_hand(name: str, modelfile: Path) -> str:
    return f"start Ollama (`ollama serve`) and run: ollama create {name} -f {modelfile}"


def register(
    name: str,
    gguf_path: Path,
    modelfile: Path,
    template: OllamaTemplate | None,
    *,
    system: str | None = None,
    adapter_path: Path | None = None,
    host: str | None = None,
) -> Registration:
    """Create model ``name`` in Ollama from ``gguf_path`` (raises ``OllamaError`` when it cannot)."""
    try:  # the ollama client is optional: without it, the ollama command line
        import ollama
    except ImportError:
        ollama = None  # type: ignore[assignment]
    if ollama is not None:
        return _register_api(ollama, name, gguf_path, template, system, adapter_path, host, modelfile)
    cli = shutil.which("ollama")
    if cli is not None:
        return _register_cli(cli, name, modelfile, host)
    raise OllamaError(
        "neither the `ollama` Python package nor the `ollama` command is available; "
        f"pip install ollama, or {_by_hand(name, modelfile)}"
    )


def _register_api(
    ollama,  # type: ignore[no-untyped-def]
    name: str,
    gguf_path: Path,
    template: OllamaTemplate | None,
    system: str | None,
    adapter_path: Path | None,
    host: str | None,
    modelfile: Path,
) -> Registration:
    host = host or os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434"
    client = ollama.Client(host=host)
    try:
        client.list()  # fail fast (and clearly) when no server answers
    except (ConnectionError, OSError) as e:
        raise OllamaError(f"no Ollama server answered at {host} ({e}); {_by_hand(name, modelfile)}") from e
    except Exception as e:
        raise OllamaError(f"Ollama at {host} failed: {e}; {_by_hand(name, modelfile)}") from e
    try:
        files = {gguf_path.name: client.create_blob(gguf_path)}
        adapters = {adapter_path.name: client.create_blob(adapter_path)} if adapter_path is not None else None
        params: dict[str, object] = {}
        if template is not None and template.stop:
            params["stop"] = list(template.stop)
        client.create(
            model=name,
            files=files,
            adapters=adapters,
            template=template.template if template is not None else None,
            system=system,
            parameters=params or None,
            stream=False,
        )
    except Exception as e:  # ollama.ResponseError, httpx errors
        raise OllamaError(f"Ollama at {host} refused the model: {e}; {_by_hand(name, modelfile)}") from e
    return Registration(name=name, method="api", host=host, run_command=f"ollama run {name}")


def _register_cli(cli: str, name: str, modelfile: Path, host: str | None) -> Registration:
    env = dict(os.environ)
    if host:
        env["OLLAMA_HOST"] = host
    proc = subprocess.run(
        [cli, "create", name, "-f", str(modelfile)],
        cwd=str(modelfile.parent),
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-500:]
        raise OllamaError(f"`ollama create` failed: {tail}; {_by_hand(name, modelfile)}")
    return Registration(name=name, method="cli", host=host, run_command=f"ollama run {name}")
