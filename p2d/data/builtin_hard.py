"""The built-in *hard* pools (``pool: builtin-hard``): pools where surface words mislead.

On the plain built-in pool every task has one fixed instruction template, so a selector that only
compares the words of a prompt with the probe's (TF-IDF, no model) finds the target perfectly. Here
the probe and the pool are built so that it cannot:

- the **probe** and the **eval** set use one wording of the target skill (the user's task);
- the pool holds the target skill **only in other wordings** (four or five other templates, one of
  them from another source: word problems for addition), never the probe's;
- **lexical twins** use the probe's own template and the same kind of text but ask a different
  question whose answer needs another skill (``<target>_twin`` rows);
- the rest are the built-in pool's other tasks (minus those that teach the target skill directly),
  including near-domain ones (subtraction, multiplication, sorting, the HumanEval code and the
  ChatterBot chat of the packages).

Targets (`HARD_TARGETS`), one per answer type:

==============  ==============  =========================================================
target          answer type     skill
==============  ==============  =========================================================
``addition``    number          two-digit a + b
``alphabetical``one word        the alphabetically first of three words
``dates``       short phrase    the calendar day after/before a date (non-leap year)
``past_tense``  sentence        a present-tense sentence rewritten in the simple past
==============  ==============  =========================================================

Every row carries ``task`` (the target name for target-skill rows, ``<target>_twin`` for twins,
the built-in task name otherwise) and ``wording`` (which template made it), so the benchmark can
report the share of target-skill rows and of twins a selector picked. Items (the numbers, words,
dates or sentences) are never shared between eval, probe, the pool's target rows and the twins.

Everything is deterministic given ``seed``; the eval rows of a target do not change with the pool
or probe size. Shares default to 12.5% target-skill rows and 12.5% twins.
"""

from __future__ import annotations

import datetime as _dt
import functools
import random
from dataclasses import dataclass

from p2d.errors import UserError

from . import builtin

__all__ = ["HARD_POOL", "HARD_TARGETS", "TWIN_SUFFIX", "build_hard_pool", "hard_target_info"]

#: the pool spec that selects these pools (``--pool builtin-hard``)
HARD_POOL = "builtin-hard"
TWIN_SUFFIX = "_twin"

# ------------------------------------------------------------------------------------------ items


@functools.lru_cache(maxsize=None)
def _addition_items() -> tuple:
    return tuple((a, b) for a in range(10, 100) for b in range(10, 100))


NOUNS = (
    "anchor", "apple", "arrow", "badge", "banana", "basket", "beach", "bell", "blanket", "boat", "bottle", "bridge",
    "brush", "bucket", "cabin", "camera", "candle", "carpet", "castle", "cherry", "circle", "clock", "cloud", "coat",
    "copper", "cotton", "desert", "diamond", "dinner", "dragon", "drum", "eagle", "engine", "feather", "fence",
    "finger", "flower", "forest", "fountain", "garden", "giant", "glass", "glove", "guitar", "hammer", "harbor",
    "helmet", "honey", "island", "jacket", "jungle", "kettle", "kitchen", "ladder", "lemon", "letter", "lizard",
    "magnet", "marble", "meadow", "mirror", "monkey", "needle", "night", "ocean", "orange", "palace", "paper",
    "pencil", "pepper", "pillow", "planet", "pocket", "puzzle", "rabbit", "ribbon", "river", "rocket", "saddle",
    "salad", "shadow", "silver", "spider", "spoon", "stone", "summer", "sunset", "table", "teacher", "ticket",
    "tiger", "tomato", "tower", "train", "tunnel", "turtle", "umbrella", "valley", "velvet", "village", "violin",
    "wagon", "wallet", "window", "winter", "wizard", "yellow", "zebra",
)


@functools.lru_cache(maxsize=None)
def _alphabetical_items() -> tuple:
    """Triples of distinct nouns, in a seeded shown order, whose longest and shortest words are unique
    (so the twins' answers are well defined)."""
    rng = random.Random("p2d-hard:alphabetical")
    seen, out = set(), []
    while len(out) < 6000:
        words = tuple(rng.sample(NOUNS, 3))
        lengths = sorted(len(w) for w in words)
        if words in seen or lengths[0] == lengths[1] or lengths[1] == lengths[2]:
            continue
        seen.add(words)
        out.append(words)
    return tuple(out)


