"""Uploaded dataset files to rows: JSONL, JSON (an array of objects), CSV and Parquet, checked and stored as JSONL.

Pure functions over files on disk, no HTTP and no Redis: the routes (app/api/routes/datasets.py) stream an
upload to a temporary file, call ``normalise`` and keep the summary. Files are read a line, a chunk or a
record batch at a time, never whole. Every problem is an ``ApiError`` that names its lines or columns:
415 ``unsupported_media_type`` (extension, content type), 422 ``invalid_dataset`` (lines that do not
parse, rows of the wrong shape), 422 ``empty_dataset`` (no usable row).

A row is an object whose values are strings, numbers, booleans or null, or, for a ``messages`` column,
a list of ``{role, content}`` objects (OpenAI-style chat; role system, user or assistant). Values are
kept as they are, except that non-finite numbers (NaN, Infinity) become null; rows whose every value is
empty or null are left out (and counted).
"""

from __future__ import annotations

import codecs
import csv
import itertools
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from app.api.errors import ApiError
from app.api.schemas import DatasetFormat

FORMATS: dict[str, DatasetFormat] = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: Content types a part may declare for each format; ``application/octet-stream`` fits them all.
CONTENT_TYPES: dict[DatasetFormat, frozenset[str]] = {
    "jsonl": frozenset({"application/jsonl", "application/x-jsonl", "application/jsonlines", "text/plain",
                        "application/x-jsonlines", "application/ndjson", "application/x-ndjson", "application/json"}),
    "json": frozenset({"application/json", "text/json", "text/plain"}),
    "csv": frozenset({"text/csv", "application/csv", "text/x-csv", "text/plain", "application/vnd.ms-excel"}),
    "parquet": frozenset({"application/vnd.apache.parquet", "application/parquet", "application/x-parquet"}),
}
#: Roles of a ``messages`` turn, as for inline rows.
CHAT_ROLES = ("system", "user", "assistant")
PREVIEW_ROWS = 5
PREVIEW_CHARS = 1_000
MAX_COLUMNS = 256
MAX_COLUMN_NAME = 100
SHOWN_PROBLEMS = 5
MAX_JSON_ELEMENT_CHARS = 32 * 1024 * 1024
_CHUNK_CHARS = 1024 * 1024
_WHITESPACE = re.compile(r"[ \t\r\n]*")
_VALUES = "values must be strings, numbers, booleans or null (or a 'messages' list of {role, content} objects)"


def detect_file_format(filename: str | None, content_type: str | None) -> DatasetFormat:
    """The format from the file's extension, checked against the part's content type when one is given."""
    suffix = PurePosixPath((filename or "").replace("\\", "/")).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise ApiError(415, "unsupported_media_type",
                       f"cannot tell the format of {filename or 'a file without a name'!r}: "
                       f"name it .jsonl, .json, .csv or .parquet", "file")
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime and mime != "application/octet-stream" and mime not in CONTENT_TYPES[fmt]:
        raise ApiError(415, "unsupported_media_type",
                       f"content type {mime!r} does not fit a {suffix} file; send one of "
                       f"{', '.join(sorted(CONTENT_TYPES[fmt]))} or application/octet-stream", "file")
    return fmt


@dataclass
class Summary:
    row_count: int = 0
    dropped_rows: int = 0
    columns: set[str] = field(default_factory=set)
    preview: list[dict[str, Any]] = field(default_factory=list)


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_dataset", message, "file")


class Problems:
    """Bad lines (or rows), grouped by reason in the order met; the first few are named."""

    def __init__(self, unit: str) -> None:
        self.unit, self.count = unit, 0
        self.shown: dict[str, list[int]] = {}

    def add(self, where: int, reason: str) -> None:
        if self.count < SHOWN_PROBLEMS:
            self.shown.setdefault(reason, []).append(where)
        self.count += 1

    def raise_any(self) -> None:
        if not self.count:
            return
        parts = [f"{self.unit}{'s' if len(w) > 1 else ''} {', '.join(map(str, w))}: {reason}"
                 for reason, w in self.shown.items()]
        more = self.count - SHOWN_PROBLEMS
        raise _invalid("; ".join(parts) + (f" (and {more} more bad {self.unit}s)" if more > 0 else ""))


