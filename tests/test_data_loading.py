"""Dataset loading: every supported file type and row shape, mappings, and every bad-input case."""

import copy
import csv
import gzip
import json
import os

import pytest

from p2d.data import FORMATS, LoadedData, Sample, SkipRow, detect_format, load_data, load_records, row_to_sample
from p2d.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# --- helpers ---------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, "UserError messages must be one line"
    return msg


ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5", "task": "math"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat", "task": "translate"},
    {"instruction": "Say hi.", "output": "hi", "task": "math"},
]

CHAT = [
    {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]},
    {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "thanks"},  # trailing turn after the last answer: dropped
    ]},
]


# --- shapes ----------------------------------------------------------------------------------


def test_alpaca_jsonl(tmp_path):
    data = load_data(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    assert isinstance(data, LoadedData)
    assert data.format == "alpaca" and len(data) == 3 and data.skipped == {}
    s0, s1, s2 = data.samples
    assert s0.prompt == [{"role": "user", "content": "Add 2 and 3."}]
    assert s0.answer == "5" and s0.task == "math" and s0.kind == "chat" and s0.index == 0
    assert s1.prompt[-1]["content"] == "Translate to French.\n\ncat"
    assert s1.prompt_text == "Translate to French.\n\ncat"
    assert s2.answer == "hi" and s2.row == ALPACA[2]
    assert data.columns == ["instruction", "input", "output", "task"]


@pytest.mark.parametrize("answer_col", ["response", "completion", "answer"])
def test_prompt_response(tmp_path, answer_col):
    rows = [{"prompt": "p1", answer_col: "r1"}, {"prompt": "p2", answer_col: "r2"}]
    data = load_data(write_jsonl(tmp_path / "p.jsonl", rows))
    assert data.format == "prompt_response"
    assert [(s.prompt_text, s.answer) for s in data.samples] == [("p1", "r1"), ("p2", "r2")]


def test_question_answer(tmp_path):
    data = load_data(write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "answer": "Because."}]))
    assert data.format == "question_answer"
    assert data.samples[0].prompt == [{"role": "user", "content": "Why?"}]
    assert data.samples[0].answer == "Because."


def test_messages(tmp_path):
    data = load_data(write_jsonl(tmp_path / "m.jsonl", CHAT))
    assert data.format == "messages"
    a, b = data.samples
    assert a.prompt == CHAT[0]["messages"][:2] and a.answer == "4"
    assert b.answer == "Paris"
    assert b.prompt == CHAT[1]["messages"][:3]
    assert b.prompt_text == "Capital of France?"


def test_sharegpt_roles(tmp_path):
    rows = [
        {"conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "a1"},
            {"from": "user", "value": "q2"},
            {"from": "bot", "value": "a2"},
        ]},
        {"conversations": [{"from": "Human", "value": "q"}, {"from": "model", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "assistant", "value": "a"}]},
    ]
    data = load_data(write_jsonl(tmp_path / "s.jsonl", rows))
    assert data.format == "sharegpt" and len(data) == 3
    s = data.samples[0]
    assert [t["role"] for t in s.prompt] == ["system", "user", "assistant", "user"]
    assert s.answer == "a2"
    assert data.samples[1].prompt == [{"role": "user", "content": "q"}]


def test_text(tmp_path):
    data = load_data(write_jsonl(tmp_path / "t.jsonl", [{"text": "Once upon a time."}, {"text": 42}]))
    assert data.format == "text"
    assert [s.kind for s in data.samples] == ["text", "text"]
    assert data.samples[0].prompt == [] and data.samples[0].answer == "Once upon a time."
    assert data.samples[1].answer == "42"  # numbers are fine
    assert data.samples[0].prompt_text == ""


def test_columns_case_insensitive_and_stripped(tmp_path):
    rows = [{" Instruction ": "Do it", "INPUT": "now", "Output": "done", "Category": "chores"}]
    data = load_data(write_jsonl(tmp_path / "c.jsonl", rows))
    assert data.format == "alpaca"
    s = data.samples[0]
    assert s.prompt_text == "Do it\n\nnow" and s.answer == "done" and s.task == "chores"
    assert s.row == rows[0]


@pytest.mark.parametrize("cols,fmt", [
    (["messages", "text"], "messages"),
    (["conversations"], "sharegpt"),
    (["instruction", "input", "output"], "alpaca"),
    (["Prompt", "Completion"], "prompt_response"),
    (["question", "answer", "id"], "question_answer"),
    (["id", "TEXT "], "text"),
])
def test_detect_format(cols, fmt):
    assert detect_format(cols) == fmt
    assert fmt in FORMATS


def test_system_column_becomes_system_turn():
    data = load_records([{"prompt": "p", "response": "r", "system": "You are terse."}])
    assert data.samples[0].prompt == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "p"},
    ]


def test_openai_content_parts():
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c"}]}]
    assert load_records(rows).samples[0].prompt_text == "ab"


# --- file types --------------------------------------------------------------------------------


def test_json_array(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(ALPACA), encoding="utf-8")
    data = load_data(p)
    assert len(data) == 3 and data.format == "alpaca"


def test_json_object_with_list(tmp_path):
    p = tmp_path / "o.json"
    p.write_text(json.dumps({"version": 2, "data": ALPACA}), encoding="utf-8")
    assert len(load_data(p)) == 3


