"""A corpus on disk: reading JSONL, CSV or Parquet in shards of rows (checked, with each bad row named),
and writing each shard's Parquet file whole or not at all.

Readers stream: only one shard's ids and texts are Python objects at a time. A shard is rows
[index * shard_rows, (index + 1) * shard_rows) of the input, so the same input and `--shard-rows`
give the same shards on every run, which is what `--resume` relies on. A shard file is written under a
temporary name, flushed to disk and renamed: a file named `part-NNNNN.parquet` is complete.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
PARQUET_MAGIC = b"PAR1"
SHARD_PREFIX, SHARD_SUFFIX = "part-", ".parquet"
METADATA_PREFIX = "embed_rerank."


class CorpusError(Exception):
    """What was wrong with the input, the options or the output folder, and what to do: one line."""


def pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # noqa: F401 - the submodule, loaded for `pa.parquet`
    except ImportError:
        raise CorpusError("the corpus command needs pyarrow: pip install 'pyarrow==21.0.0' "
                          "(or reinstall this project: pip install -e .)") from None
    return pa


# ---- the input ----


@dataclass
class Shard:
    index: int
    first_row: int  # 0-based row of the input where this shard starts
    ids: list[Any]
    texts: list[str]


def detect_format(path: Path, given: str | None = None) -> str:
    """The input's format from `--format` or its extension, checked against its first bytes."""
    if not path.is_file():
        raise CorpusError(f"input {path} does not exist or is not a file")
    fmt = given or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise CorpusError(f"input {path}: unknown extension {path.suffix!r}; name it .jsonl, .csv or .parquet, "
                          "or pass --format jsonl|csv|parquet")
    with path.open("rb") as f:
        head = f.read(4)
    if fmt == "parquet" and head != PARQUET_MAGIC:
        raise CorpusError(f"input {path} is not a Parquet file (it does not start with the Parquet magic bytes "
                          "PAR1): pass --format jsonl or csv if that is what it holds")
    if fmt != "parquet" and head == PARQUET_MAGIC:
        raise CorpusError(f"input {path} is a Parquet file, not {fmt}: rename it to .parquet or pass --format parquet")
    return fmt


def count_rows(path: Path, fmt: str) -> int | None:
    """Rows in the input for the progress bar's ETA: Parquet's footer; JSONL's non-blank lines (one fast pass
    over the bytes); None for CSV (quoted fields may span lines)."""
    if fmt == "parquet":
        return pyarrow().parquet.ParquetFile(path).metadata.num_rows
    if fmt == "jsonl":
        rows = 0
        with path.open("rb") as f:
            for line in f:
                rows += bool(line.strip())
        return rows
    return None


def check_text(text: Any, where: Callable[[], str], column: str) -> str:
    if not isinstance(text, str):
        kind = "missing (null)" if text is None else f"a {type(text).__name__}, not a string"
        raise CorpusError(f"{where()}: the text column {column!r} is {kind}: give every row a non-empty text "
                          "(or fix the row and run again with --resume)")
    if not text.strip():
        raise CorpusError(f"{where()}: the text column {column!r} is empty: give every row a non-empty text "
                          "(or remove the row and run again with --resume)")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CorpusError(f"{where()}: the text holds a lone UTF-16 surrogate at character {exc.start}: "
                              "fix its encoding") from None
    return text


def _check_id(value: Any, kind: list[type], where: Callable[[], str], column: str) -> Any:
    if value is None or (isinstance(value, str) and not value):
        raise CorpusError(f"{where()}: the id column {column!r} is missing or empty: give every row an id")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise CorpusError(f"{where()}: the id {value!r} is a {type(value).__name__}: ids are integers or strings")
    if not kind:
        kind.append(type(value))
    elif type(value) is not kind[0]:
        raise CorpusError(f"{where()}: the id {value!r} is a {type(value).__name__} where the first row's is a "
                          f"{kind[0].__name__}: use one type for every id")
    return value


