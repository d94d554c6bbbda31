"""Hostile input against the real server and the engine's path checks: one test per bug of issue 15.

FIFOs, names over 255 bytes, environment variables, 100 kB inputs, system and credential files,
MCP roots (both protocol versions, and roots/list_changed), and a crash that must not come back as
a bare "Error executing tool X". Jobs here run the stand-in worker of ``test_server.py``; the one
test that needs the engine (a long non-ASCII prompt reaching ``python -m engine generate``) runs
the real one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer
from mcp.types import ListRootsResult, Root, TextContent

from backprop_mcp.policy import FilePolicy
from backprop_mcp.server import build_server
from backprop_mcp.tool_errors import guard_tools
from engine.contract.datasets import DatasetError
from engine.contract.files import (
    QUOTE_LIMIT,
    PathError,
    atomic_write_text,
    checked_path,
    path_kind,
    quoted,
    user_path,
    write_dir_atomically,
)
from engine.data.formats import inspect_dataset

STANDIN = Path(__file__).with_name("test_server_worker_standin.py")
MODES = ["legacy", "auto"]
CALL_BOUND_S = 30  # a hang guard only: every call here answers in well under a second or two


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("BACKPROP_HOME", str(path))
    monkeypatch.setenv("BACKPROP_POLL_S", "0.1")
    monkeypatch.delenv("BACKPROP_ALLOWED_DIRS", raising=False)
    return path


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake home folder with the credential files an attacker would want."""
    path = tmp_path / "user"
    (path / ".ssh").mkdir(parents=True)
    (path / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (path / ".aws").mkdir()
    (path / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = x\n")
    (path / "data").mkdir()
    monkeypatch.setenv("HOME", str(path))
    return path


@pytest.fixture
def dataset(user_home: Path) -> Path:
    path = user_home / "data" / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    return path


def server(home: Path) -> MCPServer:
    return build_server(
        home, worker_command=[sys.executable, str(STANDIN), "--steps", "2", "--step-s", "0.01"]
    )


async def call(client: Client, tool: str, args: dict[str, Any]) -> tuple[bool, str]:
    with anyio.fail_after(CALL_BOUND_S):
        result = await client.call_tool(tool, args)
    text = " ".join(c.text for c in result.content if isinstance(c, TextContent))
    assert text.strip() != f"Error executing tool {tool}", "a bare error tells the model nothing"
    return bool(result.is_error), text


def roots_callback(*folders: Path) -> Any:
    async def list_roots(_ctx: Any) -> ListRootsResult:
        return ListRootsResult(roots=[Root(uri=f.as_uri(), name=f.name) for f in folders])

    return list_roots


# -- engine.contract.files: the type check and the quoting ------------------------------------------------


def test_path_kind_refuses_fifos_sockets_and_devices_without_opening_them(tmp_path: Path) -> None:
    fifo = tmp_path / "f.jsonl"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes: there is none
    link = tmp_path / "link.jsonl"
    link.symlink_to(fifo)
    sock_path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for path, kind in [(fifo, "named pipe"), (link, "named pipe"), (sock_path, "socket")]:
            with pytest.raises(PathError, match=kind):
                path_kind(path, "dataset")
    finally:
        sock.close()
    with pytest.raises(PathError, match="character device"):
        path_kind(Path("/dev/null"), "dataset")
    assert path_kind(tmp_path, "x") == "dir"
    assert path_kind(tmp_path / "missing", "x") is None


def test_os_errors_become_clear_path_errors(tmp_path: Path) -> None:
    with pytest.raises(PathError, match="too long") as long_name:
        path_kind(tmp_path / ("é" * 300), "dataset")
    assert len(str(long_name.value)) < QUOTE_LIMIT + 400
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(PathError, match="loop of symbolic links"):
        checked_path(loop, "model")
    with pytest.raises(PathError, match="NUL"):
        user_path("/tmp/a\x00b", "dataset")
    with pytest.raises(PathError, match="is a folder"):
        checked_path(tmp_path, "dataset", expect="file")


def test_user_path_expands_plain_tilde_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    assert user_path("~/data/x.jsonl", "p") == tmp_path / "data" / "x.jsonl"
    assert str(user_path("$SECRET_TOKEN/x", "p")) == "$SECRET_TOKEN/x"
    assert str(user_path("/a/${HOME}/b", "p")) == "/a/${HOME}/b"
    with pytest.raises(PathError, match="only '~'"):
        user_path("~root/.ssh/id_rsa", "p")


def test_atomic_writes_get_the_mode_a_plain_write_would_have(tmp_path: Path) -> None:
    # mkstemp/mkdtemp make 0600/0700; an exported Modelfile or GGUF folder must follow the umask like
    # any file the user writes (another account, e.g. a service's, may need to read it).
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "Modelfile", "FROM ./model.gguf\n")
        out = write_dir_atomically(tmp_path / "adapter", lambda d: (d / "a.json").write_text("{}"))
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "Modelfile").stat().st_mode & 0o777 == 0o644
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.json").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "Modelfile").read_text() == "FROM ./model.gguf\n"