def test_json_object_several_lists_uses_split(tmp_path):
    p = tmp_path / "o.json"
    p.write_text(json.dumps({"train": ALPACA, "test": ALPACA[:1]}), encoding="utf-8")
    assert len(load_data(p)) == 3
    assert len(load_data(p, split="test")) == 1
    msg = user_error(load_data, p, split="validation")
    assert "train" in msg and "test" in msg


def test_json_object_other_shapes(tmp_path):
    p = tmp_path / "o.json"
    p.write_text(json.dumps({"text": "a description", "tags": ["x"], "rows": ALPACA}), encoding="utf-8")
    assert len(load_data(p)) == 3  # "rows" is the only list of objects
    p.write_text(json.dumps({"a": ALPACA, "b": ALPACA}), encoding="utf-8")
    assert "several list fields (a, b)" in user_error(load_data, p)
    p.write_text(json.dumps({"name": "x"}), encoding="utf-8")
    assert "no list of rows" in user_error(load_data, p)
    p.write_text("42", encoding="utf-8")
    assert "expected an array" in user_error(load_data, p)


def test_json_single_record(tmp_path):
    p = tmp_path / "one.json"
    p.write_text(json.dumps(CHAT[0]), encoding="utf-8")
    data = load_data(p)
    assert len(data) == 1 and data.samples[0].answer == "4"


def test_jsonl_saved_as_json(tmp_path):
    data = load_data(write_jsonl(tmp_path / "lines.json", ALPACA))
    assert len(data) == 3


def test_jsonl_gz(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for r in ALPACA:
            f.write(json.dumps(r) + "\n")
    assert len(load_data(p)) == 3


def test_jsonl_bom_and_crlf(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in ALPACA) + b"\r\n")
    data = load_data(p)
    assert len(data) == 3 and data.skipped == {}


def test_csv(tmp_path):
    p = write_csv(tmp_path / "a.csv", ["instruction", "input", "output", "task"],
                  [["Add 2, 3", "", "5", "math"], ['Say "hi"\non two lines', "x", "hi", "chat"]])
    data = load_data(p)
    assert data.format == "alpaca" and len(data) == 2
    assert data.samples[0].prompt_text == "Add 2, 3"
    assert data.samples[1].prompt_text == 'Say "hi"\non two lines\n\nx'
    assert data.samples[1].row == {"instruction": 'Say "hi"\non two lines', "input": "x", "output": "hi",
                                   "task": "chat"}


def test_tsv(tmp_path):
    p = write_csv(tmp_path / "a.tsv", ["Question", "Answer"], [["What is 1+1?", "2"], ["tab\tinside", "yes"]],
                  delimiter="\t")
    data = load_data(p)
    assert data.format == "question_answer"
    assert [s.answer for s in data.samples] == ["2", "yes"]
    assert data.samples[1].prompt_text == "tab\tinside"


def test_csv_with_chat_json(tmp_path):
    p = write_csv(tmp_path / "chat.csv", ["messages", "source"],
                  [[json.dumps(CHAT[0]["messages"]), "gsm"], ["not json", "gsm"],
                   [json.dumps([{"role": "user", "content": "only a question"}]), "x"]])
    data = load_data(p)
    assert data.format == "messages" and len(data) == 1
    assert data.samples[0].answer == "4" and data.samples[0].task == "gsm"
    assert data.skipped == {"malformed chat turns": 1, "no assistant turn": 1}


def test_csv_empty_cells_counted(tmp_path):
    p = write_csv(tmp_path / "e.csv", ["prompt", "response"], [["p", "r"], ["p2", ""], ["", "r3"], ["p4", "  "]])
    data = load_data(p)
    assert len(data) == 1
    assert data.skipped == {"missing or empty answer": 2, "missing or empty prompt": 1}
    assert data.summary()["skipped"] == 3


def test_csv_row_with_too_many_fields(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("prompt,response\na,b\nc,d,e\n", encoding="utf-8")
    data = load_data(p)
    assert len(data) == 1 and data.skipped == {"wrong number of fields": 1}


def test_parquet(tmp_path):
    import pandas as pd

    p = tmp_path / "a.parquet"
    pd.DataFrame([{"prompt": "p1", "response": "r1", "task": 3}, {"prompt": "p2", "response": None, "task": 4}]
                 ).to_parquet(p)
    data = load_data(p)
    assert len(data) == 1 and data.samples[0].task == "3"
    assert data.skipped == {"missing or empty answer": 1}


def test_parquet_chat(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(CHAT), p)
    data = load_data(p)
    assert [s.answer for s in data.samples] == ["4", "Paris"]


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ALPACA)
    ds.save_to_disk(str(tmp_path / "ds"))
    data = load_data(tmp_path / "ds")
    assert len(data) == 3 and data.samples[1].answer == "chat" and data.samples[2].index == 2

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(ALPACA[:1])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_data(tmp_path / "dd")) == 3
    assert len(load_data(str(tmp_path / "dd"), split="test")) == 1
    msg = user_error(load_data, tmp_path / "dd", split="validation")
    assert "validation" in msg and "train" in msg and "test" in msg


