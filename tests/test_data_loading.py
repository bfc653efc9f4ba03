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
                              "skipped_reasons": {"missing or empty text": 1}, "format": "text",
                              "columns": ["text"], "tasks": {}}


# --- bad input ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    assert user_error(load_data, p) == f"file not found: {p}"
    assert "file not found" in user_error(load_data, "./also/missing")


def test_hub_id_offline():
    msg = user_error(load_data, "someone/not-a-real-dataset-p2d")
    assert "could not be found locally or on the hub" in msg


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
