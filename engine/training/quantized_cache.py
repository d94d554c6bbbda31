"""A 4-bit copy of a base model, kept after a job quantized it, which later jobs load instead of quantizing
the 16-bit weights again.

Why: a QLoRA job's start reads every 16-bit weight and quantizes it on the card (15 GB for a 7B model);
the 4-bit copy is about a third of that and needs no quantizing. The copy is bitsandbytes' own
serialisation (the tensors a quantized model's ``state_dict`` holds, which transformers loads as a
pre-quantized model), so a job loads the same codes and scales it would have made.

The key is the weights' contents: the sha256 of each weight file, and the compute dtype (the saved
config carries it). Hashing a 7B model's files takes seconds, so each file's hash is remembered with its
path, size and modification time (``index.json``) and a lookup is only ``stat`` calls; a file in the
Hugging Face hub's cache needs no hashing at all (its blob is named by its sha256). The job that
quantizes a model hashes its files on a thread while it trains (CPU and disk only: no CUDA call while
CUDA graphs are being captured). After its result, engine.jobs.worker copies the weights to host memory
while it still holds the device's lock (``move_to_host``: a second or so at 7B, and the card is freed),
then releases the lock, so the next job does not wait for the disk, and writes the copy
(``write_pending``). The copy goes to a temporary folder renamed whole, so a job killed while writing
leaves no half copy. Only the plain one-device path keeps a copy: not Unsloth's loader, not FSDP's packed
codes, not remote code (the copy would lack its modeling files). The folder keeps the ``KEPT_COPIES``
most recently used copies (a copy counts as used when a job loads it); deleting it frees their space.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.contract.files import backprop_home

KEPT_COPIES = 4  # at 7B each is ~5 GB: a few models' worth, not every model ever trained
SHARD_BYTES = 2 << 30  # safetensors files of at most 2 GiB, as transformers shards
TIED_MIN = 1 << 16  # a weight this large sharing another's memory is a tie, not a shared table
_SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_root() -> Path:
    return backprop_home() / "cache" / "nf4"


def weight_files(folder: Path) -> list[Path]:
    """The model's safetensors files (a folder with none, e.g. only ``.bin`` files, gets no copy)."""
    return sorted(folder.glob("*.safetensors"))


def key_files(folder: Path) -> list[Path]:
    """What a copy's key hashes: the weights and, after them, ``config.json`` (the copy keeps the config
    it was loaded with, so an edited config must miss). No weights: nothing to key."""
    weights = weight_files(folder)
    config = folder / "config.json"
    return weights + [config] if weights and config.is_file() else weights


def _signature(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_index() -> dict[str, Any]:
    try:
        return json.loads((cache_root() / "index.json").read_text())
    except (OSError, ValueError):
        return {}


def _known_hash(path: Path, index: dict[str, Any]) -> str | None:
    seen = index.get(str(path.resolve()))
    return (
        seen["sha256"]
        if seen and {k: seen.get(k) for k in ("size", "mtime_ns")} == _signature(path)
        else None
    )


def _hash_without_reading(path: Path, index: dict[str, Any]) -> str | None:
    """The file's sha256 where it is known without reading the file: remembered in the index for its
    path, size and mtime, or the name the hub's cache gives it (a snapshot's file links to
    ``blobs/<sha256 of its contents>`` where git LFS stores it, as weights are; small files' blobs have
    git's 40-digit names). None: it must be hashed."""
    target = path.resolve()
    named = target.name if target.parent.name == "blobs" and _SHA256.fullmatch(target.name) else None
    return _known_hash(path, index) or named


def _entry(hashes: list[str], compute: str) -> Path:
    key = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:32]
    return cache_root() / f"{key}-{compute}"


def lookup(folder: Path, compute: str) -> Path | None:
    """The kept 4-bit copy of the model in ``folder`` for ``compute`` ("bf16", ...), or None."""
    files = key_files(folder)
    index = _read_index()
    hashes = [_hash_without_reading(f, index) for f in files]
    if not files or None in hashes:
        return None
    entry = _entry([h for h in hashes if h], compute)
    if not (entry / "config.json").exists():
        return None
    with contextlib.suppress(OSError):  # (a read-only cache still loads)
        os.utime(entry)  # used now: the last to go (``_evict``)
    return entry


def _evict(keep: int = KEPT_COPIES) -> list[Path]:
    """Remove all but the ``keep`` most recently used copies; the removed ones."""
    copies = sorted((p for p in cache_root().iterdir() if p.is_dir() and not p.name.startswith(".")),
                    key=lambda p: p.stat().st_mtime_ns, reverse=True)  # fmt: skip
    for old in copies[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return copies[keep:]


def drop(entry: Path) -> None:
    """Remove a kept copy (one that failed to load)."""
    shutil.rmtree(entry, ignore_errors=True)


def _hash_file(path: Path) -> str:
    with path.open("rb") as f:  # file_digest reads in large blocks; sha256 lets go of the GIL on them
        return hashlib.file_digest(f, "sha256").hexdigest()


def _remember(hashed: dict[Path, str]) -> None:
    """Add the files' hashes to the index (read again and replaced whole: jobs may write it at once)."""
    index = _read_index()
    for path, digest in hashed.items():
        index[str(path.resolve())] = {**_signature(path), "sha256": digest}
    root = cache_root()
    tmp = root / f".index-{os.getpid()}.json"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, root / "index.json")