# --- mappings ----------------------------------------------------------------------------------


def test_mapping_prompt_answer_task_system(tmp_path):
    rows = [{"q_col": "Q1", "a_col": "A1", "label": 7, "sys": "S"}, {"q_col": "Q2", "a_col": "A2", "label": "b"}]
    data = load_data(write_jsonl(tmp_path / "m.jsonl", rows),
                     mapping={"prompt": "q_col", "answer": "A_COL", "task": "label", "system": "sys"})
    assert data.format == "mapped"
    s0, s1 = data.samples
    assert s0.prompt == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]
    assert s0.answer == "A1" and s0.task == "7" and s1.task == "b"
    assert s1.prompt == [{"role": "user", "content": "Q2"}]


def test_mapping_overrides_detection():
    rows = [{"instruction": "ignored", "output": "ignored", "my_q": "q", "my_a": "a"}]
    data = load_records(rows, mapping={"prompt": "my_q", "answer": "my_a"})
    assert data.samples[0].prompt_text == "q" and data.samples[0].answer == "a"


def test_mapping_messages_and_text():
    rows = [{"dialog": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "body": "t"}]
    assert load_records(rows, mapping={"messages": "dialog"}).samples[0].answer == "a"
    data = load_records(rows, mapping={"text": "body"})
    assert data.samples[0].kind == "text" and data.samples[0].answer == "t"


def test_mapping_empty_entries_ignored_and_task_only():
    rows = [{"question": "q", "answer": "a", "label": "L"}]
    data = load_records(rows, mapping={"prompt": "", "answer": None, "task": "label"})
    assert data.format == "question_answer" and data.samples[0].task == "L"


def test_mapping_errors():
    rows = [{"q": "1", "a": "2"}]
    msg = user_error(load_records, rows, mapping={"prompt": "q", "answer": "nope"})
    assert "nope" in msg and "q, a" in msg
    assert "unknown mapping key" in user_error(load_records, rows, mapping={"question": "q"})
    assert "incomplete" in user_error(load_records, rows, mapping={"prompt": "q"})


# --- task labels -------------------------------------------------------------------------------


@pytest.mark.parametrize("col", ["task", "category", "Source"])
def test_task_label_columns(col):
    data = load_records([{"text": "a", col: "x"}, {"text": "b", col: 1}, {"text": "c", col: ""}, {"text": "d"}])
    assert [s.task for s in data.samples] == ["x", "1", None, None]
    assert data.summary()["tasks"] == {"x": 1, "1": 1}


def test_summary():
    data = load_records([{"text": "a"}, {"text": ""}], source="pool")
    assert data.summary() == {"source": "pool", "rows": 1, "skipped": 1,
                              "skipped_reasons": {"missing or empty text": 1}, "repaired": {},
                              "truncated": False, "format": "text",
                              "columns": ["text"], "tasks": {}}


# --- bad input ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    assert user_error(load_data, p) == f"file not found: {p}"
    assert "file not found" in user_error(load_data, "./also/missing")


def test_hub_id_offline():
    msg = user_error(load_data, "someone/not-a-real-dataset-p2d")
    assert "could not be loaded from the hub or its local cache" in msg and "id:config" in msg


def test_unknown_extension(tmp_path):
    p = tmp_path / "data.xlsx"
    p.write_text("x", encoding="utf-8")
    msg = user_error(load_data, p)
    assert ".xlsx" in msg and ".jsonl" in msg and ".parquet" in msg


def test_folder_that_is_not_a_dataset(tmp_path):
    assert "save_to_disk" in user_error(load_data, tmp_path)


def test_unknown_shape_message(tmp_path):
    msg = user_error(load_data, write_jsonl(tmp_path / "u.jsonl", [{"foo": 1, "bar": 2}]))
    assert "foo, bar" in msg
    for name in ("instruction", "prompt", "response", "question", "messages", "conversations", "text"):
        assert name in msg
    assert "mapping" in msg


@pytest.mark.parametrize("name,content", [
    ("e.jsonl", b""), ("e.json", b"  \n"), ("e.csv", b""), ("e.tsv", b"\n\n"),
])
def test_empty_files(tmp_path, name, content):
    p = tmp_path / name
    p.write_bytes(content)
    assert "empty" in user_error(load_data, p)


def test_empty_containers(tmp_path):
    (tmp_path / "a.json").write_text("[]", encoding="utf-8")
    assert "empty" in user_error(load_data, tmp_path / "a.json")
    (tmp_path / "h.csv").write_text("prompt,response\n", encoding="utf-8")
    assert "no rows" in user_error(load_data, tmp_path / "h.csv")
    assert "empty" in user_error(load_records, [])


def test_empty_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "ds"))
    assert "empty" in user_error(load_data, tmp_path / "ds")


@pytest.mark.parametrize("name", ["l.csv", "l.tsv", "l.json"])
def test_non_utf8_files(tmp_path, name):
    p = tmp_path / name
    sep = "\t" if name.endswith("tsv") else ","
    body = ('[{"text": "caf\u00e9"}]' if name.endswith("json") else f"prompt{sep}response\ncaf\u00e9{sep}ok\n")
    p.write_bytes(body.encode("latin-1"))
    msg = user_error(load_data, p)
    assert "not UTF-8" in msg and "re-save it as UTF-8" in msg


