"""Property-based tests of `load_data` on generated and hostile input.

The invariant checked everywhere: `load_data` either raises `UserError` (one line) or returns a
`LoadedData` whose ``len(samples) + sum(skipped.values())`` equals the number of rows in the file
(JSONL: non-blank lines; JSON array: items; CSV: non-blank records after the header), whose samples
have a non-empty text answer and text prompt turns, and whose rows and texts can be written as
UTF-8 JSON (what selection does later).  No other exception may escape.
"""

import csv
import gzip
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from p2d.data import load_data, load_records
from p2d.errors import UserError

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

COLUMNS = ["instruction", "input", "context", "output", "response", "prompt", "query", "completion", "answer",
           "chosen", "question", "messages", "conversations", "text", "task", "category", "system", " Output "]
ROLES = ["user", "assistant", "system", "human", "gpt", "tool", "USER", ""]

# text that may hold lone surrogates (json.dumps writes them as \udXXX escapes)
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=20)
plain_text = st.text(max_size=20)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(any_text, inner, max_size=4), max_leaves=12)
turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": any_text | json_values}),
                 max_size=4)
cell_values = (plain_text | any_text | json_values | turns
               | turns.map(json.dumps) | st.just("") | st.just(None))
random_records = st.dictionaries(st.sampled_from(COLUMNS) | plain_text, cell_values, max_size=5)
words = st.builds(lambda a, b: a + "w" + b, any_text, any_text)  # never blank
chat = st.builds(lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}], words, words)
good_records = (
    st.fixed_dictionaries({"instruction": words, "output": words}, optional={"input": any_text, "task": plain_text})
    | st.fixed_dictionaries({"prompt": words, "response": words})
    | st.fixed_dictionaries({"question": words, "answer": words}, optional={"category": plain_text})
    | st.fixed_dictionaries({"messages": chat})
    | st.fixed_dictionaries({"conversations": chat.map(
        lambda c: [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]} for t in c])})
    | st.fixed_dictionaries({"text": words}))
records = good_records | good_records | random_records
deep_values = st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)


def _check(path: Path, expected_rows: int | None, **kwargs):
    """Load ``path``; UserError is fine; otherwise check the invariant."""
    try:
        data = load_data(path, **kwargs)
    except UserError as e:
        assert len(str(e).splitlines()) == 1
        event("UserError")
        return None
    event("loaded")
    if expected_rows is not None and kwargs.get("max_rows") is None:
        assert len(data.samples) + sum(data.skipped.values()) == expected_rows, data.summary()
    if kwargs.get("max_bytes") is not None and not data.truncated:  # read whole, so it fit
        raw = path.read_bytes()
        size = len(gzip.decompress(raw)) if path.suffix == ".gz" else len(raw)
        assert size <= kwargs["max_bytes"]
    _usable(data)
    return data


def _usable(data):
    assert data.samples and all(n > 0 for n in data.skipped.values())
    indices = [s.index for s in data.samples]
    assert indices == sorted(set(indices))
    for s in data.samples:
        assert isinstance(s.answer, str) and s.answer.strip()
        assert all(isinstance(t["content"], str) for t in s.prompt)
        json.dumps({"row": s.row, "prompt": s.prompt, "answer": s.answer, "task": s.task},
                   ensure_ascii=False, default=str).encode("utf-8")
    json.dumps(data.summary(), ensure_ascii=False).encode("utf-8")


def _write(tmp: str, name: str, data: bytes, gz: bool) -> Path:
    path = Path(tmp) / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _line(value) -> bytes:
    kind, v = value
    if kind == "json":
        return json.dumps(v).encode()
    if kind == "raw-json":  # lone surrogates as raw (invalid) UTF-8
        return json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return v.encode("utf-8", "surrogatepass")  # garbage, deep or blank


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except (ValueError, RecursionError):
        return False


lines = st.lists(
    st.tuples(st.just("json"), records) | st.tuples(st.just("json"), json_values)
    | st.tuples(st.just("raw-json"), records)
    | st.tuples(st.just("garbage"), st.text(st.characters(exclude_characters="\n"), max_size=30))
    | st.tuples(st.just("garbage"), deep_values) | st.tuples(st.just("garbage"), st.sampled_from(["", " ", "\r"])),
    max_size=25)


@FUZZ
@given(lines=lines, gz=st.booleans(), crlf=st.booleans(), suffix=st.sampled_from([".jsonl", ".ndjson", ".json"]),
       max_bytes=st.none() | st.integers(1, 3000), max_rows=st.none() | st.integers(1, 10))
def test_jsonl_lines(lines, gz, crlf, suffix, max_bytes, max_rows):
    data = (b"\r\n" if crlf else b"\n").join(_line(v) for v in lines)
    expected = sum(1 for raw in data.split(b"\n") if raw.strip())
    if data.startswith(b"\xef\xbb\xbf") and not data.split(b"\n")[0][3:].strip():
        expected -= 1
    # A .json file, or a .jsonl file that is one JSON value or whose first line opens an array or an
    # unfinished object, may be read as one JSON document: then the rows are not the lines.
    first = next((raw.strip() for raw in data.split(b"\n") if raw.strip()), b"").lstrip(b"\xef\xbb\xbf")
    document = (suffix == ".json" or (first[:1] in (b"[", b"{") and not _is_object(first))
                or _is_json(data))
    with tempfile.TemporaryDirectory() as tmp:
        _check(_write(tmp, "d" + suffix, data, gz), None if document else expected,
               max_bytes=max_bytes, max_rows=max_rows)


