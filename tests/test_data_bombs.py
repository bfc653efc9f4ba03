"""Issue 20, parsing: every format applies the row, byte, decompressed-byte and field caps while it reads.

The fast tests check each cap on small files (the JSON streaming reader is forced with a tiny
``_WHOLE_JSON``, and its results are compared with parsing whole). The slow test loads each bomb of
the issue in a fresh process and measures its peak memory (RSS) above the same process after
loading a small file of the same kind (modules and allocator warmed up).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap

import pytest

from p2d.data import load_data
from p2d.errors import UserError

OK = {"prompt": "What is 2 + 2?", "response": "4"}
#: what the public demo passes (p2d.studio.limits.DEMO): 400 pool rows, 50 MB decompressed, 100,000-character fields
DEMO = dict(max_rows=400, max_bytes=50 * 2**20, max_field_chars=100_000)


def user_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def streamed(monkeypatch):
    """Every JSON document is read by the streaming reader (not parsed whole)."""
    import p2d.data.loading as loading

    monkeypatch.setattr(loading, "_WHOLE_JSON", 16)


DOCUMENTS = [
    [OK, {"prompt": "a"}, 7, OK],
    {"meta": {"v": 1}, "tags": ["x", "y"], "data": [OK, OK, "s"]},
    {"train": [OK, OK, OK], "test": [OK]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"tags": [1, 2, [3]], "n": None, "rows": [OK]},
    [{"prompt": "x" * 70_000 + "\\\"", "response": "q"}, OK],  # items longer than a block, escapes across blocks
]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=range(len(DOCUMENTS)))
@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".jsonl"])
def test_streamed_json_reads_what_parsing_whole_reads(tmp_path, monkeypatch, doc, suffix):
    import p2d.data.loading as loading

    path = tmp_path / f"doc{suffix}"
    text = json.dumps(doc, indent=1).encode()
    path.write_bytes(gzip.compress(text) if suffix.endswith(".gz") else text)
    whole = load_data(path).summary()
    monkeypatch.setattr(loading, "_WHOLE_JSON", 16)
    assert load_data(path).summary() == whole
    if isinstance(doc, dict) and "test" in doc:
        assert len(load_data(path, split="test")) == 1


def test_streamed_json_errors_are_one_line(tmp_path, streamed):
    p = tmp_path / "bad.json"
    for text, words in (('[{"prompt": "a", "response": "b"}, {"x": tru}]', "not valid JSON"),
                        ('[{"prompt": "a", "response": "b"}', "not valid JSON"),
                        ('{"a": [{"prompt": "p", "response": "r"}], "b": [{"x": 1}]}', "several list fields (a, b)"),
                        ('"' + "x" * 100 + '"', "holds a JSON string"),
                        ('[' + json.dumps(OK) + '] [1]', "extra data")):
        p.write_text(text)
        assert words in user_error(load_data, p), text


def test_a_json_bomb_is_refused_after_the_skip_allowance(tmp_path):
    """The issue's 50 KB .json.gz of ``[{},{},...]`` (49 MB unpacked), and the same rows inside an object:
    reading stops after max(1000, 10 x max_rows) unusable rows, long before the end."""
    bomb = tmp_path / "empty.json.gz"
    bomb.write_bytes(gzip.compress(b"[" + b"{}," * (49 * 2**20 // 3) + b"{}]", 9))
    assert bomb.stat().st_size < 60_000
    assert "no usable rows" in user_error(load_data, bomb, **DEMO)
    rows = tmp_path / "obj.json.gz"
    rows.write_bytes(gzip.compress(b'{"data": [' + b'{"prompt": "x", "response": ""},' * 2_000_000 + b'{}]}', 9))
    msg = user_error(load_data, rows, **DEMO)
    assert "no usable rows in the first 4000 rows" in msg and "missing or empty answer" in msg
    # good rows after the allowance are never reached; good rows before it are kept (cut, not refused)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text((json.dumps(OK) + "\n") * 3 + '{"prompt": "x", "response": ""}\n' * 5000 + (json.dumps(OK) + "\n") * 3)
    data = load_data(mixed, max_rows=10)
    assert len(data) == 3 and data.truncated and data.skipped == {"missing or empty answer": 1000}


def test_long_fields_and_rows_are_skipped_or_refused(tmp_path, streamed):
    long = {"prompt": "a" * 5000, "response": "b"}
    lines = tmp_path / "l.jsonl"
    lines.write_text(json.dumps(long) + "\n" + json.dumps(OK) + "\n")
    data = load_data(lines, max_field_chars=1000)
    assert len(data) == 1 and data.skipped == {"a field longer than 1000 characters": 1}
    assert len(load_data(lines)) == 2  # no cap: both
    # a JSON Lines row over the row cap (1 MiB here) is skipped without being read into memory
    lines.write_text('{"prompt": "' + "a" * (2 * 2**20) + '", "response": "b"}\n' + json.dumps(OK) + "\n")
    data = load_data(lines, max_field_chars=1000)
    assert len(data) == 1 and data.skipped == {"row longer than 1 MB": 1}
    # a JSON document item over it stops the file (the reader cannot find the next item without reading it)
    doc = tmp_path / "d.json"
    doc.write_text(json.dumps([OK, {"prompt": "a" * (2 * 2**20), "response": "b"}, OK]))
    assert "has an item longer than 1 MB" in user_error(load_data, doc, max_field_chars=1000)
    assert len(load_data(doc)) == 3
    # a CSV cell over it stops the file too
    csv = tmp_path / "c.csv"
    csv.write_text("prompt,response\n" + "a" * (2 * 2**20) + ",b\nq,a\n")
    assert "field larger than field limit" in user_error(load_data, csv, max_field_chars=1000)
    assert len(load_data(csv)) == 2


def test_parquet_values_are_counted_before_they_are_copied(tmp_path):
    """The issue's 1,000-byte Parquet of 60 strings of 8 MB (dictionary-encoded: 480 MB once each row has its
    copy) was stored as "60 rows"; its values are now measured on the Arrow arrays first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": ["a" * (8 * 2**20)] * 60, "response": ["b"] * 60}), big, compression="zstd")
    assert big.stat().st_size < 2000
    assert "row longer than 1 MB" in user_error(load_data, big, **DEMO)
    assert "expands beyond 50 MB" in user_error(load_data, big, max_rows=400, max_bytes=50 * 2**20)
    # the metadata's uncompressed size is checked before anything is read
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"prompt": ["a" * 4000] * 3000, "response": ["b"] * 3000}), plain,
                   use_dictionary=False, compression="zstd")
    assert "expands beyond 9.54 MB" in user_error(load_data, plain, max_bytes=10_000_000)
    # nested columns (chat turns) are measured too
    turn = [{"role": "user", "content": "c" * 300_000}, {"role": "assistant", "content": "d"}]
    chat = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"messages": [turn] * 20 + [OK and [{"role": "user", "content": "q"},
                                                                 {"role": "assistant", "content": "a"}]]}), chat)
    data = load_data(chat, max_field_chars=100_000)
    assert len(data) == 1 and data.skipped == {"a field longer than 100000 characters": 20}
    assert "expands beyond 2 MB" in user_error(load_data, chat, max_bytes=2 * 2**20)
    assert len(load_data(chat)) == 21


