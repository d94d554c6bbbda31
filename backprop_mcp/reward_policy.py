"""Whether an MCP tool may start a GRPO job whose reward is the user's own Python file.

A reward file runs as code in the job's worker, with the server's rights. An agent that was steered by
what it read could write such a file and name it, so from a tool (the CLI and the Python API always
allow it: there the user runs their own code) a Python reward needs both:

1. the server started with ``BACKPROP_ALLOW_REWARD_CODE=1`` in its environment (off by default), and
2. the file inside the client's roots or ``BACKPROP_ALLOWED_DIRS`` (the folders the user chose for this
   server; not the default "anywhere but system folders" policy, and not the server's state folder).

Each refusal says which of the two is missing and how to change it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel

from backprop_mcp.paths import resolve_readable
from backprop_mcp.policy import ALLOWED_DIRS_ENV, current_policy
from engine.interface import quoted

REWARD_CODE_ENV = "BACKPROP_ALLOW_REWARD_CODE"
_Spec = TypeVar("_Spec", bound=BaseModel)


def reward_code_allowed() -> bool:
    return os.environ.get(REWARD_CODE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _checked_file(path: str) -> Path:
    resolved = resolve_readable(path, "grpo_rewards (python reward)", allow_dir=False)
    if resolved.suffix != ".py":
        raise ToolError(
            f"grpo_rewards: {quoted(path)} is not a .py file; a python reward names a Python file."
        )
    policy = current_policy()
    chosen = policy.roots or policy.env_dirs
    if not chosen or not any(_inside(resolved, folder) for folder in chosen):
        where = "the client's roots" if policy.roots else ALLOWED_DIRS_ENV if policy.env_dirs else "no folder"
        raise ToolError(
            f"grpo_rewards: the reward file {quoted(resolved)} is not inside a folder the user chose for this "
            f"server ({where}): reward code runs only from the client's roots or {ALLOWED_DIRS_ENV}. Put the "
            "file in the project folder the client shares, or list its folder in "
            f"{ALLOWED_DIRS_ENV} in the server's configuration and restart it."
        )
    return resolved


def check_reward_code(spec: _Spec) -> _Spec:
    """``spec`` with its Python reward files resolved, or a ToolError where the policy refuses them."""
    grpo = getattr(spec, "grpo", None)
    files = [r for r in (grpo.rewards if grpo is not None else []) if r.name == "python"]
    if grpo is None or not files:
        return spec
    if not reward_code_allowed():
        raise ToolError(
            f"grpo_rewards names a Python reward file ({quoted(files[0].path)}), which would run as code in the "
            f"job's worker, and this server does not run reward code: it is off unless the server is started "
            f"with {REWARD_CODE_ENV}=1 in its environment (add it to the server's entry in the MCP client's "
            f"configuration and restart it; the file must also lie in the client's roots or "
            f"{ALLOWED_DIRS_ENV}). Else use the built-in rewards (answer, format, json, length), or start the "
            f"job from a terminal: backprop train --method grpo --grpo-rewards {files[0].path} ... Nothing was started."
        )
    rewards = [
        r.model_copy(update={"path": str(_checked_file(r.path))}) if r.name == "python" else r
        for r in grpo.rewards
    ]
    return spec.model_copy(update={"grpo": grpo.model_copy(update={"rewards": rewards})})
