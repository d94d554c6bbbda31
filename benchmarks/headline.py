"""Issue 26's two headline lines from the records of `speed_call_v10a.sh` calls, in the issue's formats.

    python benchmarks/headline.py OUT_0.5B [OUT_7B ...]

Each OUT is a call's output folder (its `v10a.tgz` unpacked, or the folder before it was packed):
`flow_b.json` (the server flow with its warm worker: what a user gets by default on a GPU),
`engine_mb*/profile_step-fixed-mb*.json` and `unsloth.jsonl`. The architecture comes from the records,
so the folders can be given in any order; a figure no folder holds is printed as "not measured".

Pairings (goal 3): without recomputation, the engine's defaults on the card (`fastg+nr`) against
Unsloth with `--grad-ckpt off`; with it, the engine's offloaded checkpointing (`fast+off`, like
Unsloth's; `fastg`, layer inputs kept on the GPU, where `fast+off` did not run) against Unsloth's default.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

SIZES = {"qwen2.5-0.5b": "0.5B", "qwen2.5-7b": "7B"}
NO_RECOMPUTATION = ("fastg+nr",)
WITH_RECOMPUTATION = ("fast+off", "fastg")


def _size(arch: str | None) -> str:
    return SIZES.get(arch or "", arch or "?")


def read_folder(folder: Path) -> dict:
    """What one call measured: {'flow': {...}, 'engine': {mb: variants}, 'unsloth': {tag: record}, 'size', 'card'}."""
    found: dict = {"flow": None, "engine": {}, "unsloth": {}, "size": None, "card": None, "date": None}
    log = folder / "log.txt"  # the call's second line is its date
    if log.exists() and (date := re.search(r"^(\d{4}-\d\d-\d\d) \d\d:", log.read_text(), re.MULTILINE)):
        found["date"] = date.group(1)
    flow = folder / "flow_b.json"
    if flow.exists():
        record = json.loads(flow.read_text())
        found["flow"] = record
        found["size"] = _size(record.get("arch"))
        found["card"] = record.get("gpu")
    for path in sorted(folder.glob("**/profile_step-fixed-mb*.json")):
        record = json.loads(path.read_text())
        found["engine"][record["batch"]] = record["variants"]
        found["card"] = record.get("device") or found["card"]
        arch = "qwen2.5-7b" if "7b" in str(record.get("model_dir", "")) else "qwen2.5-0.5b"
        found["size"] = found["size"] or _size(arch)
    unsloth = folder / "unsloth.jsonl"
    if unsloth.exists():
        for line in unsloth.read_text().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("phase") == "done":
                    found["unsloth"][record["run"]] = record
                    found["size"] = found["size"] or _size(record.get("model"))
    return found


def _pairing(found: dict, mb: int, recomputation: bool) -> str | None:
    variants = found["engine"].get(mb, {})
    engine = next(
        (variants[v] for v in (WITH_RECOMPUTATION if recomputation else NO_RECOMPUTATION) if v in variants),
        None,
    )
    theirs = found["unsloth"].get(f"mb{mb}-{'unsloth' if recomputation else 'off'}")
    if engine is None or theirs is None:
        return None
    speed = engine["tokens_per_s"] / theirs["tokens_per_s"]
    memory = engine["peak_mem_gib"] / theirs["peak_mem_gib"]
    return f"{speed:.2f}× (at {memory:.2f}× its peak memory)"


def headlines(folders: list[Path], today: str) -> list[str]:
    """The two lines; dated by the calls' logs (``today`` where a folder has none)."""
    by_size = {}
    for folder in folders:
        found = read_folder(folder)
        if found["size"]:
            by_size.setdefault(found["size"], []).append(found)
    cards = sorted(
        {
            str(f["card"]).split(",")[0].removeprefix("GPU 0: ")
            for fs in by_size.values()
            for f in fs
            if f["card"]
        }
    )
    card = " and ".join(cards) or "card unknown"
    dates = sorted({f["date"] or today for fs in by_size.values() for f in fs})
    when = " and ".join(dates) or today

    def flow(size: str, key: str) -> float | None:
        return next(
            (f["flow"][key] for f in by_size.get(size, []) if f["flow"] and f["flow"].get(key) is not None),
            None,
        )

    def said(value: float | None, unit: str) -> str:
        return f"{value:.{2 if unit == ' s' else 3}f}{unit}" if value is not None else "not measured"

    start_up = (
        f"Start-up: first step {said(flow('0.5B', 'first_step_after_s'), ' s')} after start_finetune (0.5B), "
        f"{said(flow('7B', 'first_step_after_s'), ' s')} (7B); whole job "
        f"{said(flow('0.5B', 'job_over_step_rate'), '×')} its step rate (0.5B, 200 steps), "
        f"{said(flow('7B', 'job_over_step_rate'), '×')} (7B, 100 steps) ({card}, {when})"
    )

    def pairing(size: str, mb: int, recomputation: bool) -> str:
        got = next((p for f in by_size.get(size, []) if (p := _pairing(f, mb, recomputation))), None)
        return got or "not measured"

    same = (
        f"Same settings as Unsloth: 0.5B mb4 {pairing('0.5B', 4, False)}, mb16 {pairing('0.5B', 16, False)}; "
        f"7B mb4 {pairing('7B', 4, False)} (no recomputation); {pairing('0.5B', 4, True)}, "
        f"{pairing('0.5B', 16, True)}, {pairing('7B', 4, True)} (with) ({card}, {when})"
    )
    return [start_up, same]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    missing = [a for a in argv if not Path(a).is_dir()]
    if missing:
        print(
            f"not a folder: {', '.join(missing)} (give speed_call_v10a.sh's output folders)", file=sys.stderr
        )
        return 2
    for line in headlines([Path(a) for a in argv], datetime.date.today().isoformat()):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