def _parquet(columns: dict) -> bytes:
    """A Parquet file whose text columns repeat one value (dictionary-encoded: the value is stored once)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({name: pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), pa.array([value]))
                      for name, (value, n) in columns.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


BOMBS = {
    # name: its bytes (made lazily); each is loaded with the demo's caps (DEMO)
    "empty.json.gz": lambda: gzip.compress(b"[" + b"{}," * (49 * 2**20 // 3) + b"{}]", 9),
    "rows.json.gz": lambda: gzip.compress(b'{"data": [' + b'{"prompt": "x", "response": ""},' * 1_500_000 + b"{}]}", 9),
    "lines.jsonl.gz": lambda: gzip.compress((json.dumps({"prompt": "What? " + "pad " * 200, "response": "2"}) + "\n")
                                            .encode() * 200_000, 9),
    "line.jsonl.gz": lambda: gzip.compress(b'{"prompt": "' + b"a" * (40 * 2**20) + b'", "response": "b"}\n', 9),
    "big.parquet": lambda: _parquet({"prompt": ("a" * (8 * 2**20), 60), "response": ("b", 60)}),
    "mid.parquet": lambda: _parquet({"prompt": ("a" * (2500 * 1024), 40), "response": ("b", 40)}),
}

MEASURE = textwrap.dedent('''
    import json, os, sys, threading, time
    from pathlib import Path
    from p2d.data import load_data
    from p2d.errors import UserError

    def rss():  # resident memory now, bytes
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    path, warm = Path(sys.argv[1]), Path(sys.argv[2])
    caps = json.loads(sys.argv[3])
    load_data(warm, **caps)  # the modules and the allocator warmed up on a small file of the same kind
    base, top, done = rss(), [0], threading.Event()

    def sample():  # the highest resident memory while the bomb loads, every millisecond
        while not done.is_set():
            top[0] = max(top[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    try:
        outcome = f"{len(load_data(path, **caps))} rows"
    except UserError as exc:
        outcome = "refused: " + str(exc).replace(str(path), path.name)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = (max(top[0], rss()) - base) / 2**20
    print(json.dumps({"name": path.name, "bytes": path.stat().st_size, "peak_mb": round(peak, 1),
                      "seconds": round(seconds, 2), "outcome": outcome}))
''')

#: the stated bound: no bomb costs more than this much memory above a warmed-up loader
BOMB_MB = 100


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_stay_within_the_memory_bound(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BOMBS[name]())
    warm = tmp_path / ("warm" + "".join(path.suffixes))
    if name.endswith(".parquet"):
        warm.write_bytes(_parquet({"prompt": ("q", 50), "response": ("a", 50)}))
    else:
        warm.write_bytes(gzip.compress(json.dumps([OK] * 50).encode()))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(warm), json.dumps(DEMO)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["peak_mb"] < BOMB_MB, result
    assert result["seconds"] < 30, result
    if name != "lines.jsonl.gz":
        assert result["outcome"].startswith("refused"), result
