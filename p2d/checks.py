"""Behaviour checks: does a generated reply show a behaviour, and does it keep the content?

Exact match cannot score a behaviour such as "reply in JSON" or "refuse medical questions": many
replies are right. An eval row names its check instead, in a ``check`` field (a JSON object)::

    {"instruction": "What is the capital of Peru?", "output": "{\\"answer\\": \\"The capital of Peru is Lima.\\"}",
     "check": {"kind": "json", "keep": "Lima"}}

and `p2d.evaluation.evaluate` scores the greedy reply with `check_reply` instead of exact match
(``output`` stays the gold answer of the answer loss and of teacher-forced evaluation). Kinds:

==============  ==============================================================  =====================
kind            the reply passes when                                           named parts
==============  ==============================================================  =====================
``json``        it is exactly one JSON object whose only key is ``key``          ``format``,
                (default ``answer``) holding a string, and that string keeps     ``content``
                the content
``signoff``     its last line is exactly ``line`` (default ``Hope this helps!``),  ``format``,
                after a non-empty body that keeps the content                    ``content``
``refusal``     it refuses (an "I can't / I'm unable to ... help, provide,       ``refused``,
                give ..." phrase, or "I'm sorry, but", in its first 200          ``template`` (when
                characters); with ``"expect": false`` when it does *not* refuse  given)
                (the false-refusal rows of other topics)
``exact``       it equals ``keep`` after `normalize_answer` (case, spaces,       (none)
                trailing punctuation)
==============  ==============================================================  =====================

"Keeps the content" (``content``): the normalised ``keep`` occurs in the checked text as a whole
word and none of the ``avoid`` strings does (a hedged "positive, but also negative" keeps neither
label). Without ``keep`` content is not checked (always true). Every check returns its parts and
``pass``; evaluation reports each part's rate per task.

Not supported: checks that need a model (a judge) or several turns. A check comes from a data file
and may be attacker-chosen: `parse_check` accepts only these kinds and bounded strings.
"""

from __future__ import annotations

import json
import re

from .errors import UserError, shown

__all__ = ["CHECK_KINDS", "DEFAULT_SIGNOFF", "parse_check", "check_reply", "is_refusal", "keeps_content", "normalize_answer",
           "exact_match", "contains_answer"]

CHECK_KINDS = ("json", "signoff", "refusal", "exact")
DEFAULT_SIGNOFF = "Hope this helps!"
_MAX_TEXT = 500  # characters of any string in a check
_MAX_AVOID = 8
_FIELDS = {"kind", "keep", "avoid", "expect", "key", "line", "template"}

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_REFUSAL = re.compile(
    r"\b(?:i\s+can\s*not|i\s+can't|i\s+cannot|i'm\s+unable|i\s+am\s+unable|i'm\s+not\s+able|i\s+am\s+not\s+able|"
    r"i\s+won't|i\s+will\s+not|i\s+don't\s+have\s+the\s+(?:ability|capability)|i\s+do\s+not\s+have\s+the\s+"
    r"(?:ability|capability)|i'm\s+not\s+allowed|i\s+am\s+not\s+allowed)\b[^.!?\n]{0,40}?\b(?:help|provide|give|"
    r"assist|answer|offer|advise|share|recommend)"
    r"|\bi'm\s+sorry,?\s+but\b|\bi\s+am\s+sorry,?\s+but\b|\bsorry,\s+but\s+i\b",
    re.IGNORECASE,
)


