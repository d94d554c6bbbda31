"""Write the example datasets in this folder (deterministic: run it again, get the same files).

    python examples/data/make_examples.py

Every file holds the same three learnable tasks in a different row format, so that a short
LoRA run on the tiny model visibly lowers the loss:
  - reverse a word            "Reverse the word: apple"        -> "elppa"
  - add two numbers           "What is 17 + 25?"               -> "42"
  - name a country's capital  "What is the capital of France?" -> "Paris"
``math_sft.jsonl`` and ``math_prompts.jsonl`` are an SFT -> GRPO pair: sums answered as
"The answer is \\boxed{42}.", then the same kind of questions with an ``answer`` column for GRPO's rewards.
``broken/chat_bad_rows.jsonl`` shows what the dataset checker reports for malformed rows.

The preference files (for ``method: dpo``, ``kto``, ``orpo``) hold the same tasks as pairs of answers,
one right and one plausibly wrong (the word left as it is or reversed badly, a sum off by one or ten,
another country's capital), in each of trl's formats.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = {
    "chat": 160, "sharegpt": 120, "alpaca": 120, "prompt_completion": 120, "text": 150,
    "preference": 120, "preference_chat": 80, "preference_implicit": 80, "unpaired_preference": 160,
    "math_sft": 200, "math_prompts": 120,
}  # fmt: skip

WORDS = [
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
    "yellow",
    "orange",
    "purple",
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

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "China": "Beijing",
    "Russia": "Moscow",
    "Turkey": "Ankara",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Belgium": "Brussels",
}

SYSTEM = "You are a concise assistant. Answer with the result only."


def task(rng: random.Random) -> tuple[str, str, str, str]:
    """One task instance: (chat question, alpaca instruction, alpaca input, answer)."""
    kind = rng.choice(("reverse", "add", "capital"))
    if kind == "reverse":
        word = rng.choice(WORDS)
        return f"Reverse the word: {word}", "Reverse the word.", word, word[::-1]
    if kind == "add":
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        return f"What is {a} + {b}?", "Add the two numbers.", f"{a} + {b}", str(a + b)
    country = rng.choice(sorted(CAPITALS))
    return (
        f"What is the capital of {country}?",
        "Name the capital city of the country.",
        country,
        CAPITALS[country],
    )


def chat_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": SYSTEM})
        for _turn in range(2 if rng.random() < 0.15 else 1):  # some two-exchange conversations
            question, _, _, answer = task(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def sharegpt_rows(rng: random.Random, n: int) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [
        {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in row["messages"]]}
        for row in chat_rows(rng, n)
    ]


def alpaca_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        question, instruction, given, answer = task(rng)
        if rng.random() < 0.3:  # Alpaca rows without an input are common: the question says it all
            rows.append({"instruction": question, "input": "", "output": answer})
        else:
            rows.append({"instruction": instruction, "input": given, "output": answer})
    return rows


def prompt_completion_rows(rng: random.Random, n: int) -> list[dict]:
    return [{"prompt": q, "completion": a} for q, _, _, a in (task(rng) for _ in range(n))]


def text_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        _, _, given, answer = task(rng)
        if given in CAPITALS:
            text = f"The capital of {given} is {answer}."
        elif "+" in given:
            text = f"{given} = {answer}."
        else:
            text = f"The word {given} reversed is {answer}."
        rows.append({"text": text})
    return rows


def wrong_answer(rng: random.Random, question: str, answer: str) -> str:
    """A plausible wrong answer: what a model that has not learned the task says."""
    if question.startswith("Reverse"):
        word = question.rsplit(" ", 1)[1]
        backwards = word[::-1]
        swapped = backwards[1] + backwards[0] + backwards[2:]  # two letters the wrong way round
        return word if rng.random() < 0.5 or swapped == backwards else swapped
    if question.startswith("What is") and "+" in question:
        return str(int(answer) + rng.choice((-10, -1, 1, 10)))
    return rng.choice(sorted(set(CAPITALS.values()) - {answer}))


def preference_rows(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        question, _, _, answer = task(rng)
        rows.append({"prompt": question, "chosen": answer, "rejected": wrong_answer(rng, question, answer)})
    return rows


def preference_chat_rows(rng: random.Random, n: int) -> list[dict]:
    """Conversational pairs: the prompt's messages (a system message in some), each answer an assistant turn."""
    rows = []
    for pair in preference_rows(rng, n):
        prompt = [{"role": "user", "content": pair["prompt"]}]
        if rng.random() < 0.25:
            prompt.insert(0, {"role": "system", "content": SYSTEM})
        rows.append({
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}],
        })  # fmt: skip
    return rows


def preference_implicit_rows(rng: random.Random, n: int) -> list[dict]:
    """Two whole conversations that share their start (the prompt), as many public preference sets ship."""
    return [
        {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
        for row in preference_chat_rows(rng, n)
    ]


def unpaired_preference_rows(rng: random.Random, n: int) -> list[dict]:
    """KTO's judged answers, one per row: about two good answers for every bad one (an unpaired set need not
    be balanced; KTO's desirable/undesirable weights are for that)."""
    rows = []
    for pair in preference_rows(rng, n):
        good = rng.random() < 0.65
        rows.append(
            {"prompt": pair["prompt"], "completion": pair["chosen" if good else "rejected"], "label": good}
        )
    return rows


BAD_ROWS = [
    '{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}',
    '{"messages": [{"role": "user", "content": "What is 3 + 3?"}, {"role": "assistant", "content": "6"}]',
    '{"messages": [{"role": "user", "content": "Hello"}]}',
    '{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}',
    '{"messages": []}',
    '{"messages": [{"role": "user", "content": "Count"}, {"role": "assistant", "content": 3}]}',
    '{"prompt": "What is 1 + 1?", "completion": "2"}',
    '{"messages": [{"role": "user", "content": "What is 5 + 5?"}, {"role": "assistant", "content": "10"}]}',
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _sum(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return f"What is {a} + {b}?", a + b


def math_sft_rows(rng: random.Random, n: int) -> list[dict]:
    """SFT before GRPO: worked answers that end in a boxed number (the format GRPO's rewards read)."""
    rows = []
    for _ in range(n):
        question, total = _sum(rng)
        rows.append({"prompt": question, "completion": f"The answer is \\boxed{{{total}}}."})
    return rows


def math_prompts_rows(rng: random.Random, n: int) -> list[dict]:
    """GRPO's prompts: a question and its answer column, which the answer reward compares with."""
    rows = []
    for _ in range(n):
        question, total = _sum(rng)
        rows.append({"prompt": f"{question} Put the answer in \\boxed{{}}.", "answer": str(total)})
    return rows


def main() -> None:
    makers = {
        "chat": chat_rows,
        "sharegpt": sharegpt_rows,
        "alpaca": alpaca_rows,
        "prompt_completion": prompt_completion_rows,
        "text": text_rows,
        "preference": preference_rows,
        "preference_chat": preference_chat_rows,
        "preference_implicit": preference_implicit_rows,
        "unpaired_preference": unpaired_preference_rows,
        "math_sft": math_sft_rows,
        "math_prompts": math_prompts_rows,
    }
    for seed, (name, make) in enumerate(makers.items()):
        write_jsonl(HERE / f"{name}.jsonl", make(random.Random(seed), ROWS[name]))
    (HERE / "broken").mkdir(exist_ok=True)
    (HERE / "broken" / "chat_bad_rows.jsonl").write_text("\n".join(BAD_ROWS) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