def _kind(value: Any) -> str:
    for types, name in ((dict, "an object"), (list, "a list"), (bool, "a boolean"), (int | float, "a number"),
                        (str, "a string"), (type(None), "null")):
        if isinstance(value, types):
            return name
    return f"a value of type {type(value).__name__}"


def _message_ok(m: Any) -> bool:
    return isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in CHAT_ROLES \
        and isinstance(m["content"], str)


def check_row(value: Any) -> tuple[dict[str, Any] | None, str]:
    """The row as stored, or None and why it is not one."""
    if not isinstance(value, dict):
        return None, "not a JSON object"
    row: dict[str, Any] = {}
    for key, v in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_COLUMN_NAME:
            return None, f"column names must be 1 to {MAX_COLUMN_NAME} characters"
        if key == "messages" and isinstance(v, list):
            if not all(_message_ok(m) for m in v):
                return None, ("'messages' must be a list of {role, content} objects "
                              f"(role one of {', '.join(CHAT_ROLES)}; content a string)")
        elif isinstance(v, float) and not math.isfinite(v):
            v = None
        elif v is not None and not isinstance(v, str | int | float | bool):
            return None, f"column {key!r} holds {_kind(v)}; {_VALUES}"
        row[key] = v
    return row, ""


def _usable(row: dict[str, Any]) -> bool:
    return any(v is not None and v != [] and not (isinstance(v, str) and not v.strip()) for v in row.values())


def _shorten(row: dict[str, Any]) -> dict[str, Any]:
    def cut(v: Any) -> Any:
        if isinstance(v, str) and len(v) > PREVIEW_CHARS:
            return v[:PREVIEW_CHARS] + "…"
        if isinstance(v, list):
            return [{k: cut(x) for k, x in m.items()} for m in v]
        return v

    return {k: cut(v) for k, v in row.items()}


# -- readers: (line, element or row number, parsed value) for each row; bad ones go to ``problems`` -----

