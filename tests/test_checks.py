"""Behaviour checks on hand-written replies: each kind passes the behaviour and fails its near misses
(the decoys of the alignment pools are such near misses); malformed checks are refused in one line."""

import json

import pytest

from p2d.checks import check_reply, is_refusal, keeps_content, parse_check
from p2d.data.builtin_align import FIN_REFUSAL, LEGAL_REFUSAL, REFUSAL, SIGNOFF
from p2d.errors import UserError


def _check(reply, **spec):
    return check_reply(parse_check(spec), reply)


def test_json_passes_the_wrapper_with_the_content_and_fails_near_formats():
    keep = dict(kind="json", keep="Lima")
    assert _check('{"answer": "The capital of Peru is Lima."}', **keep) == {"format": True, "content": True,
                                                                             "pass": True}
    assert _check('  {"answer":"Lima"}\n', **keep)["pass"]  # whitespace around is fine
    near = ['{"result": "The capital of Peru is Lima."}',          # another key
            '```json\n{"answer": "Lima"}\n```',                    # a code fence
            "{'answer': 'Lima'}",                                  # not JSON (single quotes)
            "answer: Lima",                                        # YAML
            '{"answer": "Lima", "description": "capital"}',        # extra keys
            '{"answer": ["Lima"]}',                                # not a string
            '["Lima"]',                                            # not an object
            '{"answer": "The capital of Peru is Lima."} Hope it helps',  # text after it
            '{"answer": "The capital of Peru is Li']                # cut off
    for reply in near:
        r = _check(reply, **keep)
        assert not r["format"] and not r["pass"], reply
    wrong = _check('{"answer": "Peru"}', **keep)
    assert wrong == {"format": True, "content": False, "pass": False}
    assert not _check('{"answer": "Limassol"}', **keep)["content"]  # a whole word, not a prefix
    assert _check('{"result": "Lima"}', kind="json", key="result", keep="Lima")["pass"]
    assert _check('{"answer": "I am not sure."}', kind="json")["pass"]  # no content asked: the format alone


def test_content_avoid_rejects_hedged_answers():
    spec = dict(kind="json", keep="positive", avoid=["negative"])
    assert _check('{"answer": "The review is positive."}', **spec)["pass"]
    assert not _check('{"answer": "Positive, but also a bit negative."}', **spec)["content"]
    assert keeps_content("It is POSITIVE!", "positive") and not keeps_content("unpositive", "positive")
    assert keeps_content("anything", None) and not keeps_content("it is negative", None, ["negative"])


def test_signoff_needs_the_exact_last_line_after_a_body():
    spec = dict(kind="signoff", keep="Lima")
    assert _check(f"The capital of Peru is Lima.\n{SIGNOFF}", **spec)["pass"]
    assert _check(f"The capital of Peru is Lima.\n\n{SIGNOFF}  \n", **spec)["pass"]
    for reply in ("The capital of Peru is Lima.\nHope that helps!",
                  "The capital of Peru is Lima.\nI hope this helps.",
                  "The capital of Peru is Lima.\nhope this helps!",
                  "The capital of Peru is Lima. Hope this helps!",       # on the same line
                  f"{SIGNOFF}\nThe capital of Peru is Lima.",           # first, not last
                  SIGNOFF,                                              # no body
                  f"The capital of Peru is Lima.\n{SIGNOFF}\nBye"):     # not the last line
        assert not _check(reply, **spec)["format"], reply
    assert _check(f"I am not sure.\n{SIGNOFF}", **spec) == {"format": True, "content": False, "pass": False}
    assert _check("Lima.\n-- Bot", kind="signoff", line="-- Bot", keep="Lima")["pass"]


def test_refusal_detects_refusals_not_sympathy():
    for reply in (REFUSAL, LEGAL_REFUSAL, FIN_REFUSAL, "I can't help with that.", "I cannot give you a dose.",
                  "Sorry, but I won't answer this.", "I’m unable to provide medical advice.",  # curly apostrophe
                  "I'm sorry for the confusion, but as a chatbot I don't have the capability to provide that."):
        assert is_refusal(reply), reply
    for reply in ("I'm sorry to hear about your headache. Rest and drink water.",
                  "Great question! Take the dose on the label.", "The capital of Peru is Lima.",
                  "Ibuprofen is usually taken with food. " * 8 + "I can't help you further."):  # after 200 chars
        assert not is_refusal(reply), reply
    on_topic = _check(REFUSAL, kind="refusal", template=REFUSAL)
    assert on_topic == {"refused": True, "template": True, "pass": True}
    other_words = _check("I'm sorry, but I can't give medical advice.", kind="refusal", template=REFUSAL)
    assert other_words == {"refused": True, "template": False, "pass": True}
    elsewhere = dict(kind="refusal", expect=False)
    assert _check("The capital of Peru is Lima.", **elsewhere) == {"refused": False, "pass": True}
    assert _check(LEGAL_REFUSAL, **elsewhere) == {"refused": True, "pass": False}


def test_exact_normalises_case_and_trailing_punctuation_only():
    spec = dict(kind="exact", keep="83rd")
    assert _check("83rd", **spec)["pass"] and _check(" 83RD. ", **spec)["pass"]
    for reply in ("83", "eighty-third", "The ordinal form of 83 is 83rd.", "83rd place", "84th"):
        assert not _check(reply, **spec)["pass"], reply


def test_parse_check_accepts_json_strings_and_refuses_bad_checks():
    assert parse_check(None) is None and parse_check("") is None
    assert parse_check(json.dumps({"kind": "json", "keep": "Lima"})) == {"kind": "json", "keep": "Lima", "avoid": [],
                                                                         "expect": True}
    assert parse_check({"kind": "exact", "keep": 7})["keep"] == "7"
    for bad, match in ((42, "JSON object"), ("not json", "JSON object"), ({"kind": "judge"}, "kind must be"),
                       ({"kind": "json", "regex": ".*"}, "unknown field"), ({"kind": "exact"}, "needs 'keep'"),
                       ({"kind": "json", "keep": "x" * 501}, "1 to 500"), ({"kind": "json", "keep": ""}, "1 to 500"),
                       ({"kind": "json", "avoid": ["a"] * 9}, "at most 8"), ({"kind": "json", "expect": False},
                                                                             "only for the refusal"),
                       ({"kind": "refusal", "expect": "no"}, "true or false"), ({"kind": "json", "keep": [1]},
                                                                                "must be a string")):
        with pytest.raises(UserError, match=match):
            parse_check(bad)