def _done_rows(skip: Callable[[int], bool], shard_rows: int) -> Callable[[], bool]:
    """Counts the input's rows as a reader meets them: True for a row of a shard that `skip` says is done
    (the reader yields None for it without parsing it)."""
    rows = itertools.count()
    return lambda: skip(next(rows) // shard_rows)


def _rows_jsonl(path: Path, text_column: str, id_column: str, skip: Callable[[int], bool],
                shard_rows: int) -> Iterator[tuple[Any, Any, Callable[[], str]] | None]:
    """(id, text, where) per row; None for a row of a shard that `skip` says is done (not parsed: only counted)."""
    done = _done_rows(skip, shard_rows)
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if done():
                yield None
                continue
            where = partial("{} line {}".format, path, number)
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise CorpusError(f"{where()} is not JSON ({exc}): the input must hold one JSON object per line "
                                  "(or pass --format csv|parquet if it is one of those)") from None
            if not isinstance(record, dict):
                raise CorpusError(f"{where()} is a JSON {type(record).__name__}, not an object with {text_column!r} "
                                  f"and {id_column!r}")
            for column in (text_column, id_column):
                if column not in record:
                    raise CorpusError(f"{where()} has no {column!r} field (its fields: {', '.join(map(repr, record))}): "
                                      "name the columns with --text-column and --id-column")
            yield record[id_column], record[text_column], where


def _rows_csv(path: Path, text_column: str, id_column: str, skip: Callable[[int], bool],
              shard_rows: int) -> Iterator[tuple[Any, Any, Callable[[], str]] | None]:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CorpusError(f"{path} is not a CSV file with a header row ({exc})") from None
        for column in (text_column, id_column):
            if column not in header:
                raise CorpusError(f"{path}: the CSV header has no column {column!r} (its columns: "
                                  f"{', '.join(map(repr, header))}): name them with --text-column and --id-column")
        t, i = header.index(text_column), header.index(id_column)
        done = _done_rows(skip, shard_rows)
        try:
            for record in reader:
                if not record:
                    continue
                if done():
                    yield None
                    continue
                where = partial("{} line {}".format, path, reader.line_num)
                if len(record) != len(header):
                    raise CorpusError(f"{where()} has {len(record)} fields where the header has {len(header)}: "
                                      "quote fields that hold commas or newlines")
                yield record[i], record[t], where
        except (csv.Error, UnicodeDecodeError) as exc:
            raise CorpusError(f"{path} line {reader.line_num}: not readable as UTF-8 CSV ({exc})") from None


def _rows_parquet(path: Path, text_column: str, id_column: str, skip: Callable[[int], bool],
                  shard_rows: int) -> Iterator[tuple[Any, Any, Callable[[], str]] | None]:
    pa = pyarrow()
    try:
        file = pa.parquet.ParquetFile(path)
    except pa.ArrowException as exc:
        raise CorpusError(f"input {path} is not a readable Parquet file ({exc})") from None
    names = file.schema_arrow.names
    for column in (text_column, id_column):
        if column not in names:
            raise CorpusError(f"{path} has no column {column!r} (its columns: {', '.join(map(repr, names))}): "
                              "name them with --text-column and --id-column")
    text_type = file.schema_arrow.field(text_column).type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise CorpusError(f"{path}: the text column {text_column!r} is {text_type}, not strings: "
                          "choose the text column with --text-column")
    done, row = _done_rows(skip, shard_rows), 0
    for batch in file.iter_batches(batch_size=min(shard_rows, 65536), columns=[id_column, text_column]):
        ids, texts = batch.column(0), batch.column(1)
        for k in range(batch.num_rows):
            row += 1
            if done():
                yield None
                continue
            yield ids[k].as_py(), texts[k].as_py(), partial("{} row {}".format, path, row)


READERS = {"jsonl": _rows_jsonl, "csv": _rows_csv, "parquet": _rows_parquet}


def read_shards(path: Path, fmt: str, text_column: str, id_column: str, shard_rows: int,
                skip: Callable[[int], bool] = lambda index: False) -> Iterator[Shard]:
    """The input's shards in order, each row checked (a bad one raises CorpusError naming it); shards that
    `skip` names are passed over without being parsed or yielded."""
    kind: list[type] = []
    ids: list[Any] = []
    texts: list[str] = []
    row = 0
    index = 0
    for item in READERS[fmt](path, text_column, id_column, skip, shard_rows):
        if item is not None:
            id_, text, where = item
            ids.append(_check_id(id_, kind, where, id_column))
            texts.append(check_text(text, where, text_column))
        row += 1
        if row % shard_rows == 0:
            if ids:
                yield Shard(index, index * shard_rows, ids, texts)
            ids, texts = [], []
            index += 1
    if ids:
        yield Shard(index, index * shard_rows, ids, texts)


# ---- the output ----


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"{SHARD_PREFIX}{index:05d}{SHARD_SUFFIX}"


def shard_index(path: Path) -> int | None:
    name = path.name
    if not (name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)):
        return None
    digits = name[len(SHARD_PREFIX):-len(SHARD_SUFFIX)]
    return int(digits) if digits.isdigit() else None


def written_shards(out_dir: Path) -> dict[int, int]:
    """Shard index -> rows of every complete shard file in `out_dir` (its footer read); a file that is not
    readable Parquet is reported and will be written again. Temporary files of an interrupted run are removed."""
    pa = pyarrow()
    found: dict[int, int] = {}
    if not out_dir.is_dir():
        return found
    for path in sorted(out_dir.iterdir()):
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)  # a shard being written when the last run was killed
            continue
        index = shard_index(path)
        if index is None or not path.is_file():
            continue
        try:
            found[index] = pa.parquet.read_metadata(path).num_rows
        except (pa.ArrowException, OSError) as exc:
            print(f"corpus: {path} is not a complete Parquet file ({exc}); it will be written again", file=sys.stderr)
    return found


def embedding_array(matrix: np.ndarray) -> Any:
    """A fixed-size list column straight from the matrix's buffer (no Python floats)."""
    pa = pyarrow()
    matrix = np.ascontiguousarray(matrix)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def sparse_array(rows: list[tuple[np.ndarray, np.ndarray]]) -> Any:
    """A struct<indices: list<int32>, values: list<float32>> column from per-row arrays (one copy each)."""
    pa = pyarrow()
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(i) for i, _ in rows], out=offsets[1:])
    flat = [np.concatenate([r[k] for r in rows]) if rows else np.zeros(0) for k in (0, 1)]
    indices = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat[0].astype(np.int32)))
    values = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat[1].astype(np.float32)))
    return pa.StructArray.from_arrays([indices, values], names=["indices", "values"])


def shard_table(ids: list[Any] | Any, vectors: Any, metadata: dict[str, str]) -> Any:
    """The shard's `id` and `embedding` columns: a fixed-size list from a matrix, a struct from sparse rows."""
    pa = pyarrow()
    ids_array = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids)
    column = embedding_array(vectors) if isinstance(vectors, np.ndarray) else sparse_array(vectors)
    table = pa.table({"id": ids_array, "embedding": column})
    return table.replace_schema_metadata({f"{METADATA_PREFIX}{k}": str(v) for k, v in metadata.items()})


def write_shard(path: Path, table: Any) -> None:
    """Write `table` to `path` whole or not at all: a temporary file, flushed, then renamed over."""
    pa = pyarrow()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pa.parquet.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        raise CorpusError(f"could not write shard {path} ({exc}); the shards written before it are kept: "
                          "fix the output folder (space, permissions) and run again with --resume") from None
