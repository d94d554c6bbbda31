"""A small synthetic preference task the tiny model can learn on a CPU in seconds (for the preference tests).

The rule, visible in every prompt: the answer names the colour the prompt ends with ("... Name the colour:
red." -> "red"). Prompts open with three random filler words, so no two are alike; held-out prompts use
fillers never seen in training. Chosen answers follow the rule; rejected ones break it, half of them with
"blue", a colour no prompt asks for. The supervised demonstrations are noisy on purpose, as mixed-quality
demonstrations are: most answer "blue" whatever the prompt asks, so a model tuned on them alone answers
"blue" to most prompts, and what a preference method adds shows in the share of prompts answered by the rule.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

COLOURS = ["red", "green", "yellow", "purple", "orange"]
WRONG = "blue"  # never asked for
FILLERS = [
    "apple",
    "banana",
    "cherry",
    "river",
    "stone",
    "bread",
    "garden",
    "market",
    "window",
    "pencil",
    "silver",
    "forest",
    "island",
    "candle",
    "rocket",
    "planet",
    "winter",
    "summer",
    "autumn",
    "spring",
    "bottle",
    "button",
    "castle",
    "dragon",
    "flower",
    "guitar",
    "hammer",
    "jacket",
    "kettle",
    "ladder",
    "mirror",
    "needle",
    "pepper",
    "rabbit",
    "saddle",
    "tunnel",
    "violin",
    "wallet",
    "zipper",
    "basket",
    "cookie",
    "dinner",
    "engine",
    "farmer",
    "ginger",
    "helmet",
    "insect",
]
TRAIN_FILLERS, HELD_OUT_FILLERS = FILLERS[:32], FILLERS[32:]


def prompt(rng: random.Random, fillers: list[str], colour: str) -> str:
    return f"{' '.join(rng.sample(fillers, 3))}. Name the color: {colour}."


def follows_rule(answer: str, colour: str) -> bool:
    """The answer begins with the colour the prompt asked for."""
    return answer.strip().startswith(colour)


def write_task(
    folder: Path, *, per_colour: int = 12, demo_accuracy: float = 0.4, seed: int = 0
) -> dict[str, Any]:
    """Writes ``sft.jsonl`` (noisy demonstrations), ``pairs.jsonl`` (prompt, chosen, rejected) and
    ``judged.jsonl`` (the pairs unpaired: prompt, completion, label) into ``folder``; returns their paths
    and held-out prompts with their colours, for greedy generation."""
    rng = random.Random(seed)
    asked = [(prompt(rng, TRAIN_FILLERS, c), c) for c in COLOURS for _ in range(per_colour)]
    rng.shuffle(asked)
    demos = [{"prompt": p, "completion": c if rng.random() < demo_accuracy else WRONG} for p, c in asked]
    pairs = [
        {
            "prompt": p,
            "chosen": c,
            "rejected": WRONG if rng.random() < 0.5 else rng.choice([x for x in COLOURS if x != c]),
        }
        for p, c in asked
    ]
    judged = [
        {"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
        for pair in pairs
        for side in ("chosen", "rejected")
    ]
    paths = {}
    for name, rows in (("sft", demos), ("pairs", pairs), ("judged", judged)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = [(prompt(rng, HELD_OUT_FILLERS, c), c) for c in COLOURS for _ in range(4)]
    return {**paths, "held_out": held_out}
