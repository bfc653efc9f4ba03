"""Row shapes that P2D understands, and turning one row into a `Sample`.

Supported shapes (column names are matched case-insensitively, surrounding spaces ignored):

- ``alpaca``: ``instruction``, optional ``input`` (or ``context``, as in Dolly), and ``output`` (or
  ``response`` / ``answer`` / ``completion``)
- ``prompt_response``: ``prompt`` (or ``query``, or ``input`` when there is no instruction) + one of
  ``response`` / ``completion`` / ``answer`` / ``output``, or ``chosen`` of a preference pair
  (``prompt``/``chosen``/``rejected``: the chosen answer is learned, ``rejected`` is ignored)
- ``question_answer``: ``question`` + ``answer`` (or ``response`` / ``output``)
- ``messages``: a list of ``{"role", "content"}`` turns (OpenAI / HF chat style)
- ``sharegpt``: ``conversations``, a list of ``{"from", "value"}`` turns
- ``text``: plain ``text``; the whole text is learned (``kind="text"``)

Optional columns: ``system`` (a system turn for the instruction-style shapes) and a task label from
``task``, ``category`` or ``source`` (first one present).  Chat turns may arrive as a JSON string
(e.g. from a CSV cell).  For chats the answer is the last assistant turn, the prompt is everything
before it; turns after it are dropped.

A file holds one shape: the shape most rows of its first 1000 rows match.  A row that clearly has
another recognised shape (it lacks the file shape's key column, e.g. ``instruction`` for alpaca, and
has another shape's, e.g. ``messages``) is skipped and counted as "different shape (messages) than
the file's (alpaca)" rather than read with its own shape: one shape per file keeps the column
mapping meaningful and avoids misreading a damaged row as another shape (an alpaca row without its
output but with a ``text`` column would otherwise be learned whole as plain text).  Convert mixed
files to one shape, or load the parts separately.

A column mapping overrides detection (and the shape check).  Its keys are ``prompt``, ``input``, ``answer``, ``system``,
``task``, ``messages`` (or ``conversations``) and ``text``; values are column names.  Empty values
are ignored, so a form can pass all keys.

Not supported: multi-modal content other than text parts, tool/function-call turns, pre-tokenised
rows.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
from dataclasses import dataclass, field

from p2d.errors import UserError, shown

FORMATS = ("alpaca", "prompt_response", "question_answer", "messages", "sharegpt", "text")

# Accepted names, shown in error messages.
ACCEPTED = (
    "instruction+output|response (alpaca/dolly), prompt|query|input+response|completion|answer|output|chosen, "
    "question+answer, messages (chat turns), conversations (ShareGPT), text"
)

ANSWER_NAMES = ("response", "completion", "answer", "output", "chosen")
PROMPT_NAMES = ("prompt", "query", "input")
ALPACA_INPUT_NAMES = ("input", "context")
ALPACA_OUTPUT_NAMES = ("output", "response", "answer", "completion")
QA_ANSWER_NAMES = ("answer", "response", "output")
TASK_NAMES = ("task", "category", "source")
MAPPING_KEYS = ("prompt", "input", "answer", "system", "task", "messages", "conversations", "text")

ROLE_MAP = {
    "user": "user",
    "human": "user",
    "system": "system",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
}


class SkipRow(Exception):
    """Raised by `row_to_sample` for a row that cannot be used; `reason` is a short label."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


#: the skip reason of a row nested too deeply (by a reader's parser or `p2d.data.loading`'s check)
TOO_DEEP = "too deeply nested"
#: what a reader yields: (index, row) for a row dict, or (index, SkipRow) for a row already known bad
Record = tuple[int, "dict | SkipRow"]


@dataclass
class Sample:
    """One training/evaluation example.

    prompt: chat turns before the answer (``[]`` for plain text); answer: the text to learn;
    task: optional label; row: the source row, unchanged; index: 0-based position in the source
    (counting rows that were skipped); kind: ``"chat"`` or ``"text"``.
    """

    prompt: list[dict]
    answer: str
    task: str | None
    row: dict = field(repr=False)
    index: int
    kind: str = "chat"

    @property
    def prompt_text(self) -> str:
        """The last user turn's content (for previews); ``""`` if there is none."""
        for turn in reversed(self.prompt):
            if turn.get("role") == "user":
                return turn.get("content", "")
        return ""


def _norm(name) -> str:
    return _norm_str(name) if isinstance(name, str) else str(name).strip().lower()


@functools.lru_cache(maxsize=4096)  # column names repeat on every row
def _norm_str(name: str) -> str:
    return name.strip().lower()


def _column_index(columns) -> dict[str, str]:
    """Normalised name -> original name (first occurrence wins)."""
    out: dict[str, str] = {}
    for col in columns:
        out.setdefault(_norm(col), col)
    return out


