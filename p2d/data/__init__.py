"""The data: files and datasets read into samples, samples encoded into batches, the built-in task pools.

What belongs here, one job per module:

- ``formats.py``: `Sample`, the row shapes a row is recognised by (alpaca, prompt/response, messages,
  ...) and the column mapping that overrides them;
- ``loading.py``: `load_data` / `load_records` -> `LoadedData`: which reader reads a source, and the
  samples built from its rows (shape, mapping, skipped and repaired rows, the caps for untrusted input);
- ``sniff.py``: what a file is (kind by name, a look at its first bytes) and byte streams capped at
  ``max_bytes``;
- one module per reader, each yielding ``(index, row)`` records: ``read_jsonl.py`` (JSON Lines),
  ``read_json.py`` (JSON documents, whole or streamed), ``read_csv.py`` (CSV/TSV), ``read_parquet.py``,
  ``read_datasets.py`` (``save_to_disk`` folders, dataset folders and hub ids, and their spec syntax);
- ``encoding.py``: samples -> token ids, answer-token labels and padded, length-sorted batches;
- ``builtin.py`` and ``builtin_hard.py``: the built-in task pools (no download).

A new file format is a reader module plus one branch in `p2d.data.loading`; a new built-in pool is its
own module next to the others.
"""

from p2d.data.encoding import IGNORE_INDEX, Encoded, collate, encode, encode_prompts, iter_batches, render
from p2d.data.formats import FORMATS, Sample, SkipRow, detect_format, row_to_sample
from p2d.data.loading import LoadedData, load_data, load_records

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Encoded",
    "LoadedData",
    "Sample",
    "SkipRow",
    "collate",
    "detect_format",
    "encode",
    "encode_prompts",
    "iter_batches",
    "load_data",
    "load_records",
    "render",
    "row_to_sample",
]