@dataclass
class PendingCopy:
    """A quantized model's weights to keep: its tensors as loaded (references, no copies) and its config."""

    folder: Path
    compute: str
    tensors: dict[str, Any]
    config_json: str
    hashes: list[str] = field(default_factory=list)
    error: str | None = None
    _thread: threading.Thread | None = None

    def hash_in_background(self) -> None:
        self._thread = threading.Thread(target=self._hash, name="weights-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        try:
            index = _read_index()
            files = key_files(self.folder)
            hashed = {f: _hash_without_reading(f, index) or _hash_file(f) for f in files}
            self.hashes = [hashed[f] for f in files]
            cache_root().mkdir(parents=True, exist_ok=True)
            _remember(hashed)
        except OSError as e:
            self.error = f"hashing {self.folder}: {e}"

    def write(self) -> Path | None:
        """Write the copy (after the hashes); the entry's folder, or None when there is nothing to write."""
        if self._thread is not None:
            self._thread.join()
        if self.error or not self.hashes:
            return None
        entry = _entry(self.hashes, self.compute)
        if entry.exists():
            return entry  # another job kept it meanwhile
        size = sum(t.numel() * t.element_size() for t in self.tensors.values())
        if shutil.disk_usage(cache_root()).free < 2 * size + (1 << 30):
            self.error = f"not enough free disk under {cache_root()} for a {size / 2**30:.1f} GiB copy"
            return None
        tmp = cache_root() / f".{entry.name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _write_shards(self.tensors, tmp)
            (tmp / "config.json").write_text(self.config_json)
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _evict()
        return entry


def _write_shards(tensors: dict[str, Any], folder: Path) -> None:
    """``tensors`` as transformers' sharded safetensors files (with the index naming each tensor's file)."""
    from safetensors.torch import save_file

    shards: list[dict[str, Any]] = [{}]
    held = total = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and held + nbytes > SHARD_BYTES:
            shards.append({})
            held = 0
        shards[-1][name] = t
        held += nbytes
        total += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    weight_map = {}
    for shard, name in zip(shards, names, strict=True):
        save_file({k: v.detach().to("cpu").contiguous() for k, v in shard.items()}, str(folder / name),
                  metadata={"format": "pt"})  # fmt: skip
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


_PENDING: list[PendingCopy] = []
_IN_WORKER = [False]


def plan_copies_in_this_process() -> None:
    """Called by a job's worker: only there is a copy planned (it writes them at its end). A process that
    loads models for itself (a benchmark, a test) gets no hashing thread beside its steps."""
    _IN_WORKER[0] = True


def keep_after_job(model: Any, folder: Path, compute: str) -> PendingCopy | None:
    """Plan the copy of ``model`` (just loaded and quantized from ``folder``): its tensors are taken now,
    before any adapter wraps its layers; the hashing starts on a thread. None outside a job's worker, or
    when this process planned that copy already (a series loads its base once a run)."""
    if not _IN_WORKER[0] or any(p.folder == folder and p.compute == compute for p in _PENDING):
        return None
    seen: set[int] = set()
    tensors = {}
    for name, t in model.state_dict().items():
        if t.numel() and t.data_ptr() in seen:
            if t.numel() >= TIED_MIN:  # a tied weight (the head sharing the embedding): the config re-ties it
                continue
            t = t.clone()  # a small table two quant states share: safetensors keeps no shared memory
        seen.add(t.data_ptr())
        tensors[name] = t
    pending = PendingCopy(folder, compute, tensors, model.config.to_json_string(use_diff=True))
    pending.hash_in_background()
    _PENDING.append(pending)
    return pending


def move_to_host() -> None:
    """Copy the planned copies' weights off the card and free the card's cached memory (this process is
    done training: the next job may take the device while the copy is written)."""
    on_card = False
    for pending in _PENDING:
        try:
            on_card |= any(t.is_cuda for t in pending.tensors.values())
            pending.tensors = {k: t.detach().to("cpu") for k, t in pending.tensors.items()}
        except Exception as e:  # noqa: BLE001 - a card in a bad state: no copy, the job's result stands
            pending.error = f"reading the weights back: {type(e).__name__}: {e}"
            pending.tensors = {}
    if on_card:
        import gc

        import torch

        gc.collect()
        torch.cuda.empty_cache()


def write_pending() -> None:
    """Write the copies this process planned (the job's worker calls it after its result and
    ``move_to_host``). A failure costs only the copy: it is said on stderr (the worker's log), never
    raised."""
    while _PENDING:
        pending = _PENDING.pop()
        t0 = time.perf_counter()
        try:
            entry = pending.write() if pending.error is None else None
        except Exception as e:  # noqa: BLE001 - the job is done; the copy is only a speed-up
            pending.error = f"{type(e).__name__}: {e}"
            entry = None
        if entry is not None:
            print(f"kept a 4-bit copy of {pending.folder} in {entry} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr)  # fmt: skip
        elif pending.error:
            print(f"no 4-bit copy of {pending.folder} kept: {pending.error}", file=sys.stderr)
        pending.tensors.clear()