def match_format(columns) -> str | None:
    """Name of the shape the columns match, or None (see `detect_format`)."""
    cols = set(_column_index(columns))
    if "messages" in cols:
        return "messages"
    if "conversations" in cols:
        return "sharegpt"
    if "instruction" in cols and any(n in cols for n in ALPACA_OUTPUT_NAMES):
        return "alpaca"
    if "question" in cols and any(n in cols for n in QA_ANSWER_NAMES):
        return "question_answer"
    if any(n in cols for n in PROMPT_NAMES) and any(n in cols for n in ANSWER_NAMES):
        return "prompt_response"
    if "text" in cols:
        return "text"
    return None


def _show(name, limit: int = 40) -> str:
    text = str(name)
    if not text.isprintable():
        text = repr(text)[1:-1]  # escapes line breaks and other control characters
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_columns(columns, limit: int = 20) -> str:
    """Column names for a one-line message: escaped, shortened, at most ``limit`` of them."""
    names = [_show(c) for c in list(columns)[:limit]]
    more = len(columns) - limit
    return (", ".join(names) + (f" and {more} more" if more > 0 else "")) or "none"


def detect_format(columns: list[str]) -> str:
    """Name of the shape the columns match (see the module docstring); UserError if none does."""
    fmt = match_format(columns)
    if fmt is not None:
        return fmt
    raise UserError(
        f"unrecognised data shape: columns found: {show_columns(columns)}; accepted: {ACCEPTED}; "
        "or pass a column mapping such as prompt=COL answer=COL"
    )


# The column that marks a row as being of a shape (input/output rows count as prompt_response but
# "input" is shared with alpaca, so it marks nothing).
_KEY_COLUMNS = {
    "alpaca": ("instruction",),
    "prompt_response": ("prompt", "query"),
    "question_answer": ("question",),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}


def _present(value) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return not (isinstance(value, str) and not value.strip())


def row_shape(row: dict) -> str | None:
    """The shape one row matches on its own, looking only at columns with a value (not
    None/NaN/blank); None if it matches none."""
    return match_format([k for k, v in row.items() if _present(v)])


def shape_conflict(row: dict, fmt: str) -> str | None:
    """The other shape a row clearly has when the file's shape is ``fmt``, else None: the row has
    none of ``fmt``'s key column and does have the key column of the shape it matches."""
    keys = _KEY_COLUMNS.get(fmt)
    if keys is None or any(_norm(k) in keys and _present(v) for k, v in row.items()):
        return None
    other = row_shape(row)
    if other is None or other == fmt:
        return None
    present = {_norm(k) for k, v in row.items() if _present(v)}
    if present.intersection(_KEY_COLUMNS[fmt]) or not present.intersection(_KEY_COLUMNS[other]):
        return None
    return other


def parse_mapping(text: str | None) -> dict[str, str] | None:
    """``prompt=question, answer=reply`` (commas or newlines) -> {"prompt": "question", ...}; None if empty."""
    out: dict[str, str] = {}
    for part in (text or "").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise UserError(f"a column mapping is key=column pairs like prompt=question,answer=reply (got {shown(part)})")
        key, col = part.split("=", 1)
        out[key.strip()] = col.strip()
    return out or None


def check_mapping(mapping: dict | None, columns: list[str]) -> dict[str, str]:
    """Validate a column mapping against the columns; return it with empty entries removed and
    column names resolved (exact match first, then case-insensitive)."""
    if not mapping:
        return {}
    index = _column_index(columns)
    found = show_columns(columns)
    out: dict[str, str] = {}
    for key, col in mapping.items():
        k = _norm(key)
        if k not in MAPPING_KEYS:
            raise UserError(
                f"unknown mapping key '{_show(key)}'; use {', '.join(MAPPING_KEYS)}"
            )
        if col is None or str(col).strip() == "":
            continue
        if col in columns:
            resolved = col
        elif _norm(col) in index:
            resolved = index[_norm(col)]
        else:
            raise UserError(f"mapped column '{_show(col)}' (for {k}) not found; columns found: {found}")
        if k == "conversations":
            k = "messages"
        out[k] = resolved
    content = {k for k in out if k in ("prompt", "answer", "messages", "text", "input")}
    if content:
        ok = ("messages" in out) or ("text" in out) or ("prompt" in out and "answer" in out)
        if not ok:
            raise UserError(
                "incomplete column mapping: map both prompt and answer, or messages, or text"
            )
    return out


def mapping_has_content(mapping: dict[str, str]) -> bool:
    """True if the (checked) mapping says where the prompt/answer/chat/text live."""
    return any(k in mapping for k in ("prompt", "answer", "messages", "text"))


# --- values -----------------------------------------------------------------