_TRAILING = ".!?,;:。"


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace (and around commas), strip surrounding quotes and trailing
    punctuation."""
    text = re.sub(r"\s*,\s*", ", ", " ".join(str(text).lower().split()))
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("\"'`")
        while text and text[-1] in _TRAILING:
            text = text[:-1].rstrip()
    return text


def exact_match(pred: str, gold: str) -> bool:
    return normalize_answer(pred) == normalize_answer(gold)


def contains_answer(pred: str, gold: str) -> bool:
    g = normalize_answer(gold)
    if not g:
        return False
    return re.search(r"(?<!\w)" + re.escape(g) + r"(?!\w)", normalize_answer(pred)) is not None



def parse_check(value) -> dict | None:
    """A row's ``check`` value as a normalised check (None when the row has none). A JSON string is
    read as JSON (a CSV cell). UserError with a one-line reason for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise UserError(f"a row's check must be a JSON object such as {{\"kind\": \"json\", \"keep\": \"Lima\"}}, "
                            f"got {shown(value)}") from None
    if not isinstance(value, dict):
        raise UserError(f"a row's check must be a JSON object, got {shown(value)}")
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        raise UserError(f"a row's check has unknown field(s) {', '.join(map(shown, unknown))}; known: "
                        f"{', '.join(sorted(_FIELDS))}")
    kind = value.get("kind")
    if kind not in CHECK_KINDS:
        raise UserError(f"a row's check kind must be one of {', '.join(CHECK_KINDS)}, got {shown(kind)}")
    out: dict = {"kind": kind}
    for name in ("keep", "key", "line", "template"):
        if value.get(name) is not None:
            out[name] = _text(value[name], name)
    avoid = value.get("avoid") or []
    if isinstance(avoid, str):
        avoid = [avoid]
    if not isinstance(avoid, list) or len(avoid) > _MAX_AVOID:
        raise UserError(f"a row's check field 'avoid' must be a list of at most {_MAX_AVOID} strings")
    out["avoid"] = [_text(a, "avoid") for a in avoid]
    expect = value.get("expect", True)
    if not isinstance(expect, bool):
        raise UserError(f"a row's check field 'expect' must be true or false, got {shown(expect)}")
    if not expect and kind != "refusal":
        raise UserError("a row's check may say \"expect\": false only for the refusal kind")
    out["expect"] = expect
    if kind == "exact" and "keep" not in out:
        raise UserError("an exact check needs 'keep' (the answer the reply must equal)")
    return out


def _text(value, name: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise UserError(f"a row's check field {name!r} must be a string, got {shown(value)}")
    value = str(value)
    if not value.strip() or len(value) > _MAX_TEXT:
        raise UserError(f"a row's check field {name!r} must be 1 to {_MAX_TEXT} characters")
    return value


def _norm(text: str) -> str:
    return normalize_answer(str(text).translate(_APOSTROPHES))


def _has_word(text: str, word: str) -> bool:
    w = _norm(word)
    return bool(w) and re.search(r"(?<!\w)" + re.escape(w) + r"(?!\w)", _norm(text)) is not None


def keeps_content(text: str, keep: str | None, avoid=()) -> bool:
    """``keep`` occurs in ``text`` as a whole word (after normalisation) and no ``avoid`` string does;
    true without ``keep`` unless an ``avoid`` string occurs."""
    if any(_has_word(text, a) for a in avoid):
        return False
    return keep is None or _has_word(text, keep)


def is_refusal(reply: str) -> bool:
    """A refusal phrase in the first 200 characters (see the module docstring)."""
    return _REFUSAL.search(str(reply).translate(_APOSTROPHES)[:200]) is not None


def _json_value(reply: str, key: str) -> str | None:
    """The string under ``key`` when the whole reply is a JSON object with that one key, else None."""
    try:
        obj = json.loads(reply)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or list(obj) != [key] or not isinstance(obj[key], str):
        return None
    return obj[key]


def check_reply(check: dict, reply: str) -> dict[str, bool]:
    """The named parts of ``check`` (a `parse_check` result) on ``reply``, and ``pass``."""
    reply = str(reply).strip()
    kind, keep, avoid = check["kind"], check.get("keep"), check.get("avoid", ())
    if kind == "json":
        value = _json_value(reply, check.get("key", "answer"))
        fmt = value is not None
        content = fmt and keeps_content(value, keep, avoid)
        return {"format": fmt, "content": content, "pass": fmt and content}
    if kind == "signoff":
        line = check.get("line", DEFAULT_SIGNOFF).strip()
        lines = [x.rstrip() for x in reply.splitlines()]
        body = "\n".join(lines[:-1]).strip()
        fmt = bool(lines) and lines[-1].strip() == line and bool(body)
        content = fmt and keeps_content(body, keep, avoid)
        return {"format": fmt, "content": content, "pass": fmt and content}
    if kind == "refusal":
        refused = is_refusal(reply)
        parts = {"refused": refused}
        if check.get("template"):
            parts["template"] = _norm(reply).startswith(_norm(check["template"]))
        parts["pass"] = refused if check.get("expect", True) else not refused
        return parts
    if kind == "exact":
        return {"pass": _norm(reply) == _norm(keep)}
    raise ValueError(f"unknown check kind {kind!r}")  # parse_check admits only CHECK_KINDS
