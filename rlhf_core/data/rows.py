"""Read raw records row by row, each with where it sits in its source file.

``load_records`` hands a whole source to ``datasets``' parsers: fast, but one broken line
fails the file and a row's position in the file is lost. ``read_rows`` parses the files
itself so that every record keeps its place (``SourceRow``: the file as users know it, and the
line of a JSON Lines file, the line a CSV record starts on, or the index in a JSON array /
Parquet file / hub split) and a broken line becomes one unparseable row instead of a failed load.
``csv_records`` is the one CSV reader: ``load_records`` checks CSV files with it too. The cleaning step
(``rlhf_core.data.cleaning``) decides what happens to unparseable rows.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rlhf_core.data.loading import DataLoadError, _load_hub, data_suffix, local_files

SOURCE_COLUMNS: tuple[str, ...] = ("source_file", "source_row", "source_unit")
"""Columns the prepared splits carry so that every report can name a row's place in its source."""

LINE = "line"  # JSON Lines, CSV: 1-based line number (where the record starts), as editors show it
INDEX = "index"  # JSON array element, Parquet row, hub split row: 0-based position
_MAX_CSV_CELL = 2**31 - 1
"""Python's csv refuses cells over 128 KiB by default; pandas (``load_records``) has no such limit, and long replies are real."""


@dataclass(frozen=True)
class SourceRow:
    """Where one record came from: ``file`` (the name users know), ``row`` and its ``unit`` (``line``/``index``)."""

    file: str
    row: int
    unit: str

    def __str__(self) -> str:
        return describe_source(self.file, self.row, self.unit)

    def columns(self) -> dict[str, Any]:
        return dict(zip(SOURCE_COLUMNS, (self.file, self.row, self.unit)))


def describe_source(file: Any, row: Any, unit: Any = None) -> str:
    """``"data/hh.jsonl.gz line 87"`` / ``"alpaca.json index 12"`` (tolerates the floats pandas makes of ints)."""
    if isinstance(row, float) and row.is_integer():
        row = int(row)
    return f"{file} {unit or 'row'} {row}"


@dataclass(frozen=True)
class RawRow:
    """A record as read (``problem`` is None), or a row that could not be parsed (``record`` is its text)."""

    where: SourceRow
    record: Any
    problem: str | None = None


@dataclass
class RawRows:
    """Every row of a source in file order; ``label`` names the whole source."""

    label: str
    rows: list[RawRow] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        """Keys of the parsed records, in order of first appearance."""
        seen: dict[str, None] = {}
        for row in self.rows:
            if row.problem is None:
                seen.update(dict.fromkeys(row.record))
        return list(seen)


def read_rows(
    source: str | Path, *, source_name: str | None = None, split: str = "train", storage_options: dict[str, Any] | None = None
) -> RawRows:
    """Every row of ``source`` (any source ``load_records`` accepts) with its place in its file.

    A JSON Lines line that is not valid JSON, not UTF-8 or not an object, a JSON array element
    that is not an object, and a CSV record with more cells than its header are returned as rows
    with a ``problem``; a short CSV record has ``None`` for its missing cells (the format then
    reports the missing field). A file that cannot be split into rows at all (a malformed JSON
    array, an unreadable Parquet file, a CSV file that is not UTF-8 or whose header or quoting is
    broken) raises.

    Raises:
        DataLoadError: as ``load_records``; also when the source holds no rows at all.
    """
    label = source_name or str(source)
    out = RawRows(label)
    with local_files(source, storage_options=storage_options, source_name=source_name, utf8=False) as files:
        if files is None:
            ds = _load_hub(str(source), split)
            out.rows = [RawRow(SourceRow(label, i, INDEX), record) for i, record in enumerate(ds)]
        for path, shown in files or []:
            reader = _READERS.get(data_suffix(path.name) or "", _json_rows)
            out.rows.extend(reader(path, shown))
    if not out.rows:
        raise DataLoadError(f"{label}: no records")
    return out


def _csv_rows(path: Path, shown: str) -> list[RawRow]:
    return [RawRow(SourceRow(shown, line, LINE), record, problem) for line, record, problem in csv_records(path, shown)]


def csv_records(path: Path, shown: str) -> Iterator[tuple[int, Any, str | None]]:
    """``(line, record, problem)`` for each record of a CSV file after its header line.

    ``line`` is the 1-based physical line the record starts on (a quoted cell may span lines).
    ``record`` maps the header's names to the cells, all strings, ``None`` for the cells a short
    record lacks; a record with more cells than the header is its text, with a ``problem``.
    Blank lines are skipped, a UTF-8 byte-order mark is dropped.

    Raises:
        DataLoadError: the file is not UTF-8 text, the header has a blank or repeated name, a quoted
            cell is never closed, or ``csv`` cannot split the text.
    """
    if csv.field_size_limit() < _MAX_CSV_CELL:
        csv.field_size_limit(_MAX_CSV_CELL)
    taken: list[str] = []  # the physical lines of the record being read

    def lines(handle: IO[str]) -> Iterator[str]:
        for text in handle:
            taken.append(text)
            yield text

    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:  # newline="": csv finds the line ends
        reader = csv.reader(lines(handle))
        header: list[str] | None = None
        last_start, last_text = 0, ""
        try:
            while True:
                taken.clear()
                start = reader.line_num + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                text = "".join(taken)
                if not text.strip():
                    continue
                last_start, last_text = start, text
                if header is None:
                    header = _csv_header(cells, shown, start)
                elif len(cells) > len(header):
                    yield start, text.rstrip("\r\n"), field_count_problem(len(cells), len(header))
                else:
                    yield start, {**dict.fromkeys(header), **dict(zip(header, cells))}, None
        except UnicodeDecodeError as err:
            raise DataLoadError(f"{shown}: not UTF-8 text: {err}") from err
        except csv.Error as err:
            raise DataLoadError(f"{shown}: cannot read as CSV at line {reader.line_num}: {err}") from err
    if _ends_inside_quotes(last_text):
        raise DataLoadError(
            f"{shown}: the record on line {last_start} opens a quoted cell that is never closed (the file ends inside it)"
        )