def test_quoted_keeps_at_most_the_limit_on_one_line() -> None:
    assert quoted("short") == "'short'"
    long = quoted("x" * 100_000)
    assert len(long) < QUOTE_LIMIT + 50 and "99800 more characters" in long
    assert "\n" not in quoted("a\nb\x00c")


def test_the_engine_refuses_a_fifo_dataset_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DatasetError, match="named pipe"):
        inspect_dataset(str(fifo))
    with pytest.raises(DatasetError, match="too long"):
        inspect_dataset(str(tmp_path / ("a" * 300 + ".jsonl")))


# -- the policy on its own ----------------------------------------------------------------------------


def test_policy_modes_and_what_they_refuse(
    tmp_path: Path, user_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    default = FilePolicy.build(state)
    assert default.source == "default"
    assert default.problem(Path("/etc/passwd")) is not None
    assert default.problem(Path("/proc/self/environ")) is not None
    assert "credentials" in (default.problem(user_home / ".ssh" / "config") or "")
    assert "key" in (default.problem(tmp_path / "server.pem") or "")
    assert default.problem(user_home / "data" / "x.jsonl") is None

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("BACKPROP_ALLOWED_DIRS", f"{allowed}{os.pathsep}relative/ignored")
    env = FilePolicy.build(state)
    assert env.source == "env" and env.folders == (state.resolve(), allowed.resolve())
    assert env.problem(allowed / "x.jsonl") is None
    assert env.problem(user_home / "data" / "x.jsonl") is not None
    assert env.problem(state / "jobs" / "x") is None  # the state folder, always

    roots = FilePolicy.build(state, roots=(user_home.resolve(),))
    assert roots.source == "roots"  # roots win over the environment
    assert roots.problem(user_home / "data" / "x.jsonl") is None
    assert roots.problem(allowed / "x.jsonl") is not None
    assert roots.problem(user_home / ".ssh" / "id_ed25519") is not None  # even inside a root


# -- the real server: one test per bug --------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_a_fifo_never_hangs_a_tool(home: Path, tmp_path: Path, mode: str) -> None:
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    os.mkfifo(model_dir / "config.json")
    calls = [
        ("check_dataset", {"path": str(fifo)}),
        ("start_finetune", {"dataset_path": str(fifo)}),
        ("run_slao_series", {"dataset_paths": [str(fifo)], "num_runs": 2}),
        ("try_model", {"prompt": "hi", "model": "tiny", "adapter_path": str(fifo)}),
        ("export_gguf", {"adapter_path": str(fifo)}),
        ("start_finetune", {"dataset_path": str(tmp_path), "model": str(fifo)}),
    ]
    async with Client(server(home), mode=mode) as client:
        for tool, args in calls:
            is_error, text = await call(client, tool, args)
            assert is_error and "named pipe (FIFO)" in text, (tool, text)


@pytest.mark.anyio
async def test_a_name_over_255_bytes_is_a_clear_error_in_every_tool(home: Path, tmp_path: Path) -> None:
    long = str(tmp_path / ("n" * 300 + ".jsonl"))
    calls = [
        ("check_dataset", {"path": long}),
        ("start_finetune", {"dataset_path": long}),
        ("run_slao_series", {"dataset_paths": [long], "num_runs": 2}),
        ("export_gguf", {"adapter_path": long}),
        ("try_model", {"prompt": "hi", "model": long}),
    ]
    async with Client(server(home)) as client:
        for tool, args in calls:
            is_error, text = await call(client, tool, args)
            assert is_error and "too long" in text, (tool, text)
            assert len(text) < 1000, "the 300-character name is quoted, not repeated whole"


@pytest.mark.anyio
async def test_a_long_non_ascii_prompt_reaches_the_engine(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """11,000 emoji are 132 kB once JSON-escaped: over Linux's 128 KiB limit for one argv item.

    The engine runs for real here (offline), and fails on the model, not on the prompt's size.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompt = "\U0001f600" * 11_000
    assert len(json.dumps(prompt)) > 128 * 1024
    async with Client(server(home)) as client:
        with anyio.fail_after(120):
            result = await client.call_tool("try_model", {"prompt": prompt, "model": "nobody/nothing"})
    text = " ".join(c.text for c in result.content if isinstance(c, TextContent))
    assert result.is_error and "nobody/nothing" in text, text
    assert "Argument list too long" not in text
    async with Client(server(home)) as client:
        is_error, text = await call(client, "try_model", {"prompt": "x" * 40_000, "model": "tiny"})
    assert is_error and "at most 32000 characters" in text  # the schema's documented limit


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_system_and_credential_files_are_refused(
    home: Path, tmp_path: Path, user_home: Path, mode: str
) -> None:
    link = tmp_path / "innocent.jsonl"
    link.symlink_to("/etc/passwd")
    refused = [
        ("check_dataset", {"path": "/etc/passwd"}, "/etc"),
        ("check_dataset", {"path": str(link)}, "/etc"),  # symlinks are resolved before the check
        ("start_finetune", {"dataset_path": "/proc/self/environ"}, "/proc"),
        ("check_dataset", {"path": str(user_home / ".aws" / "credentials")}, ".aws"),
        ("try_model", {"prompt": "hi", "model": str(user_home / ".ssh")}, ".ssh"),
        ("export_gguf", {"adapter_path": str(user_home / ".ssh")}, ".ssh"),
    ]
    async with Client(server(home), mode=mode) as client:
        for tool, args, where in refused:
            is_error, text = await call(client, tool, args)
            assert is_error and "refused" in text and where in text, (tool, text)
            assert "BACKPROP_ALLOWED_DIRS" in text  # how to allow another folder
            assert "root:" not in text and "BEGIN" not in text


@pytest.mark.anyio
async def test_a_missing_path_lists_its_folder_only_inside_the_allowed_area(
    home: Path, user_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (user_home / "data" / "server.pem").write_text("secret")
    (user_home / "data" / "other.jsonl").write_text("{}\n")
    async with Client(server(home)) as client:
        _, text = await call(client, "check_dataset", {"path": str(user_home / "data" / "typo.jsonl")})
        assert "other.jsonl" in text and "server.pem" not in text  # key files are never named
        _, text = await call(client, "check_dataset", {"path": str(user_home / ".ssh" / "typo")})
        assert "id_ed25519" not in text

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv("BACKPROP_ALLOWED_DIRS", str(allowed))
    async with Client(server(home)) as client:
        is_error, text = await call(client, "check_dataset", {"path": str(user_home / "data" / "typo.jsonl")})
        assert is_error and "refused" in text and "other.jsonl" not in text
        assert str(allowed) in text and "BACKPROP_ALLOWED_DIRS" in text
        (allowed / "a.jsonl").write_text("{}\n")
        is_error, text = await call(client, "check_dataset", {"path": str(allowed / "typo.jsonl")})
        assert is_error and "does not exist" in text and "a.jsonl" in text  # inside: listed


@pytest.mark.anyio
async def test_environment_variables_are_never_expanded_nor_leaked(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET_TOKEN", "hunter2-value")
    async with Client(server(home)) as client:
        for path in ["${SECRET_TOKEN}/x.jsonl", f"{tmp_path}/$SECRET_TOKEN/x.jsonl", "$HOME/x.jsonl"]:
            is_error, text = await call(client, "check_dataset", {"path": path})
            assert is_error and "hunter2-value" not in text, text
            assert os.environ["HOME"] not in text.split("Allowed:")[0] or path.startswith(str(tmp_path))
        _, text = await call(client, "check_dataset", {"path": f"{tmp_path}/$SECRET_TOKEN/x.jsonl"})
        assert "not expanded" in text


@pytest.mark.anyio
async def test_errors_quote_at_most_200_characters_of_any_input(home: Path, tmp_path: Path) -> None:
    marker = "Z" * 250
    long_path = f"{tmp_path}/{marker}/{'y' * 3000}"
    long_id = "ft-" + "1" * 200
    async with Client(server(home)) as client:
        for tool, args in [
            ("check_dataset", {"path": long_path}),
            ("start_finetune", {"dataset_path": "relative/" + marker}),
            ("job_status", {"job_id": long_id, "wait_s": 0}),
            ("start_finetune", {"dataset_path": str(tmp_path), "model": "q" * 250}),
        ]:
            is_error, text = await call(client, tool, args)
            assert is_error
            assert marker not in text and "1" * 201 not in text and "q" * 201 not in text, (tool, text)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_client_roots_are_honoured(home: Path, tmp_path: Path, dataset: Path, mode: str) -> None:
    inside = tmp_path / "project"
    inside.mkdir()
    outside_file = dataset  # in the fake user's home, outside the root
    async with Client(server(home), mode=mode, list_roots_callback=roots_callback(inside)) as client:
        is_error, text = await call(client, "start_finetune", {"dataset_path": str(outside_file)})
        assert is_error and "refused" in text and "outside the folders" in text
        assert str(inside) in text and "roots" in text  # which folders, and how to allow another
        is_error, text = await call(client, "check_dataset", {"path": str(inside / "missing.jsonl")})
        assert is_error and "does not exist" in text  # inside: checked, not refused
        (inside / "chat.jsonl").write_text(dataset.read_text())
        is_error, text = await call(client, "start_finetune", {"dataset_path": str(inside / "chat.jsonl")})
        assert not is_error, text
    # The same file without roots: the default policy allows it.
    async with Client(server(home), mode=mode) as client:
        is_error, text = await call(client, "start_finetune", {"dataset_path": str(outside_file)})
        assert not is_error, text


@pytest.mark.anyio
async def test_roots_are_asked_once_per_connection_and_again_after_list_changed(
    home: Path, tmp_path: Path, dataset: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    current = [first]
    asked = []

    async def list_roots(_ctx: Any) -> ListRootsResult:
        asked.append(current[0])
        return ListRootsResult(roots=[Root(uri=current[0].as_uri())])

    async with Client(server(home), mode="legacy", list_roots_callback=list_roots) as client:
        for _ in range(3):
            _, text = await call(client, "check_dataset", {"path": str(second / "x.jsonl")})
            assert "refused" in text
        assert asked == [first]
        current[0] = second
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # roots are deprecated on 2026-07-28, not on 2025-11-25
            await client.send_roots_list_changed()
        with anyio.fail_after(10):
            while True:  # the notification is handled asynchronously
                _, text = await call(client, "check_dataset", {"path": str(second / "x.jsonl")})
                if "does not exist" in text:
                    break
                await anyio.sleep(0.05)
        assert asked[-1] == second


@pytest.mark.anyio
async def test_an_unexpected_exception_names_its_type_not_just_the_tool() -> None:
    server = MCPServer("crashy")

    @server.tool(name="crash")
    def crash(n: int) -> str:
        return {"a": 1}["b" * n]  # KeyError, with the whole key in its message

    guard_tools(server)
    async with Client(server) as client:
        result = await client.call_tool("crash", {"n": 5000})
    text = " ".join(c.text for c in result.content if isinstance(c, TextContent))
    assert result.is_error and "KeyError" in text and len(text) < 800, text


def test_cli_and_api_paths_never_crash_on_a_bad_name(tmp_path: Path) -> None:
    from engine.contract.files import local_or_name

    fifo = tmp_path / "f.jsonl"
    os.mkfifo(fifo)
    long = str(tmp_path / ("n" * 300))
    assert local_or_name(long) == long  # left for the loader to explain, not an OSError here
    assert local_or_name(str(fifo)) == str(fifo)
    assert local_or_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert local_or_name(str(tmp_path / "." / "")) == str(tmp_path.resolve())


@pytest.mark.anyio
async def test_a_huge_dataset_is_left_to_the_worker_not_read_in_the_call(home: Path, tmp_path: Path) -> None:
    from engine.planning.preflight import MAX_TOOL_INSPECT_BYTES as MAX_INSPECT_BYTES

    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:  # sparse: takes no disk space, but reading it would take minutes
        f.truncate(MAX_INSPECT_BYTES + 1)
    async with Client(server(home)) as client:
        with anyio.fail_after(CALL_BOUND_S):
            result = await client.call_tool("start_finetune", {"dataset_path": str(big), "device": "cpu"})
    assert not result.is_error, result.content
    assert any("the worker checks its rows" in note for note in result.structured_content["notes"])


def test_output_folders_go_through_the_policy_and_the_type_check(tmp_path: Path, user_home: Path) -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    from backprop_mcp.paths import resolve_writable_dir

    assert resolve_writable_dir(str(tmp_path / "new"), "output_dir") == (tmp_path / "new").resolve()
    assert resolve_writable_dir(str(tmp_path), "output_dir") == tmp_path.resolve()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "file").write_text("x")
    for bad, why in [
        ("/etc/backprop", "refused"),
        (str(user_home / ".ssh" / "out"), "refused"),
        (str(fifo), "named pipe"),
        (str(tmp_path / "file"), "is a file"),
        (str(tmp_path / "no" / "such"), "does not exist"),
        ("~/" + "../" * 30 + "etc", "refused"),
    ]:
        with pytest.raises(ToolError, match=why):
            resolve_writable_dir(bad, "output_dir")


@pytest.mark.anyio
async def test_a_client_whose_roots_fail_gets_the_default_policy(home: Path, dataset: Path) -> None:
    async def broken_roots(_ctx: Any) -> ListRootsResult:
        raise RuntimeError("no roots today")

    async with Client(server(home), mode="legacy", list_roots_callback=broken_roots) as client:
        is_error, text = await call(client, "check_dataset", {"path": "/etc/passwd"})
        assert is_error and "system folder" in text
        is_error, text = await call(client, "start_finetune", {"dataset_path": str(dataset)})
        assert not is_error, text