def _read_jsonl(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except ValueError:  # JSONDecodeError and UnicodeDecodeError both
                value = None
            if isinstance(value, dict):
                yield n, value
            else:
                problems.add(n, "not a valid JSON object")


class _JsonChunks:
    """A JSON text read a chunk at a time, decoded one array element at a time."""

    def __init__(self, f: IO[str]) -> None:
        self.f, self.buf, self.pos, self.eof = f, "", 0, False
        self.mark, self.newlines = 0, 0  # newlines before buf[mark], counted as reading goes on
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        chunk = "" if self.eof else self.f.read(_CHUNK_CHARS)
        if not chunk:
            self.eof = True
            return False
        self.newlines = self.line(self.pos) - 1
        self.buf, self.pos, self.mark = self.buf[self.pos:] + chunk, 0, 0
        return True

    def line(self, pos: int | None = None) -> int:
        """The line number at ``pos`` (default: the current position)."""
        pos = self.pos if pos is None else pos
        if pos >= self.mark:
            self.newlines += self.buf.count("\n", self.mark, pos)
            self.mark = pos
            return self.newlines + 1
        return self.newlines - self.buf.count("\n", pos, self.mark) + 1

    def peek(self) -> str:
        """The next character that is not whitespace ('' at the end)."""
        while True:
            match = _WHITESPACE.match(self.buf, self.pos)
            self.pos = match.end() if match else self.pos
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def value(self) -> Any:
        self.peek()
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if len(self.buf) - self.pos < MAX_JSON_ELEMENT_CHARS and self._more():
                    continue  # the element may go on in the next chunk
                raise _invalid(f"not valid JSON at line {self.line(e.pos)}: {e.msg}") from None
            if end == len(self.buf) and self._more():
                continue  # a number at the end of the chunk may go on too
            self.pos = end
            return value


def _read_json(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig") as f:
        doc = _JsonChunks(f)
        if doc.peek() != "[":
            if doc.peek() == "":
                return
            raise _invalid("a .json upload must be one JSON array of objects, like [{\"text\": \"…\"}]; "
                           "for one object per line, name the file .jsonl")
        doc.pos += 1
        if doc.peek() == "]":
            doc.pos += 1
        else:
            for n in itertools.count(1):
                value = doc.value()
                if isinstance(value, dict):
                    yield n, value
                else:
                    problems.add(n, f"{_kind(value)}, not an object")
                nxt = doc.peek()
                doc.pos += 1
                if nxt == "]":
                    break
                if nxt != ",":
                    raise _invalid(f"not valid JSON at line {doc.line(doc.pos - 1)}: expecting ',' or ']'")
        if doc.peek():
            raise _invalid(f"not valid JSON at line {doc.line()}: extra data after the array")


def _read_csv(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next((r for r in reader if r), None)
            if header is None:
                return
            names = [h.strip() for h in header]
            for i, name in enumerate(names, 1):
                if not 0 < len(name) <= MAX_COLUMN_NAME:
                    raise _invalid(f"line {reader.line_num}: header column {i} must be a name of 1 to "
                                   f"{MAX_COLUMN_NAME} characters")
                if names.index(name) != i - 1:
                    raise _invalid(f"line {reader.line_num}: the header names {name!r} twice")
            start = reader.line_num + 1
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not fields:
                    continue
                if len(fields) < len(names):
                    problems.add(line, f"fewer fields than the header's {len(names)} (a missing column)")
                elif len(fields) > len(names):
                    problems.add(line, f"more fields than the header's {len(names)}")
                else:
                    yield line, dict(zip(names, fields, strict=True))
        except csv.Error as e:
            raise _invalid(f"line {reader.line_num}: not valid CSV ({e})") from None


def _read_parquet(path: Path, problems: Problems) -> Iterator[tuple[int, Any]]:
    n = 0
    try:
        with pq.ParquetFile(path) as pf:
            for batch in pf.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    n += 1
                    yield n, record
    except (pa.ArrowException, OSError) as e:
        where = f"after row {n}: " if n else ""
        raise _invalid(f"not a readable Parquet file: {where}{str(e)[:300]}") from None


_READERS: dict[DatasetFormat, Callable[[Path, Problems], Iterator[tuple[int, Any]]]] = {
    "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet,
}


def normalise(src: Path, fmt: DatasetFormat, dest: Path) -> Summary:
    """Parse ``src`` as ``fmt``, check every row and write the usable ones to ``dest`` as JSONL.

    Raises ``ApiError`` (422) naming the first bad lines; ``dest`` is removed then.
    """
    if src.stat().st_size == 0:
        raise ApiError(422, "empty_dataset", "the file is empty", "file")
    problems = Problems({"json": "array element", "parquet": "row"}.get(fmt, "line"))
    summary = Summary()
    try:
        with dest.open("w", encoding="utf-8") as out:
            try:
                for where, value in _READERS[fmt](src, problems):
                    row, reason = check_row(value)
                    if row is None:
                        problems.add(where, reason)
                    elif not _usable(row):
                        summary.dropped_rows += 1
                    elif not problems.count:
                        _keep(summary, row, out)
            except UnicodeDecodeError:
                raise _invalid("the file is not UTF-8 text") from None
        problems.raise_any()
        if not summary.row_count:
            why = f"all {summary.dropped_rows} rows are empty" if summary.dropped_rows else "the file has no rows"
            raise ApiError(422, "empty_dataset", f"no usable rows: {why}", "file")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return summary


def _keep(summary: Summary, row: dict[str, Any], out: IO[str]) -> None:
    summary.columns.update(row)
    if len(summary.columns) > MAX_COLUMNS:
        raise _invalid(f"more than {MAX_COLUMNS} different columns")
    if len(summary.preview) < PREVIEW_ROWS:
        summary.preview.append(_shorten(row))
    out.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary.row_count += 1
