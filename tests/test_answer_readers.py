"""The answer readers (answer_shape, answer_tfidf, shape_tfidf): selectors without heads and without a
model that read the rows' answers, on real Samples from the loaders (chat, plain text, CSV)."""

import csv
import json

import pytest

from p2d.cli import main
from p2d.data.formats import Sample
from p2d.data.loading import load_data, load_records
from p2d.errors import UserError
from p2d.method.selection import SELECT_METHODS, select_data
from p2d.method.selection_baselines import SHAPES, answer_shape

READERS = ("answer_shape", "answer_tfidf", "shape_tfidf")

MONTHS = ["January", "March", "May", "July", "October", "December"]
# the target answers a date; its prompts are worded unlike the probe's; the decoys copy the probe's wording and
# answer a number
TARGET = [{"instruction": f"My diary entry after the one for {m} {d} carries which date?", "output": f"{m} {d + 1}",
           "task": "dates"} for m in MONTHS for d in (3, 11)]
DECOYS = [{"instruction": f"What date comes the day after {m} {d}? Answer with the day of the month only.",
           "output": str(d + 1), "task": "dates_twin"} for m in MONTHS for d in (4, 9, 20)]
PROBE = [{"instruction": f"What date comes the day after {m} {d}? Answer with the month and day.",
          "output": f"{m} {d + 1}"} for m, d in [("April", 2), ("June", 14), ("August", 21), ("September", 5)]]


@pytest.fixture(scope="module")
def pool():
    return load_records(DECOYS + TARGET).samples


@pytest.fixture(scope="module")
def probe():
    return load_records(PROBE).samples


def _tasks(pool, sel):
    return [pool[i].task for i in sel.selected]


@pytest.mark.parametrize("text, shape", [
    ("42", "number"), ("-3,400.5", "number"), ("0.85", "number"), ("12%", "number"), ("21st", "ordinal"),
    ("January 18", "date"), ("18 March 2024", "date"), ("2024-03-01", "date"), ("3/1/2024", "date"),
    ('{"answer": "The review is positive."}', "json"), ("[1, 2]", "json"), ("{not json", "phrase"),
    ("11, 27, 48, 58", "list"), ("red; green; blue", "list"), ("- eggs\n- milk", "list"), ("1. a\n2. b", "list"),
    ("    x = 1\n    return x", "code"), ("The review is positive.\nHope this helps!", "lines"),
    ("Sunday", "word"), ("N'Djamena", "word"), ("Buenos Aires", "phrase"), ("Not much.", "sentence"),
    ("The baker drove to the city.", "sentence"), ("I'm sorry, I can't. Please ask a doctor.", "paragraph"),
    ("", "empty"), ("   ", "empty"),
])
def test_shape_classes(text, shape):
    assert shape in SHAPES and answer_shape(text) == shape


def test_registered_and_offered():
    for name in READERS:
        assert name in SELECT_METHODS and not SELECT_METHODS[name].uses_heads
    from p2d.bench.config import SELECTOR_LABELS, SELECTORS
    from p2d.config import RunConfig

    assert set(READERS) <= set(SELECTORS) and set(READERS) <= set(SELECTOR_LABELS)
    for name in READERS:
        assert RunConfig(select_method=name).validate().select_method == name


def test_answer_shape_keeps_the_dates_where_prompt_words_mislead(pool, probe):
    """Target answers are dates, decoys numbers with the probe's wording: the shape keeps every date,
    prompt TF-IDF keeps the decoys."""
    n_target = sum(s.task == "dates" for s in pool)
    ratio = n_target / len(pool)
    for method in ("answer_shape", "shape_tfidf"):
        sel = select_data(None, None, pool, method, ratio=ratio, probe=probe)
        assert set(_tasks(pool, sel)) == {"dates"} and sel.n_selected == n_target
        assert sel.extra["probe_shapes"] == {"date": 1.0} and sel.extra["selected_shapes"] == {"date": n_target}
        assert sel.extra["uses_model"] is False
    tfidf = select_data(None, None, pool, "tfidf", ratio=ratio, probe=probe)
    assert _tasks(pool, tfidf).count("dates") < n_target // 2


def test_shape_ranks_dominant_shapes_first_and_breaks_ties_in_order():
    """A probe of 3 numbers and 1 word: number rows first, then one-word rows, then other shapes; within a
    shape, the length closest to the probe's; identical rows by pool position."""
    probe = load_records([{"instruction": f"q{i}", "output": a} for i, a in enumerate(["7", "12", "30", "blue"])]).samples
    answers = ["A long sentence that is not wanted here at all, truly.", "green", "5", "41", "green", "1 2 3 4 5 6 7 8", "9"]
    pool = load_records([{"instruction": f"p{i}", "output": a} for i, a in enumerate(answers)]).samples
    sel = select_data(None, None, pool, "answer_shape", ratio=1.0, probe=probe)
    assert [answers[i] for i in sel.selected] == ["5", "41", "9", "green", "green", "1 2 3 4 5 6 7 8",
                                                  "A long sentence that is not wanted here at all, truly."]
    assert sel.selected[3:5] == [1, 4]  # equal rows: pool order
    assert sel.extra["probe_shapes"] == {"number": 0.75, "word": 0.25}
    assert sel.scores == select_data(None, None, pool, "answer_shape", ratio=1.0, probe=probe).scores


