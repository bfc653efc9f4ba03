"""Parquet files, read a batch of rows at a time (pyarrow, imported only when a Parquet file is read).

With ``max_bytes`` the file's size, the uncompressed size its metadata declares and the bytes of the
values converted so far stay under the cap; text columns are read dictionary-encoded, so a value
repeated on many rows is counted (and a row over ``row_cap`` skipped) before it is copied into each row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from p2d.data.formats import Record, SkipRow
from p2d.data.sniff import size_text
from p2d.errors import UserError, one_line


_PARQUET_BATCH = 64         # Parquet rows converted to Python at a time


def parquet_records(path: Path, max_bytes: int | None, row_cap: int | None = None) -> Iterator[Record]:
    """Rows of a Parquet file, a few at a time. With ``max_bytes``: the file's size, the uncompressed
    size its metadata declares and the bytes of the values converted so far stay under it. Text
    columns are read dictionary-encoded, so a value repeated on many rows is counted (and a row over
    ``row_cap`` skipped) before it is copied into each row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise UserError(f"{path} is larger than {size_text(max_bytes)}: use a smaller file")
    try:
        meta = pq.ParquetFile(path).metadata
        n_rows = meta.num_rows
        declared = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
        texts = [meta.schema.column(i).path for i in range(meta.num_columns)
                 if meta.schema.column(i).physical_type == "BYTE_ARRAY"]
        pf = pq.ParquetFile(path, read_dictionary=texts or None)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad files
        raise UserError(f"could not read Parquet file {path}: {one_line(e)}") from None
    if n_rows == 0:
        raise UserError(f"{path} is empty: it has no rows")
    if max_bytes is not None and declared > max_bytes:
        raise UserError(f"{path} expands beyond {size_text(max_bytes)}: use a smaller file")

    def gen():
        index, used = 0, 0
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH)
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    return
                sizes = _row_bytes(batch)
                keep = sizes <= row_cap if row_cap is not None else sizes >= 0
                used += int(sizes[keep].sum())
                if max_bytes is not None and used > max_bytes:
                    raise UserError(f"{path} expands beyond {size_text(max_bytes)}: use a smaller file")
                rows = (batch if keep.all() else batch.filter(pa.array(keep))).to_pylist()
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged page shows up only when read
                raise UserError(f"could not read Parquet file {path}: {one_line(e)}") from None
            kept = iter(rows)
            for ok in keep:
                yield index, next(kept) if ok else SkipRow(f"row longer than {size_text(row_cap)}")
                index += 1

    return gen()


def _row_bytes(batch):
    """Bytes each row's values hold once converted (texts and binaries by their length, other values by
    their width), as a numpy array; computed on the Arrow arrays, nothing is converted."""
    import numpy as np

    total = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        total += _value_bytes(column)
    return total


def _value_bytes(arr):
    """`_row_bytes` for one Arrow array (per element)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t, n = arr.type, len(arr)
    if pa.types.is_dictionary(t):
        lengths = _value_bytes(arr.dictionary)
        if len(lengths) == 0:
            return np.zeros(n, dtype=np.int64)
        out = lengths[arr.indices.fill_null(0).to_numpy(zero_copy_only=False)]
        return np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, out)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) or pa.types.is_map(t):
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        inner = _value_bytes(pc.list_flatten(arr))
        return np.bincount(parents, weights=inner, minlength=n).astype(np.int64)
    if pa.types.is_struct(t):
        total = np.zeros(n, dtype=np.int64)
        for field_array in arr.flatten():
            total += _value_bytes(field_array)
        return total
    try:
        width = max(1, t.bit_width // 8)
    except ValueError:  # a type without a fixed width that is not handled above
        width = 8
    return np.full(n, width, dtype=np.int64)
