"""Hostile tool calls against the real server, driven from the tools' own input schemas.

Hypothesis draws each argument from the tool's ``inputSchema`` (``hypothesis-jsonschema``: values
that look valid) mixed with hostile values: FIFOs, sockets, devices, system and credential files,
symlinks out of the area, names over 255 bytes, NUL bytes, ``${HOME}``, ``~user``, unicode, huge
numbers, wrong types, unknown job ids and unknown keys. Every tool gets its share: over 1,000 calls
in process on both protocol versions (one with MCP roots), then a shorter run over real stdio.

Asserted after every call: a result or a clear tool error (never the bare "Error executing tool
X", never a crash turned into "failed with an unexpected ..."), an answer that does not repeat a
long input whole, and no call blocking past a generous hang guard. Asserted at the end: the
server still answers, the SQLite store passes ``PRAGMA integrity_check``, and nothing was written
outside the state folder (the hostile paths' folder, the fake home and the working folder are
byte-for-byte unchanged).

The engine is the stand-in ``fuzz_engine_standin.py`` (set through ``BACKPROP_WORKER_COMMAND``,
like a user pointing the server at another environment): jobs the fuzz starts fail at once
instead of training, and check_dataset/try_model get the engine's JSON contract without torch.
The server itself is the real one, unmocked.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from mcp import Client, StdioServerParameters
from mcp.types import ListRootsResult, Root, TextContent

from backprop_mcp.server import build_server

REPO = Path(__file__).resolve().parents[1]
ENGINE_STANDIN = Path(__file__).with_name("fuzz_engine_standin.py")
IN_PROCESS_EXAMPLES = 35  # per tool and protocol (9 tools x 2 x 35), after the sweep (about 750 calls)
STDIO_EXAMPLES = 8  # per tool over stdio
HANG_GUARD_S = 60  # not a timing assertion: a FIFO used to block a call for ever
MAX_ANSWER_CHARS = 6000


@contextmanager
def _hostile_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """The folders a hostile caller points at, a fake home with credentials, and the state folder."""
    arena = tmp_path / "arena"
    arena.mkdir()
    good = arena / "good.jsonl"
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    good.write_text((json.dumps(row) + "\n") * 4)
    (arena / "bad.jsonl").write_text('{"nope": 1}\nnot json\n')
    os.mkfifo(arena / "fifo.jsonl")
    (arena / "passwd.jsonl").symlink_to("/etc/passwd")
    (arena / "loop").symlink_to(arena / "loop")
    (arena / "adapter").mkdir()
    (arena / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "tiny"}')
    (arena / "model").mkdir()
    (arena / "model" / "config.json").write_text("{}")
    os.mkfifo(arena / "adapter" / "adapter_model.safetensors")
    fake_home = tmp_path / "user"
    (fake_home / ".ssh").mkdir(parents=True)
    (fake_home / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (fake_home / ".aws").mkdir()
    (fake_home / ".aws" / "credentials").write_text("[default]\n")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    state = tmp_path / "state"
    engine = [sys.executable, "-S", "-E", str(ENGINE_STANDIN), "run"]
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.setenv("BACKPROP_HOME", str(state))
    monkeypatch.setenv("BACKPROP_WORKER_COMMAND", json.dumps(engine))
    monkeypatch.setenv("BACKPROP_POLL_S", "0.2")
    monkeypatch.setenv("SECRET_TOKEN", "hunter2-value")
    monkeypatch.delenv("BACKPROP_ALLOWED_DIRS", raising=False)
    monkeypatch.chdir(workdir)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(arena / "sock"))
    try:
        yield {"arena": arena, "home": fake_home, "cwd": workdir, "state": state, "root": tmp_path}
    finally:
        sock.close()


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``folder`` (symlinks not followed): mode, size, modification time."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            st_ = os.lstat(os.path.join(dirpath, name))
            seen[os.path.relpath(os.path.join(dirpath, name), folder)] = (
                st_.st_mode,
                st_.st_size,
                st_.st_mtime_ns,
            )
    return seen


def _hostile_values(world: dict[str, Path]) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    """(hostile paths and names, any hostile value)."""
    arena, home = world["arena"], world["home"]
    paths = [
        arena / "good.jsonl",
        arena / "bad.jsonl",
        arena / "fifo.jsonl",
        arena / "sock",
        arena / "passwd.jsonl",
        arena / "loop",
        arena / "adapter",
        arena / "model",
        arena,
        arena / ("n" * 300 + ".jsonl"),
        arena / ("é" * 200) / "x.jsonl",
        arena / "missing.jsonl",
        home / ".ssh",
        home / ".ssh" / "id_rsa",
        home / ".aws" / "credentials",
        world["state"],
        world["state"] / "jobs.sqlite3",
    ]
    texts = [str(p) for p in reversed(paths)] + [
        "/etc/passwd",
        "/etc/shadow",
        "/proc/self/environ",
        "/dev/zero",
        "/dev/stdin",
        "/sys/kernel",
        "${HOME}/.ssh/id_rsa",
        "$SECRET_TOKEN",
        f"{arena}/$SECRET_TOKEN/x.jsonl",
        "~root/.ssh/id_rsa",
        "~/.ssh/id_rsa",
        "~",
        "/",
        "..",
        "../../etc/passwd",
        "relative/train.jsonl",
        "",
        "   ",
        "\x00",
        f"{arena}/a\x00b.jsonl",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "C:\\Windows\\System32\\config\\SAM",
        "tiny",
        "Qwen/Qwen2.5-0.5B-Instruct",
        "nobody/nothing",
        "ft-20260101-000000-abcdef",
        "sr-20260101-000000-000000",
        "\u202eevil\u202c",
        "\U0001f600" * 300,
        "x" * 5000,
        "'; rm -rf / #",
        "$(touch pwned)",
        "\u00e9" * 70_000,  # 420 kB as escaped JSON: over the 128 KiB a single argv item may hold
    ]
    hostile_paths = st.sampled_from(texts)
    world["texts"] = texts  # type: ignore[assignment] - the sweep goes through every one of them
    return hostile_paths, st.one_of(
        hostile_paths,
        st.text(max_size=400),
        st.text(max_size=60).map(lambda s: str(arena / s)),
        st.integers(min_value=-(10**30), max_value=10**30),
        st.floats(allow_nan=False, allow_infinity=False),
        st.none(),
        st.booleans(),
        st.lists(st.sampled_from(texts), max_size=4),
        st.dictionaries(st.text(max_size=8), st.integers(), max_size=2),
    )


def _good_values(world: dict[str, Path]) -> dict[str, list[Any]]:
    """Values that pass the checks, for the arguments that name files or models."""
    arena = world["arena"]
    return {
        "dataset_path": [str(arena / "good.jsonl")],
        "path": [str(arena / "good.jsonl")],
        "dataset_paths": [[str(arena / "good.jsonl")], [str(arena / "good.jsonl")] * 2],
        "model": ["tiny", str(arena / "model")],
        "adapter_path": [str(arena / "adapter")],
        "base_model": ["tiny"],
        "job_id": ["ft-20260101-000000-abcdef"],
        # objects under $defs, which hypothesis-jsonschema cannot draw with this hypothesis: a few real ones
        "grpo_rewards": [
            [],
            [{"name": "format", "pattern": "^<answer>"}],
            [
                {"name": "answer", "extract": "last_number"},
                {"name": "length", "max_tokens": 64, "weight": 0.5},
            ],
        ],
    }


def _arguments(
    schema: dict[str, Any],
    hostile: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]],
    good: dict[str, list[Any]],
) -> st.SearchStrategy[dict[str, Any]]:
    """Argument dicts for one tool: all valid-looking, valid but for one hostile value, or a free mix
    (with missing required arguments and unknown keys)."""
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    hostile_paths, hostile_any = hostile
    # Arguments that name files or models (and job ids) get the hostile paths most of the time.
    pathlike = sorted(k for k in props if k in good)
    bad_path_or_any = st.one_of(hostile_paths, hostile_paths, hostile_paths, hostile_any)

    def bad(name: str) -> st.SearchStrategy[Any]:
        if name == "dataset_paths":
            return st.one_of(st.lists(hostile_paths, min_size=1, max_size=3), hostile_any)
        return bad_path_or_any if name in good else hostile_any

    def valid(name: str, prop: dict[str, Any]) -> st.SearchStrategy[Any]:
        return st.sampled_from(good[name]) if name in good else from_schema(prop)

    valid_required = {k: valid(k, v) for k, v in props.items() if k in required}
    valid_optional = {k: valid(k, v) for k, v in props.items() if k not in required}
    all_valid = st.fixed_dictionaries(valid_required, optional=valid_optional)
    extra = st.dictionaries(st.text(min_size=1, max_size=20), hostile_any, min_size=1, max_size=2)
    with_extra = st.tuples(all_valid, extra).map(lambda t: {**t[1], **t[0]})  # unknown keys
    strategies = [all_valid, with_extra]
    if props:
        names = st.sampled_from(sorted(props) + pathlike * 3)
        one_hostile = st.tuples(all_valid, names.flatmap(lambda n: st.tuples(st.just(n), bad(n)))).map(
            lambda t: {**t[0], t[1][0]: t[1][1]}
        )
        mixed = {k: st.one_of(valid(k, v), bad(k)) for k, v in props.items()}
        free = st.tuples(st.fixed_dictionaries({}, optional=mixed), extra).map(lambda t: {**t[1], **t[0]})
        strategies += [one_hostile, one_hostile, free]
    return st.one_of(*strategies)


def _long_inputs(args: dict[str, Any]) -> list[str]:
    out = []
    for v in args.values():
        for item in v if isinstance(v, list) else [v]:
            if isinstance(item, str) and len(item) > 300:
                out.append(item)
    return out


def _check_answer(tool: str, args: dict[str, Any], result: Any) -> str:
    text = " ".join(c.text for c in result.content if isinstance(c, TextContent))
    if not result.is_error:
        assert result.structured_content is not None, (tool, args, text[:500])
        return "result"
    assert text.strip() != f"Error executing tool {tool}", (tool, args)
    assert text.startswith(f"Error executing tool {tool}: ") and len(text) > len(tool) + 30, (tool, text)
    assert "failed with an unexpected" not in text, (tool, args, text[:1500])  # a crash, even if wrapped
    assert len(text) <= MAX_ANSWER_CHARS, (tool, len(text), text[:500])
    for long in _long_inputs(args):
        assert long not in text, (tool, "a long input came back whole")
    assert "hunter2-value" not in text, (tool, "an environment variable was expanded")
    return "engine" if "stand-in engine:" in text else "error"


async def _bounded_call(client: Client, tool: str, args: dict[str, Any]) -> Any:
    with anyio.fail_after(HANG_GUARD_S):
        return await client.call_tool(tool, args)


def _fuzz_tool(
    portal: Any,
    client: Client,
    name: str,
    strategy: st.SearchStrategy[Any],
    examples: int,
    outcomes: Counter[str],
) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(args=strategy)
    def one_call(args: dict[str, Any]) -> None:
        result = portal.call(_bounded_call, client, name, args)
        outcomes[f"{name}:{_check_answer(name, args, result)}"] += 1

    one_call()


def _sweep_tool(
    portal: Any,
    client: Client,
    tool: Any,
    texts: list[str],
    good: dict[str, list[Any]],
    outcomes: Counter[str],
) -> None:
    """Every hostile path in every argument that names a file, a model or a job, the rest valid.

    Hypothesis favours simple values, so the worst paths are not left to chance.
    """
    props = tool.input_schema.get("properties", {})
    required = {k: good[k][0] if k in good else "hi" for k in tool.input_schema.get("required", [])}
    for name in sorted(k for k in props if k in good):
        for text in texts:
            args = {**required, name: [text] if name == "dataset_paths" else text}
            if name == "adapter_path" and "model" in props:
                args["model"] = "tiny"
            result = portal.call(_bounded_call, client, tool.name, args)
            outcomes[f"{tool.name}:{_check_answer(tool.name, args, result)}"] += 1


def _fuzz_client(
    client_cm: Any,
    hostile: tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]],
    good: dict[str, list[Any]],
    examples: int,
    outcomes: Counter[str],
    sweep: list[str] | None = None,
) -> None:
    """Drive every tool of one (already configured) client with ``examples`` hypothesis calls each."""
    with (
        anyio.from_thread.start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(client_cm) as client,
    ):
        tools = portal.call(client.list_tools).tools
        assert len(tools) >= 9
        for tool in tools:
            if sweep:
                _sweep_tool(portal, client, tool, sweep, good, outcomes)
            strategy = _arguments(tool.input_schema, hostile, good)
            _fuzz_tool(portal, client, tool.name, strategy, examples, outcomes)
        # Alive afterwards: a plain call still answers.
        listed = portal.call(_bounded_call, client, "list_jobs", {"limit": 500})
        assert not listed.is_error, listed.content
        outcomes["jobs"] = max(outcomes["jobs"], listed.structured_content["count"])


def _assert_nothing_written_outside_state(world: dict[str, Path], before: dict[str, Any]) -> None:
    for name in ("arena", "home", "cwd"):
        assert _snapshot(world[name]) == before[name], f"something changed under the {name} folder"
    assert {p.name for p in world["root"].iterdir()} == {"arena", "user", "cwd", "state"}
    with sqlite3.connect(world["state"] / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_fuzz_every_tool_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _hostile_world(tmp_path, monkeypatch) as world:
        hostile, good = _hostile_values(world), _good_values(world)
        before = {name: _snapshot(world[name]) for name in ("arena", "home", "cwd")}
        outcomes: Counter[str] = Counter()
        server = build_server(world["state"])
        _fuzz_client(
            Client(server, mode="legacy"), hostile, good, IN_PROCESS_EXAMPLES, outcomes, world["texts"]
        )

        async def list_roots(_ctx: Any) -> ListRootsResult:
            return ListRootsResult(roots=[Root(uri=world["arena"].as_uri())])

        _fuzz_client(
            Client(server, list_roots_callback=list_roots), hostile, good, IN_PROCESS_EXAMPLES, outcomes
        )
        calls = sum(n for k, n in outcomes.items() if ":" in k)
        print(f"fuzz: {calls} calls, {sorted(outcomes.items())}")
        assert calls >= 1000
        assert {k.split(":")[0] for k in outcomes if ":" in k} >= {
            "inspect_gpu",
            "start_finetune",
            "job_status",
            "list_jobs",
            "cancel_job",
            "check_dataset",
            "try_model",
            "run_slao_series",
            "export_gguf",
        }
        assert outcomes["start_finetune:result"] > 0, "some calls must get through the checks, too"
        assert outcomes["check_dataset:engine"] + outcomes["try_model:engine"] > 0, "and reach the engine"
        _assert_nothing_written_outside_state(world, before)


def test_fuzz_over_stdio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _hostile_world(tmp_path, monkeypatch) as world:
        hostile, good = _hostile_values(world), _good_values(world)
        before = {name: _snapshot(world[name]) for name in ("arena", "home", "cwd")}
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "backprop_mcp"], env=env, cwd=str(world["cwd"])
        )
        outcomes: Counter[str] = Counter()
        _fuzz_client(Client(params, mode="legacy"), hostile, good, STDIO_EXAMPLES, outcomes)
        calls = sum(n for k, n in outcomes.items() if ":" in k)
        print(f"fuzz over stdio: {calls} calls, {sorted(outcomes.items())}")
        assert calls >= 9 * STDIO_EXAMPLES // 2
        _assert_nothing_written_outside_state(world, before)