def test_jsonl_bad_lines_are_counted(tmp_path):
    p = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"prompt": "p0", "response": "r0"}).encode(),
        b"{not json",
        b"",
        json.dumps({"prompt": "caf\u00e9", "response": "r"}, ensure_ascii=False).encode("latin-1"),  # not UTF-8
        b"[1, 2]",
        json.dumps({"prompt": "p4", "response": ""}).encode(),
        json.dumps({"prompt": {"nested": True}, "response": "r"}).encode(),
        json.dumps({"prompt": "p6", "response": "r6"}).encode(),
    ]
    p.write_bytes(b"\n".join(lines))
    data = load_data(p)
    assert [s.answer for s in data.samples] == ["r0", "r6"]
    assert [s.index for s in data.samples] == [0, 6]  # blank lines are not rows
    assert data.skipped == {"malformed JSON line": 1, "not UTF-8": 1, "not a JSON object": 1,
                            "missing or empty answer": 1, "not text": 1}


def test_malformed_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[{"text": "a"},', encoding="utf-8")
    assert "not valid JSON" in user_error(load_data, p)


def test_chat_row_problems():
    rows = [
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
        {"messages": [{"role": "tool", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "assistant", "content": "a"}]},
        {"messages": "[{\"role\": \"user\""},
        {"messages": None},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fine"}]},
    ]
    data = load_records(rows)
    assert len(data) == 1 and data.samples[0].index == 6
    assert data.skipped == {"no assistant turn": 1, "missing or empty answer": 1, "unknown chat role": 1,
                            "no user turn before the answer": 1, "malformed chat turns": 1,
                            "missing or empty messages": 1}


def test_all_bad_rows_raise_with_reasons(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": ""}\n{oops\n{"prompt": "", "response": "b"}\n', encoding="utf-8")
    msg = user_error(load_data, p)
    assert "no usable rows" in msg
    assert "missing or empty answer" in msg and "malformed JSON line" in msg and "missing or empty prompt" in msg


def test_only_malformed_lines_raise(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text("{oops\nnope\n", encoding="utf-8")
    msg = user_error(load_data, p)
    assert "no usable rows" in msg and "2 malformed JSON line" in msg


def test_nan_and_numbers_and_nested():
    rows = [{"prompt": 1.5, "response": 2}, {"prompt": "p", "response": float("nan")},
            {"prompt": "p", "response": {"a": 1}}, {"prompt": ["x"], "response": "r"}]
    data = load_records(rows)
    assert [(s.prompt_text, s.answer) for s in data.samples] == [("1.5", "2")]
    assert data.skipped == {"missing or empty answer": 1, "not text": 2}


def test_limit_and_order(tmp_path):
    rows = [{"text": f"t{i}"} if i % 3 else {"text": ""} for i in range(20)]
    data = load_data(write_jsonl(tmp_path / "t.jsonl", rows), limit=5)
    assert [s.answer for s in data.samples] == ["t1", "t2", "t4", "t5", "t7"]
    assert [s.index for s in data.samples] == [1, 2, 4, 5, 7]
    assert "at least 1" in user_error(load_data, tmp_path / "t.jsonl", limit=0)


def test_caller_rows_not_mutated():
    rows = [
        {"Instruction": " x ", "input": "y", "output": 3, "task": "t"},
        {"messages": json.dumps(CHAT[0]["messages"])},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "S"},
    ]
    before = copy.deepcopy(rows)
    load_records(rows[:1])
    data = load_records(rows[1:2])
    data3 = load_records(rows[2:])
    assert rows == before
    data.samples[0].row["extra"] = 1
    data3.samples[0].prompt.append({"role": "user", "content": "more"})
    assert rows == before


def test_row_to_sample_direct():
    s = row_to_sample({"prompt": "p", "answer": "a"}, 4, "prompt_response")
    assert isinstance(s, Sample) and s.index == 4 and s.answer == "a"
    with pytest.raises(SkipRow) as info:
        row_to_sample({"prompt": "p", "answer": ""}, 0, "prompt_response")
    assert info.value.reason == "missing or empty answer"


# -- common real-world shapes beyond the core six ---------------------------------------------------
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("row, fmt, prompt, answer", [
    ({"instruction": "Who wrote Hamlet?", "context": "Plays", "response": "Shakespeare", "category": "qa"},
     "alpaca", "Who wrote Hamlet?\n\nPlays", "Shakespeare"),                      # Dolly
    ({"input": "2+2", "output": "4"}, "prompt_response", "2+2", "4"),            # input/output
    ({"query": "2+3", "response": "5"}, "prompt_response", "2+3", "5"),          # query/response
    ({"prompt": "hi", "chosen": "hello", "rejected": "go away"}, "prompt_response", "hi", "hello"),  # preference pair
    ({"question": "capital of Peru?", "response": "Lima"}, "question_answer", "capital of Peru?", "Lima"),
])
def test_common_real_shapes(tmp_path, row, fmt, prompt, answer):
    data = load_data(_jsonl(tmp_path / "d.jsonl", [row]))
    assert data.format == fmt
    s = data.samples[0]
    assert s.prompt[-1]["content"] == prompt and s.answer == answer


def test_dolly_category_is_task_label(tmp_path):
    rows = [{"instruction": "a", "context": "", "response": "b", "category": "open_qa"}] * 2
    assert load_data(_jsonl(tmp_path / "d.jsonl", rows)).summary()["tasks"] == {"open_qa": 2}


def test_semicolon_csv(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_text("question;answer\nwhat, then?;that\n", encoding="utf-8")
    data = load_data(p)
    assert data.format == "question_answer" and data.samples[0].prompt[-1]["content"] == "what, then?"


# --- robustness: hostile and odd input -------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # far past Python's recursion limit
OK_LINE = json.dumps({"prompt": "p", "response": "r"})


def test_deep_jsonl_lines_are_skipped(tmp_path):
    p = tmp_path / "deep.jsonl"
    p.write_text("\n".join([
        OK_LINE,
        DEEP,                                              # a deep line
        '{"prompt": ' + DEEP + ', "response": "r"}',       # a deep field value
        '{"prompt": ' + "[" * 500 + "]" * 500 + ', "response": "r"}',  # parses, but deeper than MAX_DEPTH
        OK_LINE,
    ]), encoding="utf-8")
    data = load_data(p)
    assert [s.index for s in data.samples] == [0, 4]
    assert data.skipped == {"too deeply nested": 3}


def test_deep_json_items_are_skipped(tmp_path):
    p = tmp_path / "deep.json"
    p.write_text("[" + OK_LINE + "," + DEEP + "," + OK_LINE + "]", encoding="utf-8")
    data = load_data(p)
    assert len(data) == 2 and data.skipped == {"too deeply nested": 1}
    p.write_text('{"meta": {"v": 1}, "data": [' + DEEP + ", " + OK_LINE + ', {"prompt": [' + DEEP + '], '
                 '"response": "r"}]}', encoding="utf-8")
    data = load_data(p)
    assert len(data) == 1 and data.skipped == {"too deeply nested": 2}
    p.write_text('{"prompt": ' + DEEP + ', "response": "r"}', encoding="utf-8")  # one deep record
    assert "1 too deeply nested" in user_error(load_data, p)
    p.write_text('[' + OK_LINE + ', {"prompt": "' + "[" * 5000 + '", "response": "r"}]', encoding="utf-8")
    assert len(load_data(p)) == 2  # brackets inside text are just text
    p.write_text("[" + OK_LINE + ", " + DEEP[:60_000], encoding="utf-8")  # deep and cut short
    assert "not valid JSON" in user_error(load_data, p)


def test_deep_chat_cell_in_csv_is_skipped(tmp_path):
    chat = json.dumps(CHAT[0]["messages"])
    p = write_csv(tmp_path / "deep.csv", ["messages"], [[DEEP], [chat]])
    data = load_data(p)
    assert len(data) == 1 and data.skipped == {"too deeply nested": 1}


def test_deep_rows_from_memory():
    nested: list = []
    for _ in range(200):
        nested = [nested]
    data = load_records([{"text": "ok"}, {"text": "x", "extra": nested}])
    assert len(data) == 1 and data.skipped == {"too deeply nested": 1}


def test_mixed_shapes_are_counted_not_silent(tmp_path):
    chat = {"messages": CHAT[0]["messages"]}
    rows = ALPACA * 3 + [chat, chat]  # 9 alpaca rows, 2 chat rows
    data = load_data(write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert data.format == "alpaca" and len(data) == 9
    assert data.skipped == {"different shape (messages) than the file's (alpaca)": 2}
    # the majority decides, whatever comes first
    data = load_data(write_jsonl(tmp_path / "mixed2.jsonl", [ALPACA[0]] + [chat] * 3))
    assert data.format == "messages" and len(data) == 3
    assert data.skipped == {"different shape (alpaca) than the file's (messages)": 1}


def test_mixed_shapes_in_csv_with_empty_cells(tmp_path):
    chat = json.dumps(CHAT[0]["messages"])
    p = write_csv(tmp_path / "mixed.csv", ["instruction", "output", "messages"],
                  [["i1", "o1", ""], ["i2", "o2", ""], ["", "", chat]])
    data = load_data(p)
    assert data.format == "alpaca" and len(data) == 2
    assert data.skipped == {"different shape (messages) than the file's (alpaca)": 1}


def test_damaged_rows_keep_their_own_reason(tmp_path):
    rows = [
        {"instruction": "i", "input": "x", "output": "o"},
        {"instruction": "i", "input": "x", "output": "o"},
        {"instruction": "", "input": "x", "output": "o"},     # looks like input/output, but is a damaged alpaca row
        {"instruction": "i", "output": None, "text": "t"},    # has text, but is an alpaca row without output
        {"prompt": "p", "response": "r"},                     # a different shape
    ]
    data = load_data(write_jsonl(tmp_path / "d.jsonl", rows))
    assert data.format == "alpaca" and len(data) == 2
    assert data.skipped == {"missing or empty instruction": 1, "missing or empty answer": 1,
                            "different shape (prompt_response) than the file's (alpaca)": 1}
    qa = [{"question": "q", "answer": "a"}] * 2 + [{"prompt": "p", "answer": "a"}]
    assert load_records(qa).skipped == {"different shape (prompt_response) than the file's (question_answer)": 1}


def test_mapping_skips_the_shape_check():
    rows = [{"q": "1", "a": "2"}, {"q": "3", "a": "4", "messages": CHAT[0]["messages"]}]
    assert len(load_records(rows, mapping={"prompt": "q", "answer": "a"})) == 2


def test_lone_surrogates_are_replaced_and_counted(tmp_path, tokenizer):
    from p2d.method.selection import Selection

    p = tmp_path / "s.jsonl"
    chat_cell = r'[{"role": "user", "content": "hi \udc80"}, {"role": "assistant", "content": "yo"}]'
    p.write_text("\n".join([
        '{"prompt": "a\\ud800b", "response": "r"}',          # json.loads accepts lone surrogates
        '{"prompt": "ok", "response": "r", "note\\udfff": 1}',  # in a key
        '{"prompt": "emoji \\ud83d\\ude00", "response": "r"}',  # a valid pair stays as it is
        json.dumps({"prompt": "fine", "response": "r"}),
    ]), encoding="utf-8")
    data = load_data(p)
    assert len(data) == 4 and data.skipped == {}
    assert data.repaired == {"invalid characters (lone surrogates) replaced with U+FFFD": 2}
    assert data.summary()["repaired"] == data.repaired
    assert data.samples[0].prompt_text == "a\ufffdb" and data.samples[0].row["prompt"] == "a\ufffdb"
    assert "note\ufffd" in data.samples[1].row and data.samples[2].prompt_text == "emoji \U0001F600"
    # what used to crash later: tokenising, and writing selected.jsonl as UTF-8
    for s in data.samples:
        tokenizer(s.prompt_text + s.answer)
    sel = Selection("test", 1.0, 4, 4, 0.0, [1.0, 0.5, 0.2, 0.1], [0, 1, 2, 3])
    out = sel.save(tmp_path / "out", data.samples)
    assert "\ufffd" in out["selected"].read_text(encoding="utf-8")
    # a chat cell whose JSON escapes decode to a lone surrogate
    csv_data = load_data(write_csv(tmp_path / "c.csv", ["messages"], [[chat_cell]]))
    assert csv_data.samples[0].prompt_text == "hi \ufffd" and csv_data.repaired


# --- limits ------------------------------------------------------------------------------------------


def _gzip_bomb(path, mb: int, line: bytes):
    chunk = line * (2**20 // len(line) + 1)
    with gzip.open(path, "wb", compresslevel=1) as f:
        if path.name.endswith(".csv.gz"):
            f.write(b"text\n")
        for _ in range(mb):
            f.write(chunk)
    return path


@pytest.mark.parametrize("name,line", [
    ("bomb.jsonl.gz", (json.dumps({"text": "a" * 200}) + "\n").encode()),
    ("bomb.csv.gz", b"a" * 200 + b"\n"),
])
def test_gzip_bomb_stops_at_the_cap(tmp_path, name, line):
    import tracemalloc

    p = _gzip_bomb(tmp_path / name, 64, line)  # expands to 64 MB
    tracemalloc.start()
    try:
        msg = user_error(load_data, p, max_bytes=2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg == f"{p} expands beyond 1 MB: use a smaller file"
    assert peak < 16 * 2**20  # streamed: never holds the 64 MB
    # enough rows before the cap is fine
    data = load_data(p, max_rows=10, max_bytes=2**20)
    assert len(data) == 10 and data.truncated


def test_max_bytes_for_each_kind(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": os.urandom(60).hex()} for i in range(200)]  # about 26 KB, also as Parquet
    jl = write_jsonl(tmp_path / "a.jsonl", rows)
    js = tmp_path / "a.json"
    js.write_text(json.dumps(rows), encoding="utf-8")
    cs = write_csv(tmp_path / "a.csv", ["text"], [[r["text"]] for r in rows])
    pa_ = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pa_)
    for p in (jl, js, cs, pa_):
        assert user_error(load_data, p, max_bytes=10_000) == f"{p} is larger than 9.77 KB: use a smaller file"
        assert len(load_data(p, max_bytes=1_000_000)) == 200
    assert len(load_data(jl, max_rows=5, max_bytes=10_000)) == 5  # stops before the cap
    assert "larger than" in user_error(load_data, js, max_rows=5, max_bytes=10_000)  # JSON is read whole
    assert "at least 1" in user_error(load_data, jl, max_bytes=0)


def test_max_bytes_for_dataset_folders(tmp_path):
    import datasets

    datasets.Dataset.from_list(ALPACA * 50).save_to_disk(str(tmp_path / "ds"))
    assert "larger than 100 bytes" in user_error(load_data, tmp_path / "ds", max_bytes=100)
    assert len(load_data(tmp_path / "ds", max_bytes=10**7)) == 150


def test_max_rows_is_limit(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"t{i}"} for i in range(5000)]
    p = write_jsonl(tmp_path / "t.jsonl", rows)
    data = load_data(p, max_rows=3)
    assert [s.answer for s in data.samples] == ["t0", "t1", "t2"] and data.truncated
    assert load_data(p, limit=3).samples == data.samples
    assert load_data(p, max_rows=3, limit=3).truncated
    assert not load_data(p, max_rows=5000).truncated and not load_data(p).truncated
    assert "same setting" in user_error(load_data, p, max_rows=3, limit=4)
    assert "max_rows must be at least 1" in user_error(load_data, p, max_rows=0)
    assert "limit must be at least 1" in user_error(load_records, rows, limit=-1)
    assert len(load_records(rows, max_rows=7)) == 7
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=1000)
    data = load_data(tmp_path / "t.parquet", max_rows=2)
    assert len(data) == 2 and data.truncated


# --- files people actually bring ---------------------------------------------------------------------


def test_csv_bom_crlf_and_multiline_cell(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_bytes(b'\xef\xbb\xbfprompt,response\r\n"line one\r\nline two",r1\r\np2,"say ""hi"""\r\n')
    data = load_data(p)
    assert data.columns == ["prompt", "response"] and len(data) == 2 and data.skipped == {}
    assert data.samples[0].prompt_text == "line one\r\nline two" and data.samples[1].answer == 'say "hi"'


def test_jsonl_blank_lines_and_truncated_last_line(tmp_path):
    p = tmp_path / "cut.jsonl"
    p.write_text(OK_LINE + "\n\n" + OK_LINE + "\n   \n" + '{"prompt": "p", "resp', encoding="utf-8")
    data = load_data(p)
    assert len(data) == 2 and data.skipped == {"malformed JSON line": 1}
    p.write_text(OK_LINE + "\n" + OK_LINE + "\n\n", encoding="utf-8")
    assert load_data(p).skipped == {}


@pytest.mark.parametrize("indent", [None, 2])
def test_json_document_saved_as_jsonl(tmp_path, indent):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ALPACA, indent=indent), encoding="utf-8")
    assert len(load_data(p)) == 3
    p.write_text(json.dumps({"data": ALPACA}, indent=indent), encoding="utf-8")
    assert len(load_data(p)) == 3
    p.write_text("[1, 2]\n" + "".join(json.dumps(r) + "\n" for r in ALPACA), encoding="utf-8")  # really lines
    data = load_data(p)
    assert len(data) == 3 and data.skipped == {"not a JSON object": 1}


def test_bad_lines_before_the_first_row(tmp_path):
    p = tmp_path / "late.jsonl"
    p.write_text("{oops\n" * 1500 + OK_LINE + "\n", encoding="utf-8")
    data = load_data(p)
    assert len(data) == 1 and data.skipped == {"malformed JSON line": 1500}


@pytest.mark.parametrize("name,content,expected", [
    ("empty.jsonl", b"", "is empty"),
    ("bom-only.csv", b"\xef\xbb\xbf\r\n", "is empty"),
    ("binary.jsonl", bytes(range(256)) * 64, "looks like a binary file, not JSON Lines text"),
    ("binary.json", bytes(range(256)) * 4, "looks like a binary file, not JSON text"),
    ("data.csv", b"PK\x03\x04" + b"\x00" * 100, "ZIP archive or Excel workbook, not CSV text"),
    ("data.tsv", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100, "old Excel"),
    ("data.jsonl", gzip.compress(OK_LINE.encode()), "name it data.jsonl.gz"),
    ("data.jsonl.gz", OK_LINE.encode(), "not a valid gzip file"),
    ("data.csv", "prompt,response\na,b\n".encode("utf-16"), "UTF-16 text; re-save it as UTF-8"),
    ("lines.csv", (OK_LINE + "\n").encode(), "looks like JSON, not CSV: rename it to .jsonl"),
    ("scalar.json", b"42", "holds a JSON number; expected an array of objects"),
    ("null.json", b"null", "holds a JSON null"),
    ("text.json", b'"just text"', "holds a JSON string"),
])
def test_wrong_files_give_one_clear_line(tmp_path, name, content, expected):
    p = tmp_path / name
    p.write_bytes(content)
    assert expected in user_error(load_data, p)


def test_xlsx_renamed_csv(tmp_path):
    import zipfile

    p = tmp_path / "sheet.csv"
    with zipfile.ZipFile(p, "w") as z:  # the layout of an .xlsx workbook
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", "<workbook/>")
    msg = user_error(load_data, p)
    assert "Excel workbook, not CSV text" in msg and ".csv" in msg


def test_truncated_gzip(tmp_path):
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(gzip.compress(("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(5000))).encode())[:-200])
    assert "not a valid gzip file or is cut short" in user_error(load_data, p)


def test_damaged_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"t{i}" * 20} for i in range(5000)]), p, row_group_size=500)
    raw = bytearray(p.read_bytes())
    raw[4000:6000] = b"\xff" * 2000  # a damaged data page; the footer is intact
    p.write_bytes(bytes(raw))
    assert "could not read Parquet file" in user_error(load_data, p)
    p.write_bytes(b"PAR1 not really")
    assert "could not read Parquet file" in user_error(load_data, p)


def test_messages_stay_on_one_line(tmp_path):
    # found by tests/test_data_fuzz.py: a column name with a line break broke the one-line message
    msg = user_error(load_records, [{"bad\ncolumn": 1, "x" * 100: 2}])
    assert "bad\\ncolumn" in msg and "x" * 37 + "..." in msg
    msg = user_error(load_records, [{f"c{i}": i for i in range(30)}])
    assert "c19 and 10 more" in msg
    p = tmp_path / "two\nlines.jsonl"
    p.write_text("{oops\n", encoding="utf-8")
    assert "no usable rows" in user_error(load_data, p)
    assert "'no\\nsuch'" in user_error(load_records, [{"q": 1, "a": 2}], mapping={"prompt": "no\nsuch", "answer": "a"})


# --- datasets of the datasets library: ID[:CONFIG][@SPLIT[START:STOP]] --------------------------------------


def _hub_style_folder(root):
    """A local folder laid out like a hub dataset repository with two configs (as gsm8k has main and socratic),
    each with train and test splits, declared in the README's YAML."""
    import textwrap

    for config, n in (("main", {"train": 30, "test": 7}), ("socratic", {"train": 5})):
        for split, rows in n.items():
            path = root / config / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps({"question": f"{config} {split} q{i}", "answer": f"a{i}"}) + "\n"
                                    for i in range(rows)), encoding="utf-8")
    (root / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: main
          data_files:
          - split: train
            path: main/train.jsonl
          - split: test
            path: main/test.jsonl
        - config_name: socratic
          data_files:
          - split: train
            path: socratic/train.jsonl
        ---
        # a test dataset
        """), encoding="utf-8")
    return root


def test_dataset_spec_parsing(tmp_path):
    from p2d.data.read_datasets import DatasetSpec, parse_dataset_spec

    assert parse_dataset_spec("openai/gsm8k:main@test") == DatasetSpec("openai/gsm8k", "main", "test")
    assert parse_dataset_spec("gsm8k") == DatasetSpec("gsm8k")
    assert parse_dataset_spec("org/ds@train[:100]") == DatasetSpec("org/ds", None, "train", None, 100)
    assert parse_dataset_spec("org/ds:cfg@train[100:]") == DatasetSpec("org/ds", "cfg", "train", 100, None)
    assert str(DatasetSpec("org/ds", "cfg", "train", 100, 250)) == "org/ds:cfg@train[100:250]"
    assert parse_dataset_spec(f"{tmp_path}:main@test") == DatasetSpec(str(tmp_path), "main", "test")
    for not_a_dataset in ("data.jsonl", "./missing/folder:main", "a/b/c", "", "org/ds@train[x:]"):
        assert parse_dataset_spec(not_a_dataset) is None, not_a_dataset
    with pytest.raises(UserError, match="empty"):
        parse_dataset_spec("org/ds@train[5:5]")


def test_configs_and_splits_of_a_dataset_folder(tmp_path):
    """The same `datasets` code path as a hub id (load_dataset with a config and a split, streamed), offline."""
    from p2d.data.read_datasets import dataset_options

    root = _hub_style_folder(tmp_path / "gsm")
    assert dataset_options(str(root)) == {"configs": ["main", "socratic"],
                                          "splits": {"main": ["train", "test"], "socratic": ["train"]}}
    test = load_data(f"{root}:main@test")
    assert len(test) == 7 and test.samples[0].prompt[0]["content"] == "main test q0" and test.format == "question_answer"
    assert len(load_data(f"{root}:socratic")) == 5  # the split argument's default: train
    assert [s.prompt[0]["content"] for s in load_data(f"{root}:main@train[:3]").samples] == \
        ["main train q0", "main train q1", "main train q2"]
    rest = load_data(f"{root}:main@train[3:]")
    assert len(rest) == 27 and rest.samples[0].prompt[0]["content"] == "main train q3"
    capped = load_data(f"{root}:main@train", max_rows=4)  # streamed: reading stops at the cap
    assert len(capped) == 4 and capped.truncated
    assert "config" in user_error(load_data, str(root)).lower()  # two configs: one must be named
    assert "test2" in user_error(load_data, f"{root}:main@test2")
    assert "no rows" in user_error(load_data, f"{root}:main@test[50:]")
    assert "larger than" in user_error(load_data, f"{root}:main", max_bytes=100)


def test_dataset_options_offline_says_so():
    from p2d.data.read_datasets import dataset_options

    msg = user_error(dataset_options, "someone/not-a-real-dataset-p2d")
    assert "offline" in msg and "id:config@split" in msg and "\n" not in msg


def test_pool_probe_and_eval_from_one_dataset(tmp_path, capsys):
    """A run's pool, probe and eval sets from splits and row ranges of one dataset, and `p2d data` on a spec."""
    from p2d.cli import main
    from p2d.config import RunConfig
    from p2d.pipeline import load_run_data

    root = _hub_style_folder(tmp_path / "gsm")
    cfg = RunConfig.from_dict({"pool": f"{root}:main@train[5:]", "probe": f"{root}:main@train[:5]",
                               "eval": f"{root}:main@test"}).validate()
    data = load_run_data(cfg, max_rows={"pool": 20})
    assert (len(data.pool), len(data.probe), len(data.eval)) == (20, 5, 7)
    probe = {s.prompt[0]["content"] for s in data.probe.samples}
    assert not probe & {s.prompt[0]["content"] for s in data.pool.samples}  # the ranges never overlap
    assert main(["data", f"{root}:socratic@train"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 5
    assert main(["data", f"{root}:nope"]) == 2
    assert "could not be loaded" in capsys.readouterr().err