@FUZZ
@given(items=st.lists(records | json_values | deep_values.map(lambda s: ("deep", s)), max_size=20), gz=st.booleans())
def test_json_array(items, gz):
    text = "[" + ", ".join(v[1] if isinstance(v, tuple) and v[:1] == ("deep",) else json.dumps(v)
                           for v in items) + "]"
    with tempfile.TemporaryDirectory() as tmp:
        _check(_write(tmp, "d.json", text.encode(), gz), len(items))


@FUZZ
@given(doc=json_values | st.dictionaries(st.sampled_from(["data", "train", "rows"]) | plain_text,
                                         st.lists(records, max_size=5) | json_values, max_size=3),
       split=st.sampled_from(["train", "test"]))
def test_json_documents(doc, split):
    with tempfile.TemporaryDirectory() as tmp:
        _check(_write(tmp, "d.json", json.dumps(doc).encode(), False), None, split=split)


csv_cells = st.text(st.characters(exclude_categories=("Cs",)), max_size=15) | st.sampled_from(["", " ", "\r\n"]) \
    | turns.map(json.dumps)
csv_words = st.builds(lambda a, b: a + "w" + b, plain_text, plain_text)  # CSV text is UTF-8: no surrogates


HEADERS = [["instruction", "input", "output"], ["prompt", "response", "task"], ["Question", "Answer"],
           ["messages"], ["text", "source"], ["instruction", "output", "messages"]]


@FUZZ
@given(header=st.sampled_from(HEADERS) | st.sampled_from(HEADERS) | st.lists(st.sampled_from(COLUMNS) | st.text(max_size=8), min_size=1,
                                                  max_size=5),
       data=st.data(), delimiter=st.sampled_from([",", ";", "\t"]), bom=st.booleans(), gz=st.booleans())
def test_csv(header, data, delimiter, bom, gz):
    width = len(header)
    rows = data.draw(st.lists(st.lists(csv_words | csv_cells, min_size=width, max_size=width)
                              | st.lists(csv_cells, max_size=width + 2), min_size=1, max_size=15))
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    raw = (b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode("utf-8")
    # the records a CSV reader sees (the loader picks ';' itself only when the header has no ',')
    reader_delim = "\t" if delimiter == "\t" else (";" if "," not in buf.getvalue().split("\r\n")[0]
                                                   and ";" in buf.getvalue().split("\r\n")[0] else ",")
    parsed = list(csv.reader(io.StringIO(buf.getvalue(), newline=""), delimiter=reader_delim))[1:]
    expected = sum(1 for cells in parsed if any(c.strip() for c in cells))
    suffix = ".tsv" if delimiter == "\t" else ".csv"
    with tempfile.TemporaryDirectory() as tmp:
        _check(_write(tmp, "d" + suffix, raw, gz), expected)


@FUZZ
@given(data=st.binary(max_size=3000), gz=st.booleans(),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]),
       max_bytes=st.none() | st.integers(1, 4000), max_rows=st.none() | st.integers(1, 5))
def test_raw_bytes(data, gz, suffix, max_bytes, max_rows):
    gz = gz and suffix != ".parquet"
    with tempfile.TemporaryDirectory() as tmp:
        _check(_write(tmp, "d" + suffix, data, gz), None, max_bytes=max_bytes, max_rows=max_rows)


def _parquet_bytes() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(300)]), buf,
                   row_group_size=50)
    return buf.getvalue()


VALID_FILES = {
    ".jsonl": "".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(60)).encode(),
    ".json": json.dumps({"data": [{"messages": [{"role": "user", "content": f"q{i}"},
                                                {"role": "assistant", "content": f"a{i}"}]} for i in range(30)]}).encode(),
    ".csv": "".join(f'"q {i}\nmore",a{i}\r\n' for i in range(60)).join(["question,answer\r\n", ""]).encode(),
    ".parquet": _parquet_bytes(),
}


@FUZZ
@given(suffix=st.sampled_from(sorted(VALID_FILES)), gz=st.booleans(),
       edits=st.lists(st.tuples(st.floats(0, 1), st.binary(max_size=4)), min_size=1, max_size=4),
       cut=st.none() | st.floats(0, 1), max_rows=st.none() | st.integers(1, 100),
       max_bytes=st.none() | st.integers(100, 20_000))
def test_corrupted_files(suffix, gz, edits, cut, max_rows, max_bytes):
    """A valid file (optionally gzipped) with a few bytes overwritten and maybe cut short."""
    gz = gz and suffix != ".parquet"
    data = bytearray(gzip.compress(VALID_FILES[suffix], mtime=0) if gz else VALID_FILES[suffix])
    for where, new in edits:
        at = int(where * (len(data) - 1))
        data[at:at + len(new)] = new
    if cut is not None:
        data = data[: int(cut * len(data))]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("d" + suffix + (".gz" if gz else ""))
        path.write_bytes(bytes(data))
        _check(path, None, max_rows=max_rows, max_bytes=max_bytes)


@FUZZ
@given(prefix=st.binary(max_size=200), lines=lines, gz=st.booleans())
def test_binary_prefix_then_lines(prefix, lines, gz):
    data = prefix + b"\n" + b"\n".join(_line(v) for v in lines)
    with tempfile.TemporaryDirectory() as tmp:
        _check(_write(tmp, "d.jsonl", data, gz), None)


@FUZZ
@given(rows=st.lists(records | json_values, max_size=20), max_rows=st.none() | st.integers(1, 5))
def test_records_in_memory(rows, max_rows):
    try:
        data = load_records(rows, max_rows=max_rows)
    except UserError as e:
        assert len(str(e).splitlines()) == 1
        event("UserError")
        return
    event("loaded")
    if max_rows is None:
        assert len(data.samples) + sum(data.skipped.values()) == len(rows)
    else:
        assert len(data.samples) <= max_rows
    _usable(data)