def field_count_problem(fields: int, header: int) -> str:
    """How a CSV record's cell count differs from its header's (the words rows and load errors share)."""
    return f"has {fields} field{'s' * (fields != 1)}, the header has {header}"


def _csv_header(cells: list[str], shown: str, line: int) -> list[str]:
    unnamed = [i + 1 for i, name in enumerate(cells) if not name.strip()]
    if unnamed:
        raise DataLoadError(
            f"{shown}: the header (line {line}) leaves column(s) {unnamed} unnamed; name every column or remove it "
            "(an unnamed first column is often an exported index)"
        )
    repeated = sorted({name for name in cells if cells.count(name) > 1})
    if repeated:
        raise DataLoadError(f"{shown}: the header (line {line}) repeats column name(s) {repeated}")
    return cells


def _ends_inside_quotes(text: str) -> bool:
    """Whether ``text`` (a file's last record) leaves a quoted cell open.

    The lenient reader takes the rest of the file into such a cell without a word; the strict one
    says "unexpected end of data".
    """
    try:
        for _ in csv.reader(io.StringIO(text, newline=""), strict=True):
            pass
    except csv.Error as err:
        return "unexpected end of data" in str(err)
    return False


def _parquet_rows(path: Path, shown: str) -> list[RawRow]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataLoadError(f"{shown}: cannot read as Parquet: {type(err).__name__}: {err}") from err
    return [RawRow(SourceRow(shown, i, INDEX), record) for i, record in enumerate(records)]


def _json_rows(path: Path, shown: str) -> list[RawRow]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        head = handle.read(4096)
        if head.lstrip().lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"["):
            return _json_array_rows(head + handle.read(), shown)
        rows = []
        # Lines are split on b"\n" only: str.splitlines would also split inside strings at U+2028 etc.
        for lineno, raw in enumerate(_lines(head, handle), start=1):
            line = raw.strip()
            if lineno == 1:
                line = line.lstrip(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            if line:
                rows.append(_json_line(line, SourceRow(shown, lineno, LINE)))
    if len(rows) > 1 and all(row.problem for row in rows):
        _refuse_one_object(path, opener, shown)
    return rows


def _refuse_one_object(path: Path, opener: Any, shown: str) -> None:
    """No line parses on its own: when the whole file is one JSON object written over several lines, say so (its
    lines would otherwise each be reported as malformed JSON)."""
    try:
        with opener(path, "rb") as handle:
            whole = json.loads(handle.read().decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError):
        return  # not one JSON document either: the lines' own problems say what is wrong
    if isinstance(whole, dict):
        lists = [key for key, value in whole.items() if isinstance(value, list)]
        hint = f"; it holds a list under {lists}: write that list out, e.g. `jq '.{lists[0]}' FILE`" if lists else ""
        raise DataLoadError(f"{shown}: one JSON object over several lines (keys {list(whole)[:10]}), not JSON Lines (one "
                            f"object per line) or a JSON array of objects{hint}")


def _lines(head: bytes, handle: Any):
    """The lines of a binary file whose first bytes were already read into ``head``."""
    pending = head
    for chunk in handle:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from complete
    yield from pending.split(b"\n")


def _json_line(line: bytes, where: SourceRow) -> RawRow:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return RawRow(where, line.decode("utf-8", errors="replace"), f"not UTF-8 text: {err.reason} at byte {err.start}")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return RawRow(where, text, f"malformed JSON at column {err.colno}: {err.msg}")
    if not isinstance(record, dict):
        return RawRow(where, text, f"not a JSON object (a JSON {type(record).__name__})")
    return RawRow(where, record)


def _json_array_rows(data: bytes, shown: str) -> list[RawRow]:
    try:
        records = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataLoadError(f"{shown}: not UTF-8 text: {err}") from err
    except json.JSONDecodeError as err:
        raise DataLoadError(f"{shown}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    rows = []
    for i, record in enumerate(records):
        where = SourceRow(shown, i, INDEX)
        if isinstance(record, dict):
            rows.append(RawRow(where, record))
        else:
            rows.append(RawRow(where, record, f"element {i} of the JSON array is not an object"))
    return rows


_READERS = {".parquet": _parquet_rows, ".csv": _csv_rows, ".csv.gz": _csv_rows}  # by suffix; else JSON