def _text(value, what: str, required: bool = True) -> str:
    """Coerce a cell to text. Numbers are str()-ed; None/NaN/blank is missing; dicts/lists are not
    text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = ""
    elif isinstance(value, str):
        text = value
    elif isinstance(value, bool):
        text = str(value)
    elif isinstance(value, numbers.Number):
        text = str(value)
    else:
        raise SkipRow("not text")
    if required and not text.strip():
        raise SkipRow(f"missing or empty {what}")
    return text


def _turn_content(content) -> str:
    if isinstance(content, list):  # OpenAI-style content parts
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise SkipRow("not text")
        return "".join(parts)
    return _text(content, "turn", required=False)


def parse_turns(value) -> list[dict]:
    """Chat turns from a list (or JSON string) of ``{role, content}`` or ``{from, value}`` dicts,
    normalised to ``{"role", "content"}`` with roles user/assistant/system."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except RecursionError:
            raise SkipRow("too deeply nested") from None
        except ValueError:
            raise SkipRow("malformed chat turns") from None
    if value is None:
        raise SkipRow("missing or empty messages")
    if not isinstance(value, (list, tuple)):
        raise SkipRow("malformed chat turns")
    turns = []
    for turn in value:
        if not isinstance(turn, dict):
            raise SkipRow("malformed chat turns")
        t = {_norm(k): v for k, v in turn.items()}
        role = t.get("role", t.get("from"))
        content = t["content"] if "content" in t else t.get("value", t.get("text"))
        role = ROLE_MAP.get(_norm(role)) if role is not None else None
        if role is None:
            raise SkipRow("unknown chat role")
        turns.append({"role": role, "content": _turn_content(content)})
    if not turns:
        raise SkipRow("missing or empty messages")
    return turns


def _chat_sample(turns: list[dict], system: str | None) -> tuple[list[dict], str]:
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise SkipRow("no assistant turn")
    answer = turns[last]["content"]
    if not answer.strip():
        raise SkipRow("missing or empty answer")
    prompt = [dict(t) for t in turns[:last]]
    if not any(t["role"] == "user" and t["content"].strip() for t in prompt):
        raise SkipRow("no user turn before the answer")
    if system and not any(t["role"] == "system" for t in prompt):
        prompt.insert(0, {"role": "system", "content": system})
    return prompt, answer


# --- rows -------------------------------------------------------------------


def _task(value) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = str(value).strip()
    return text or None


def row_to_sample(row: dict, index: int, fmt: str, mapping: dict | None = None) -> Sample:
    """Convert one row. ``fmt`` is one of FORMATS or ``"mapped"`` (then ``mapping``, already
    checked by `check_mapping`, says where things are; it may also just add task/system columns to
    a detected format). Raises SkipRow(reason) for unusable rows. Never mutates ``row``."""
    if not isinstance(row, dict):
        raise SkipRow("not a JSON object")
    mapping = mapping or {}
    index_of = _column_index(row.keys())

    def get(name):
        if name in mapping:
            return row.get(mapping[name])
        key = index_of.get(name)
        return None if key is None else row.get(key)

    def first(names):
        for n in names:
            if n in mapping or n in index_of:
                return get(n)
        return None

    task = _task(row.get(mapping["task"])) if "task" in mapping else _task(first(TASK_NAMES))
    system_raw = get("system")
    system = _text(system_raw, "system", required=False).strip() if system_raw is not None else ""

    if fmt == "mapped":
        if "messages" in mapping:
            fmt = "messages"
        elif "text" in mapping:
            fmt = "text"
        else:
            fmt = "mapped_prompt"

    if fmt in ("messages", "sharegpt"):
        raw = get("messages") if fmt == "messages" or "messages" in mapping else get("conversations")
        prompt, answer = _chat_sample(parse_turns(raw), system)
        return Sample(prompt, answer, task, row, index, "chat")

    if fmt == "text":
        answer = _text(get("text"), "text")
        return Sample([], answer, task, row, index, "text")

    if fmt == "alpaca":
        user = _text(get("instruction"), "instruction")
        extra = _text(first(ALPACA_INPUT_NAMES), "input", required=False)
        answer = _text(first(ALPACA_OUTPUT_NAMES), "answer")
    elif fmt == "prompt_response":
        user = _text(first(PROMPT_NAMES), "prompt")
        extra = ""
        answer = _text(first(ANSWER_NAMES), "answer")
    elif fmt == "question_answer":
        user = _text(get("question"), "prompt")
        extra = ""
        answer = _text(first(QA_ANSWER_NAMES), "answer")
    elif fmt == "mapped_prompt":
        user = _text(get("prompt"), "prompt")
        extra = _text(get("input"), "input", required=False) if "input" in mapping else ""
        answer = _text(get("answer"), "answer")
    else:
        raise ValueError(f"unknown format {fmt!r}")

    if extra.strip():
        user = f"{user}\n\n{extra}"
    prompt = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}
    ]
    return Sample(prompt, answer, task, row, index, "chat")
