"""The synthetic world of ``slao_skills.py``: vocabulary, facts, pretraining corpus, probes, tasks.

Everything is generated from seeded ``random.Random`` instances, so every process that imports
this module rebuilds exactly the same world (world seed 0) and, for a given seed, the same task
data. An example is ``(ids, answer_start)``: token ids starting with ``<bos>`` and ending with
``<eos>``, and the index of the first answer token (the loss and the scores of the continual
tasks use only ``ids[answer_start:]``; pretraining uses every token).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache

Example = tuple[list[int], int]

FUNCTION = ["<pad>", "<bos>", "<eos>", ":", "->", ";", "=", "?", ".", "is", "of", "then", "task"]
FUNCTION += ["yes", "no", "good", "bad", "translate", "where", "does", "live", "card"]
SKILLS = [
    "copy",
    "reverse",
    "sort",
    "first",
    "last",
    "max",
    "min",
    "count",
    "parity",
    "add",
    "dedupe",
    "next",
]
LABELS = ["pos", "neg", "even", "odd"]
RELATIONS = ["colour", "city", "pet", "age"]
SYMBOLS = [chr(ord("a") + k) for k in range(24)]
NUMBERS = [str(k) for k in range(100)]
N_ENTITIES, N_ADJ, N_DICT, N_TASK_WORDS = 400, 80, 120, 8
# Compositions "<first> then <second>" whose types fit (list -> list, then list -> anything).
COMPOSITIONS = [
    ("sort", "reverse"), ("sort", "last"), ("sort", "first"), ("reverse", "first"), ("reverse", "last"),
    ("dedupe", "sort"), ("dedupe", "reverse"), ("next", "reverse"), ("last", "reverse"),
    ("first", "reverse"), ("count", "parity"), ("reverse", "max"),
]  # fmt: skip
TASKS = ["T1", "T2", "T3", "T4", "T5", "T6"]
TASK_NAMES = {
    "T1": "polarity", "T2": "residence", "T3": "top three",
    "T4": "back-translate", "T5": "profile", "T6": "tally",
}  # fmt: skip
ORDERS = {"O1": ["T1", "T2", "T3", "T4", "T5", "T6"], "O2": ["T6", "T3", "T5", "T1", "T4", "T2"]}
EXAMPLE_MAX = 48


def _pseudo_words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    onset, vowel, coda = "bdfghklmnprstvz", "aeiou", ["", "", "n", "r", "l", "s", "k"]
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(onset) + rng.choice(vowel) for _ in range(rng.choice((2, 2, 3)))) + rng.choice(
            coda
        )
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass
class World:
    tokens: list[str]
    tok: dict[str, int]
    entities: list[int]
    values: dict[str, list[int]]  # relation -> possible value ids
    facts: dict[tuple[int, str], int]  # (entity, relation) -> value
    good: set[int]
    adjectives: list[int]
    lang_a: list[int]
    translation: dict[int, int]  # language A word -> language B word
    task_words: list[int]  # 8 reserved words; task Tk uses task_words[k-1]
    task_word_colour: dict[int, int] = field(default_factory=dict)

    def ids(self, words: str) -> list[int]:
        return [self.tok[w] for w in words.split()]


@lru_cache(maxsize=1)
def build_world() -> World:
    rng = random.Random(0)  # the world seed: fixed, shared by pretraining and tasks
    taken = set(FUNCTION + SKILLS + LABELS + RELATIONS + SYMBOLS + NUMBERS)
    colours = _pseudo_words(rng, 12, taken)
    cities = _pseudo_words(rng, 30, taken)
    pets = _pseudo_words(rng, 12, taken)
    entities = _pseudo_words(rng, N_ENTITIES, taken)
    adjectives = _pseudo_words(rng, N_ADJ, taken)
    lang_a = _pseudo_words(rng, N_DICT, taken)
    lang_b = _pseudo_words(rng, N_DICT, taken)
    task_words = _pseudo_words(rng, N_TASK_WORDS, taken)
    tokens = FUNCTION + SKILLS + LABELS + RELATIONS + SYMBOLS + NUMBERS
    tokens += colours + cities + pets + entities + adjectives + lang_a + lang_b + task_words
    tok = {t: i for i, t in enumerate(tokens)}
    values = {
        "colour": [tok[w] for w in colours],
        "city": [tok[w] for w in cities],
        "pet": [tok[w] for w in pets],
        "age": [tok[str(a)] for a in range(10, 90)],
    }
    ent_ids = [tok[w] for w in entities]
    facts = {(e, rel): rng.choice(values[rel]) for e in ent_ids for rel in RELATIONS}
    adj_ids = [tok[w] for w in adjectives]
    good = set(rng.sample(adj_ids, N_ADJ // 2))
    b_ids = [tok[w] for w in lang_b]
    rng.shuffle(b_ids)
    translation = dict(zip((tok[w] for w in lang_a), b_ids, strict=True))
    tw = [tok[w] for w in task_words]
    return World(
        tokens=tokens, tok=tok, entities=ent_ids, values=values, facts=facts, good=good,
        adjectives=adj_ids, lang_a=[tok[w] for w in lang_a], translation=translation, task_words=tw,
        task_word_colour={w: rng.choice(values["colour"]) for w in tw},
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# primitive skills over lists of symbol or number ids


def apply_skill(
    w: World, skill: str, xs: list[int], k: int | None = None, sym: int | None = None
) -> list[int]:
    if skill == "copy":
        return list(xs)
    if skill == "reverse":
        return xs[::-1]
    if skill == "sort":  # symbol ids are in alphabetical order and number ids in numeric order
        return sorted(xs)
    if skill == "first":
        return xs[: k or 1]
    if skill == "last":
        return xs[-(k or 1) :]
    if skill == "max":
        return [max(xs)]
    if skill == "min":
        return [min(xs)]
    if skill == "dedupe":
        return list(dict.fromkeys(xs))
    if skill == "next":
        first = w.tok["a"]
        return [first + (x - first + 1) % 24 for x in xs]
    if skill == "count":
        return [w.tok[str(xs.count(sym))]]
    if skill == "parity":
        return [w.tok["even" if int(w.tokens[xs[0]]) % 2 == 0 else "odd"]]
    raise ValueError(skill)


def _skill_head(w: World, skill: str, k: int | None, sym: int | None) -> list[int]:
    head = [w.tok[skill]]
    if k is not None:
        head.append(w.tok[str(k)])
    if sym is not None:
        head.append(sym)
    return head


def _random_list(w: World, rng: random.Random, kind: str, lo: int = 3, hi: int = 8) -> list[int]:
    n = rng.randint(lo, hi)
    if kind == "sym":
        pool = SYMBOLS[: rng.choice((6, 12, 24))]  # small pools give repeats (dedupe, count)
        return [w.tok[rng.choice(pool)] for _ in range(n)]
    return [w.tok[str(rng.randint(0, 99))] for _ in range(n)]


def _input_kinds(skill: str) -> tuple[str, ...]:
    return ("sym",) if skill in ("count", "next") else ("sym", "num")


def skill_example(w: World, rng: random.Random, skill: str) -> tuple[Example, tuple]:
    """One primitive-skill example and its probe key (skill, input)."""
    bos, col, arrow, eos = w.tok["<bos>"], w.tok[":"], w.tok["->"], w.tok["<eos>"]
    if skill == "parity":
        xs = [w.tok[str(rng.randint(0, 99))]]
        k = sym = None
    elif skill == "add":
        a = rng.randint(0, 98)
        b = rng.randint(0, 99 - a - 1) if a < 99 else 0
        xs = [w.tok[str(a)], w.tok[str(b)]]
        prompt = [bos, w.tok["add"], col, *xs, arrow]
        return (prompt + [w.tok[str(a + b)], eos], len(prompt)), ("add", tuple(xs))
    else:
        xs = _random_list(w, rng, rng.choice(_input_kinds(skill)))
        k = rng.randint(1, 3) if skill in ("first", "last") else None
        sym = rng.choice(xs) if skill == "count" else None
    prompt = [bos, *_skill_head(w, skill, k, sym), col, *xs, arrow]
    out = apply_skill(w, skill, xs, k, sym)
    return (prompt + out + [eos], len(prompt)), (skill, k, sym, tuple(xs))


def composition_example(w: World, rng: random.Random, pair: tuple[str, str]) -> tuple[Example, tuple]:
    first, second = pair
    kind = "sym" if "next" in pair or "count" in pair else rng.choice(("sym", "num"))
    xs = _random_list(w, rng, kind, lo=4)
    k1 = rng.randint(1, 3) if first in ("first", "last") else None
    k2 = rng.randint(1, 3) if second in ("first", "last") else None
    sym = rng.choice(xs) if first == "count" else None
    mid = apply_skill(w, first, xs, k1, sym)
    out = apply_skill(w, second, mid, k2)
    head = _skill_head(w, first, k1, sym) + [w.tok["then"]] + _skill_head(w, second, k2, None)
    prompt = [w.tok["<bos>"], *head, w.tok[":"], *xs, w.tok["->"]]
    return (prompt + out + [w.tok["<eos>"]], len(prompt)), (pair, k1, k2, sym, tuple(xs))


# ---------------------------------------------------------------------------------------------
# knowledge


def fact_query(w: World, e: int, rel: str) -> Example:
    prompt = [w.tok["<bos>"], w.tok[rel], w.tok["of"], e, w.tok["?"], w.tok["->"]]
    return prompt + [w.facts[(e, rel)], w.tok["<eos>"]], len(prompt)


def lexicon_query(w: World, adj: int, polarity: str) -> Example:
    prompt = [w.tok["<bos>"], w.tok["is"], adj, w.tok[polarity], w.tok["?"], w.tok["->"]]
    yes = (adj in w.good) == (polarity == "good")
    return prompt + [w.tok["yes" if yes else "no"], w.tok["<eos>"]], len(prompt)


def translate_example(w: World, words: list[int]) -> Example:
    prompt = [w.tok["<bos>"], w.tok["translate"], *words, w.tok["->"]]
    return prompt + [w.translation[x] for x in words] + [w.tok["<eos>"]], len(prompt)


def knowledge_example(w: World, rng: random.Random) -> Example:
    bos, eos, dot, is_ = w.tok["<bos>"], w.tok["<eos>"], w.tok["."], w.tok["is"]
    u = rng.random()
    if u < 0.6:  # entity facts: statement or query
        e, rel = rng.choice(w.entities), rng.choice(RELATIONS)
        if rng.random() < 0.5:
            return [bos, e, w.tok[rel], is_, w.facts[(e, rel)], dot, eos], 1
        return fact_query(w, e, rel)
    if u < 0.8:  # lexicon
        adj = rng.choice(w.adjectives)
        if rng.random() < 0.5:
            return [bos, adj, is_, w.tok["good" if adj in w.good else "bad"], dot, eos], 1
        return lexicon_query(w, adj, rng.choice(("good", "bad")))
    if u < 0.95:  # dictionary: single words and word-by-word sentences
        return translate_example(w, rng.sample(w.lang_a, rng.choice((1, 1, 2, 3, 4, 5, 6))))
    tw = rng.choice(w.task_words)  # reserved task words only ever appear here
    return [bos, tw, w.tok["colour"], is_, w.task_word_colour[tw], dot, eos], 1


def multi_query_example(w: World, rng: random.Random) -> Example:
    prompt, answers = [w.tok["<bos>"]], []
    e = rng.choice(w.entities)
    for _ in range(rng.choice((2, 2, 3))):
        if rng.random() < 0.3:
            e = rng.choice(w.entities)
        rel = rng.choice(RELATIONS)
        prompt += [w.tok[rel], w.tok["of"], e, w.tok["?"]]
        answers.append(w.facts[(e, rel)])
    prompt.append(w.tok["->"])
    out: list[int] = []
    for k, a in enumerate(answers):
        out += ([w.tok[";"]] if k else []) + [a]
    return prompt + out + [w.tok["<eos>"]], len(prompt)


# ---------------------------------------------------------------------------------------------
# probes (held out of pretraining) and the corpus


@dataclass
class Probes:
    groups: dict[str, list[Example]]  # "skill:sort", "comp:sort+reverse", "facts", "lexicon", "dict"
    held_keys: set[tuple]


@lru_cache(maxsize=1)
def build_probes(per_type: int = 200) -> Probes:
    w, rng = build_world(), random.Random(1)
    groups: dict[str, list[Example]] = {}
    keys: set[tuple] = set()
    for skill in SKILLS:
        if skill == "parity":  # a single number token: nothing to hold out, so probe all 100
            groups["skill:parity"] = [_parity(w, n) for n in range(100)]
            continue
        seen: dict[tuple, Example] = {}
        while len(seen) < per_type:
            ex, key = skill_example(w, rng, skill)
            seen.setdefault(key, ex)
        groups[f"skill:{skill}"] = list(seen.values())
        keys |= set(seen)
    for pair in COMPOSITIONS:
        seen = {}
        while len(seen) < per_type:
            ex, key = composition_example(w, rng, pair)
            seen.setdefault(key, ex)
        groups[f"comp:{pair[0]}+{pair[1]}"] = list(seen.values())
        keys |= set(seen)
    groups["facts"] = [fact_query(w, e, rel) for e in w.entities for rel in RELATIONS]
    groups["lexicon"] = [lexicon_query(w, a, "good") for a in w.adjectives]
    groups["dict"] = [translate_example(w, [x]) for x in w.lang_a]
    return Probes(groups=groups, held_keys=keys)


def _parity(w: World, n: int) -> Example:
    prompt = [w.tok["<bos>"], w.tok["parity"], w.tok[":"], w.tok[str(n)], w.tok["->"]]
    return prompt + [w.tok["even" if n % 2 == 0 else "odd"], w.tok["<eos>"]], len(prompt)


def corpus_example(w: World, rng: random.Random, held: set[tuple]) -> list[int]:
    """One pretraining example: 45% skills, 15% compositions, 25% knowledge, 15% multi-answer."""
    u = rng.random()
    if u < 0.60:
        while True:
            if u < 0.45:
                ex, key = skill_example(w, rng, rng.choice(SKILLS))
            else:
                ex, key = composition_example(w, rng, rng.choice(COMPOSITIONS))
            if key not in held:
                return ex[0]
    if u < 0.85:
        return knowledge_example(w, rng)[0]
    return multi_query_example(w, rng)[0]


def packed_rows(n_rows: int, seed: int, row_len: int = 128) -> list[list[int]]:
    """``n_rows`` rows of ``row_len`` tokens, examples packed greedily, the tail padded with <pad>."""
    w, held = build_world(), build_probes().held_keys
    rng = random.Random(10_000 + seed)
    rows: list[list[int]] = []
    pending = corpus_example(w, rng, held)
    while len(rows) < n_rows:
        row: list[int] = []
        while len(row) + len(pending) <= row_len:
            row += pending
            pending = corpus_example(w, rng, held)
        rows.append(row + [0] * (row_len - len(row)))
    return rows


# ---------------------------------------------------------------------------------------------
# the six continual tasks


def _task_prompt(w: World, task: str, body: list[int]) -> list[int]:
    tw = w.task_words[TASKS.index(task)]
    return [w.tok["<bos>"], w.tok["task"], tw, w.tok[":"], *body, w.tok["->"]]


def task_example(w: World, task: str, rng: random.Random, entity: int | None = None) -> tuple[Example, tuple]:
    if task == "T1":
        adjs = [rng.choice(w.adjectives) for _ in range(5)]
        body, out = adjs, [w.tok["pos" if sum(a in w.good for a in adjs) >= 3 else "neg"]]
    elif task == "T2":
        body, out = [w.tok["where"], w.tok["does"], entity, w.tok["live"]], [w.facts[(entity, "city")]]
    elif task == "T3":
        nums = rng.sample(range(100), 7)
        body, out = [w.tok[str(n)] for n in nums], [w.tok[str(n)] for n in sorted(nums)[-3:][::-1]]
    elif task == "T4":
        words = rng.sample(w.lang_a, rng.randint(3, 5))
        body, out = words, [w.translation[x] for x in words][::-1]
    elif task == "T5":
        eq, semi = w.tok["="], w.tok[";"]
        body = [w.tok["card"], entity]
        out = [
            w.tok["colour"],
            eq,
            w.facts[(entity, "colour")],
            semi,
            w.tok["pet"],
            eq,
            w.facts[(entity, "pet")],
        ]
    elif task == "T6":
        syms = [w.tok[rng.choice(SYMBOLS[:6])] for _ in range(8)]
        target = rng.choice(syms) if rng.random() < 0.85 else w.tok[rng.choice(SYMBOLS[:6])]
        n = syms.count(target)
        body, out = [*syms, w.tok[";"], target], [w.tok[str(n)], w.tok["even" if n % 2 == 0 else "odd"]]
    else:
        raise ValueError(task)
    prompt = _task_prompt(w, task, body)
    return (prompt + out + [w.tok["<eos>"]], len(prompt)), tuple(body)


@dataclass
class TaskData:
    train: list[Example]
    heldout: list[Example]


def make_task_data(task: str, seed: int, n_train: int = 2000, n_heldout: int = 200) -> TaskData:
    """Train and held-out examples; held-out inputs never occur in training.

    T2/T5 hold out 100 of the 400 entities (their facts are known from pretraining), so the
    held-out set tests the skill, not memorisation; it has one example per held-out entity.
    """
    w = build_world()
    rng = random.Random(f"{task}/{seed}")
    if task in ("T2", "T5"):
        ents = list(w.entities)
        rng.shuffle(ents)
        held_e, train_e = ents[:100], ents[100:]
        heldout = [task_example(w, task, rng, e)[0] for e in held_e[: min(n_heldout, 100)]]
        train = [task_example(w, task, rng, rng.choice(train_e))[0] for _ in range(n_train)]
        return TaskData(train=train, heldout=heldout)
    held: dict[tuple, Example] = {}
    while len(held) < n_heldout:
        ex, key = task_example(w, task, rng)
        held.setdefault(key, ex)
    train = []
    while len(train) < n_train:
        ex, key = task_example(w, task, rng)
        if key not in held:
            train.append(ex)
    return TaskData(train=train, heldout=list(held.values()))


def retention_probes(n: int = 300) -> list[Example]:
    """A fixed mixed subset of the base probes, scored after the last task (base retention)."""
    groups = build_probes().groups
    flat = [ex for name in sorted(groups) for ex in groups[name]]
    return random.Random(2).sample(flat, n)
