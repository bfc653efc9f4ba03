"""Dataset loading and encoding.

`load_data` reads JSONL/JSON/CSV/TSV/Parquet files, `save_to_disk` folders and hub ids into
`Sample`s (see `p2d.data.formats` for the row shapes it recognises); `encode` and friends turn
samples into token ids, loss labels and padded batches.
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