_YEAR = 2023  # a non-leap year


@functools.lru_cache(maxsize=None)
def _dates_items() -> tuple:
    day, one, out = _dt.date(_YEAR, 1, 1), _dt.timedelta(days=1), []
    while day.year == _YEAR:
        out += [(day, "after"), (day, "before")]
        day += one
    return tuple(out)


# (present 3rd person, past, complements)
VERBS = (
    ("walks", "walked", ("to the park", "to school", "home slowly", "along the river")),
    ("plays", "played", ("the piano", "football after lunch", "a new game", "with the dog")),
    ("cleans", "cleaned", ("the kitchen", "the windows", "her bike", "the old car")),
    ("opens", "opened", ("the door", "a small shop", "the letter", "the window")),
    ("watches", "watched", ("the news", "a long film", "the birds", "the match")),
    ("cooks", "cooked", ("dinner", "a big soup", "rice for everyone", "breakfast")),
    ("paints", "painted", ("the fence", "a portrait", "the bedroom", "a tiny boat")),
    ("visits", "visited", ("the museum", "her aunt", "an old friend", "the market")),
    ("calls", "called", ("the doctor", "his mother", "the office", "a taxi")),
    ("carries", "carried", ("the boxes", "a heavy bag", "the baby", "two chairs")),
    ("studies", "studied", ("history", "the map", "for the exam", "French")),
    ("fixes", "fixed", ("the radio", "the roof", "a broken chair", "the printer")),
    ("goes", "went", ("to the market", "to bed early", "to the beach", "to work")),
    ("eats", "ate", ("an apple", "a sandwich", "lunch outside", "some bread")),
    ("sees", "saw", ("a rainbow", "the mountains", "an old friend", "a strange light")),
    ("writes", "wrote", ("a letter", "a short story", "the report", "a poem")),
    ("drinks", "drank", ("a cup of tea", "cold water", "some juice", "coffee")),
    ("takes", "took", ("the bus", "a photo", "the last train", "a short break")),
    ("buys", "bought", ("a new coat", "fresh bread", "two tickets", "a lamp")),
    ("reads", "read", ("a book", "the newspaper", "the menu", "a long email")),
    ("runs", "ran", ("to the station", "five miles", "around the lake", "home")),
    ("sings", "sang", ("a song", "in the choir", "very loudly", "an old tune")),
    ("makes", "made", ("a cake", "a mistake", "a paper plane", "tea")),
    ("brings", "brought", ("a gift", "the keys", "some flowers", "her camera")),
    ("finds", "found", ("a coin", "the lost key", "a good seat", "a quiet spot")),
    ("gives", "gave", ("a speech", "a present", "good advice", "the answer")),
    ("drives", "drove", ("to the city", "a red truck", "very carefully", "to the coast")),
    ("teaches", "taught", ("music", "the class", "young children", "maths")),
    ("sells", "sold", ("old books", "the house", "fresh fish", "a bicycle")),
    ("builds", "built", ("a wall", "a small shed", "a sandcastle", "a robot")),
)
_SUBJECTS = ("The cat", "My brother", "Anna", "The teacher", "Our neighbour", "The old man", "Grace", "The pilot",
             "His sister", "The farmer", "Ben", "The girl", "Kofi", "The baker", "My aunt", "The student")


@functools.lru_cache(maxsize=None)
def _past_tense_items() -> tuple:
    return tuple((s, pres, past, comp) for s in _SUBJECTS for pres, past, comps in VERBS for comp in comps)


def base_form(present: str) -> str:
    """'walks' -> 'walk', 'carries' -> 'carry', 'watches' -> 'watch', 'goes' -> 'go'."""
    irregular = {"goes": "go", "does": "do", "has": "have"}
    if present in irregular:
        return irregular[present]
    if present.endswith("ies"):
        return present[:-3] + "y"
    if present.endswith(("ches", "shes", "xes", "sses")):
        return present[:-2]
    return present[:-1]


