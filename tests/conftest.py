"""Fixtures shared by every test file. Keep each one small and say what it is for.

- Every test runs offline (no hub) with its own empty ``BACKPROP_HOME`` (autouse).
- ``tiny_model_dir``: the offline tiny Qwen2 model, built once per test session under
  ``$BACKPROP_TEST_CACHE`` (set it to reuse builds across sessions) or a pytest temp folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `pytest` from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

# huggingface_hub reads these once, when first imported: set them before any test imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from tokenizers
# An event the reader does not know fails loudly here instead of being skipped (engine.contract.events).
os.environ["BACKPROP_STRICT_EVENTS"] = "1"


@pytest.fixture(autouse=True)
def _isolated_backprop_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets an empty state folder and no network for the hub."""
    home = tmp_path / "backprop-home"
    monkeypatch.setenv("BACKPROP_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return home


@pytest.fixture(scope="session")
def test_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for expensive builds shared by the whole session ($BACKPROP_TEST_CACHE if set)."""
    env = os.environ.get("BACKPROP_TEST_CACHE")
    if env:
        path = Path(env).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("backprop-test-cache")


@pytest.fixture(scope="session")
def tiny_model_dir(test_cache_dir: Path) -> Path:
    """The tiny random-weight Qwen2 chat model (ChatML template), built once per session."""
    from engine.models.tiny import ensure_tiny_model

    return ensure_tiny_model(test_cache_dir / "models", family="qwen2")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test: on a shared machine with few cores its default thread pool spends
    the time waiting (tens of times slower for the tiny model's small matmuls)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