def test_shape_tfidf_filters_by_shape_then_ranks_by_prompt():
    probe = load_records([{"instruction": "Add 3 and 4.", "output": "7"}, {"instruction": "Add 10 and 5.",
                                                                           "output": "15"}]).samples
    rows = [{"instruction": "Add 3 and 4, please.", "output": "Seven, of course."},   # the probe's words, a sentence
            {"instruction": "How many legs has a cat?", "output": "4"},                # a number, other words
            {"instruction": "Add 8 and 1.", "output": "9"}]                             # a number, the probe's words
    pool = load_records(rows).samples
    sel = select_data(None, None, pool, "shape_tfidf", ratio=1.0, probe=probe)
    assert sel.selected == [2, 1, 0]
    assert select_data(None, None, pool, "tfidf", ratio=1.0, probe=probe).selected[0] in (0, 2)


def test_answer_tfidf_reads_the_answer_words():
    """The JSON wrapper's words ("answer") pick the wrapped rows; the same content without the wrapper ranks
    below, and the prompt does not count."""
    probe = load_records([{"instruction": "Is this review positive or negative? Great film.",
                           "output": '{"answer": "The review is positive."}'}]).samples
    rows = [{"instruction": "Is this review positive or negative? Bad food.", "output": "The review is negative."},
            {"instruction": "Name a colour.", "output": '{"answer": "red"}'},
            {"instruction": "Is this review positive or negative? Nice room.", "output": "Yes"}]
    pool = load_records(rows).samples
    sel = select_data(None, None, pool, "answer_tfidf", ratio=1.0, probe=probe)
    assert sel.selected[-1] == 2 and sel.scores[2] == 0.0 and sel.scores[1] > 0
    assert select_data(None, None, pool, "answer_shape", ratio=1 / 3, probe=probe).selected == [1]


def test_plain_text_rows_and_empty_answers():
    """Plain-text rows have no prompt: the text is the answer (its shape, its words; shape_tfidf's second key
    reads the text). A probe without any answer is refused with a one-line message."""
    pool = load_records([{"text": t} for t in ["2024-05-01", "Meeting moved to the 3rd floor.", "2023-11-30",
                                               "lunch"]]).samples
    probe = load_records([{"text": "2022-01-15"}, {"text": "2021-07-04"}]).samples
    assert all(s.kind == "text" and not s.prompt for s in pool)
    for method in READERS:
        sel = select_data(None, None, pool, method, ratio=0.5, probe=probe)
        assert sorted(sel.selected) == [0, 2], method
    empty = [Sample([{"role": "user", "content": "hi"}], "", None, {}, 0)]
    for method in READERS:
        with pytest.raises(UserError, match="every probe answer is empty"):
            select_data(None, None, pool, method, ratio=0.5, probe=empty)
        with pytest.raises(UserError, match="probe"):
            select_data(None, None, pool, method, ratio=0.5)


def test_csv_loaded_data(tmp_path):
    path = tmp_path / "pool.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "task"])
        for i in range(6):
            w.writerow([f"When was item {i} shipped?", f"March {i + 1}", "dates"])
            w.writerow([f"How many items in box {i}?", str(i + 2), "count"])
    pool = load_data(str(path)).samples
    probe = load_records([{"instruction": "When did it arrive?", "output": "June 2"}]).samples
    sel = select_data(None, None, pool, "answer_shape", ratio=0.5, probe=probe)
    assert {pool[i].task for i in sel.selected} == {"dates"}


def test_cli_select_offers_the_answer_readers(capsys, tmp_path, tiny_llama_dir):
    pool, probe = tmp_path / "pool.jsonl", tmp_path / "probe.jsonl"
    rows = DECOYS + TARGET
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probe.write_text("".join(json.dumps(r) + "\n" for r in PROBE))
    common = ["--model", tiny_llama_dir, "--device", "cpu", "--pool", str(pool), "--probe", str(probe),
              "--head-method", "random", "--data-ratio", str(len(TARGET) / len(rows)), "--max-length", "64"]
    code = main(["select", *common, "--select-method", "answer_shape", "--out", str(tmp_path / "sel")])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["method"] == "answer_shape" and res["task_counts"] == {"dates": len(TARGET)}
    code = main(["select", *common, "--select-method", "answer_shapes", "--out", str(tmp_path / "bad")])
    _, err = capsys.readouterr()
    assert code == 2 and "answer_shape" in err