# ------------------------------------------------------------------------------------- wordings
_NUM = "Answer with the number only."
_NAMES = ("Anna", "Ben", "Carla", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kofi", "Lena")
_THINGS = ("apples", "books", "marbles", "stamps", "pencils", "cards", "shells", "coins")


def _md(day: _dt.date) -> str:
    return f"{day:%B} {day.day}"


def _shift(day: _dt.date, direction: str) -> _dt.date:
    one = _dt.timedelta(days=1)
    return day + one if direction == "after" else day - one  # Dec 31 "after" is January 1 of the next year


def _season(day: _dt.date) -> str:
    return {12: "winter", 1: "winter", 2: "winter", 3: "spring", 4: "spring", 5: "spring", 6: "summer",
            7: "summer", 8: "summer"}.get(day.month, "autumn")


def _days_in_month(day: _dt.date) -> int:
    nxt = _dt.date(day.year + (day.month == 12), day.month % 12 + 1, 1)
    return (nxt - _dt.timedelta(days=1)).day


def _words(t) -> str:
    return ", ".join(t)


@dataclass(frozen=True)
class _Target:
    """How one hard target's rows are made from its items (each maker: item -> (instruction, input, output))."""

    answer_type: str
    items: object                      # () -> tuple of items
    probe: object                      # the probe's (and eval's) wording
    wordings: tuple                    # ((name, maker), ...): the target skill in other wordings
    twins: tuple                       # ((name, maker), ...): the probe's template, another skill
    exclude: tuple                     # built-in tasks that teach the target skill directly (never distractors)


def _word_problem(item, rng_key=0):
    a, b = item
    name, thing = _NAMES[(a + b) % len(_NAMES)], _THINGS[(a * b) % len(_THINGS)]
    return (f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now? Give just the "
            "number.", "", str(a + b))


_TARGETS: dict[str, _Target] = {
    "addition": _Target(
        answer_type="number",
        items=_addition_items,
        probe=lambda it: (f"What is {it[0]} + {it[1]}? {_NUM}", "", str(it[0] + it[1])),
        wordings=(
            ("add-reply", lambda it: (f"Add {it[0]} and {it[1]}. Reply with just the result.", "", str(sum(it)))),
            ("plus-equals", lambda it: (f"{it[0]} plus {it[1]} equals what? Give only the total.", "", str(sum(it)))),
            ("sum-of", lambda it: ("Calculate the sum of the two numbers below and write nothing else.",
                                   f"{it[0]} and {it[1]}", str(sum(it)))),
            ("combined", lambda it: (f"If you combine {it[0]} and {it[1]}, how much do you get altogether?", "",
                                     str(sum(it)))),
            ("word-problem", _word_problem),
        ),
        twins=(
            ("larger", lambda it: (f"What is {it[0]} + {it[1]}? {_NUM[:-1]}, but give the larger of the two "
                                   "numbers instead of the sum.", "", str(max(it)))),
            ("first", lambda it: (f"What is {it[0]} + {it[1]}? {_NUM[:-1]}, but give the first number instead of "
                                  "the sum.", "", str(it[0]))),
            ("minus", lambda it: (f"What is {max(it)} + {min(it)}? {_NUM[:-1]}, reading + as minus.", "",
                                  str(max(it) - min(it)))),
        ),
        exclude=("addition", "word_problems"),
    ),
    "alphabetical": _Target(
        answer_type="one word",
        items=_alphabetical_items,
        probe=lambda it: (f"Which word comes first in alphabetical order: {_words(it)}? Answer with the word only.",
                          "", min(it)),
        wordings=(
            ("sort-first", lambda it: ("Sort these words alphabetically and reply with only the first one.",
                                       " ".join(it), min(it))),
            ("dictionary", lambda it: (f"In a dictionary, which of {it[0]}, {it[1]} and {it[2]} would you find "
                                       "first? One word.", "", min(it))),
            ("a-to-z", lambda it: (f"{' / '.join(it)}: which is earliest from A to Z? Just the word.", "", min(it))),
            ("alphabetize", lambda it: ("Alphabetize the list and give the entry that ends up at the top.",
                                        "\n".join(it), min(it))),
        ),
        twins=(
            ("longest", lambda it: (f"Which word comes first in alphabetical order: {_words(it)}? Answer with the "
                                    "longest word only.", "", max(it, key=len))),
            ("shortest", lambda it: (f"Which word comes first in alphabetical order: {_words(it)}? Answer with the "
                                     "shortest word only.", "", min(it, key=len))),
            ("listed-first", lambda it: (f"Which word comes first in this list: {_words(it)}? Answer with the word "
                                         "only.", "", it[0])),
        ),
        exclude=(),
    ),
    "dates": _Target(
        answer_type="short phrase",
        items=_dates_items,
        probe=lambda it: (f"What date comes the day {it[1]} {_md(it[0])} (not a leap year)? Answer with the month "
                          "and day only, like 'March 5'.", "", _md(_shift(*it))),
        wordings=(
            ("today-is", lambda it: (f"If today is {_md(it[0])}, what is the date {'tomorrow' if it[1] == 'after' else 'yesterday'}"
                                     "? Reply with month and day, e.g. 'July 9'. It is not a leap year.", "",
                                     _md(_shift(*it)))),
            ("one-day", lambda it: (f"Give the calendar date one day {'later' if it[1] == 'after' else 'earlier'} than "
                                    f"{_md(it[0])} in a non-leap year (month and day only).", "", _md(_shift(*it)))),
            ("plus-one", lambda it: (f"{_md(it[0])} {'+' if it[1] == 'after' else '-'} 1 day = ? (no leap year; "
                                     "write month and day)", "", _md(_shift(*it)))),
            ("diary", lambda it: (f"I write one diary entry every day. Today's entry is dated {_md(it[0])}, {_YEAR}. "
                                  f"What date did the {'next' if it[1] == 'after' else 'previous'} entry have? Month "
                                  "and day only.", "", _md(_shift(*it)))),
        ),
        twins=(
            ("weekday", lambda it: (f"What date comes the day {it[1]} {_md(it[0])} (not a leap year)? Answer with "
                                    f"the weekday of that date only; today is in {_YEAR}.", "", f"{_shift(*it):%A}")),
            ("season", lambda it: (f"What date comes the day {it[1]} {_md(it[0])} (not a leap year)? Answer with "
                                   "the season of that date only (northern hemisphere, by month).", "",
                                   _season(_shift(*it)))),
            ("month-days", lambda it: (f"What date comes the day {it[1]} {_md(it[0])} (not a leap year)? Answer with "
                                       "the number of days in that date's month only.", "",
                                       str(_days_in_month(_shift(*it))))),
        ),
        exclude=("dates",),
    ),
    "past_tense": _Target(
        answer_type="sentence",
        items=_past_tense_items,
        probe=lambda it: (f"Rewrite the sentence in the past tense: {it[0]} {it[1]} {it[3]}.", "",
                          f"{it[0]} {it[2]} {it[3]}."),
        wordings=(
            ("simple-past", lambda it: ("Turn the following present-tense sentence into the simple past. Reply "
                                        "with the new sentence only.", f"{it[0]} {it[1]} {it[3]}.",
                                        f"{it[0]} {it[2]} {it[3]}.")),
            ("yesterday", lambda it: (f'"{it[0]} {it[1]} {it[3]}." Say this as something that already happened '
                                      "(same words, past verb).", "", f"{it[0]} {it[2]} {it[3]}.")),
            ("convert", lambda it: (f"Convert to simple past: {it[0]} {it[1]} {it[3]}", "",
                                    f"{it[0]} {it[2]} {it[3]}.")),
            ("grammar", lambda it: ("Grammar exercise. Change the verb of this sentence to the past tense and "
                                    "write the whole sentence.", f"{it[0]} {it[1]} {it[3]}.",
                                    f"{it[0]} {it[2]} {it[3]}.")),
        ),
        twins=(
            ("negative", lambda it: (f"Rewrite the sentence in the negative: {it[0]} {it[1]} {it[3]}.", "",
                                     f"{it[0]} does not {base_form(it[1])} {it[3]}.")),
            ("upper-case", lambda it: (f"Rewrite the sentence in upper case: {it[0]} {it[1]} {it[3]}.", "",
                                       f"{it[0]} {it[1]} {it[3]}.".upper())),
            ("question", lambda it: (f"Rewrite the sentence as a question: {it[0]} {it[1]} {it[3]}.", "",
                                     f"Does {it[0][0].lower() + it[0][1:] if it[0].startswith(('The', 'My', 'Our', 'His')) else it[0]}"
                                     f" {base_form(it[1])} {it[3]}?")),
        ),
        exclude=(),
    ),
}
HARD_TARGETS: tuple[str, ...] = tuple(_TARGETS)


def hard_target_info() -> dict[str, dict]:
    """target -> answer type, the probe's wording (an example), the pool's wordings and the twins (names)."""
    out = {}
    for name, t in _TARGETS.items():
        example = t.probe(t.items()[0])
        out[name] = {"answer_type": t.answer_type, "probe_example": example[0] + (" " + example[1] if example[1] else ""),
                     "wordings": [w for w, _ in t.wordings], "twins": [w for w, _ in t.twins]}
    return out


def _row(made: tuple, task: str, wording: str) -> dict:
    return {"instruction": made[0], "input": made[1], "output": made[2], "task": task, "wording": wording}


def _round_robin(makers: tuple, items: list, task: str) -> list[dict]:
    return [_row(makers[i % len(makers)][1](item), task, makers[i % len(makers)][0]) for i, item in enumerate(items)]


def build_hard_pool(target: str, seed: int = 0, pool_size: int = 800, probe_size: int = 64, eval_size: int = 300,
                    other_eval_size: int = 0, target_share: float = 0.125, twin_share: float = 0.125
                    ) -> builtin.TaskPool:
    """A pool where surface words mislead, for ``target`` (one of `HARD_TARGETS`); see the module
    docstring. Returns the same `TaskPool` as the plain built-in pool (rows also carry ``wording``)."""
    if target not in _TARGETS:
        raise UserError(f"unknown target {target!r} for the {HARD_POOL} pool; choose from {', '.join(HARD_TARGETS)}")
    for name, val in (("pool_size", pool_size), ("probe_size", probe_size), ("eval_size", eval_size),
                      ("other_eval_size", other_eval_size)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise UserError(f"{name} must be a whole number >= 0, got {val!r}")
    if not (0 <= target_share and 0 <= twin_share and target_share + twin_share <= 1):
        raise UserError("target_share and twin_share must be >= 0 and add up to at most 1")
    spec = _TARGETS[target]
    n_target = int(round(pool_size * target_share))
    n_twin = int(round(pool_size * twin_share))
    items = list(spec.items())
    random.Random(f"p2d-hard:{target}:eval").shuffle(items)  # eval first, independent of the seed and sizes
    n_items = len(items)
    if eval_size > n_items // 2:
        raise UserError(f"the {target} task has {n_items} items: eval_size must be at most {n_items // 2}")
    eval_items, rest = items[:eval_size], items[eval_size:]
    random.Random(f"p2d-hard:{target}:{seed}").shuffle(rest)
    need = probe_size + n_target + n_twin
    if need > len(rest):
        raise UserError(f"the {target} task has {n_items} items, but eval + probe + target rows + twins need "
                        f"{eval_size + need}: lower the sizes")
    probe_items = rest[:probe_size]
    target_items = rest[probe_size:probe_size + n_target]
    twin_items = rest[probe_size + n_target:need]

    probe_rows = [_row(spec.probe(it), target, "probe") for it in probe_items]
    eval_rows = [_row(spec.probe(it), target, "probe") for it in eval_items]
    pool_rows = _round_robin(spec.wordings, target_items, target)
    pool_rows += _round_robin(spec.twins, twin_items, target + TWIN_SUFFIX)

    others = [t for t in builtin.available_tasks() if t not in spec.exclude and t != target]
    n_rest = pool_size - len(pool_rows)
    alloc = builtin.spread_rows(n_rest, {t: builtin.task_capacity(t) for t in others}) if n_rest > 0 else {}
    other_eval: list[dict] = []
    for task in others:
        perm = builtin.task_rows(task, seed, "hard-pool")
        n = alloc.get(task, 0)
        pool_rows += [{**builtin.row_dict(r, task), "wording": task} for r in perm[:n]]
        other_eval += [builtin.row_dict(r, task) for r in perm[n:n + other_eval_size]]
    random.Random(f"p2d-hard:{seed}:shuffle").shuffle(pool_rows)
    sources = {t: builtin.SOURCES[t] for t in alloc if alloc[t]}
    sources[target] = "procedurally generated by P2D Studio (MIT): the target skill in other wordings and twins"
    return builtin.TaskPool(pool=pool_rows, probe=probe_rows, eval=eval_rows, target=target, seed=seed,
                            sources=sources, other_eval=other_eval)
