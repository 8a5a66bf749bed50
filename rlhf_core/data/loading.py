"""Load raw records from a local file or folder, an object store URI, or a hub dataset.

Every source becomes one ``datasets.Dataset`` of raw rows (no format logic here; see
``rlhf_core.data.formats`` for that). Parsing goes through ``datasets``' packaged
``json``/``parquet``/``csv`` builders; when a builder fails, the file is re-read by hand only to
say *where* it is broken. CSV files are read by hand first (``rows.csv_records``) to check every
record against its header, since pandas, under the ``csv`` builder, would quietly shift or fill
cells. Objects behind a URI (``s3://``, any fsspec protocol) are first copied to a temporary
folder with fsspec: ``datasets`` refuses every remote URL in offline mode
(``HF_DATASETS_OFFLINE``), which is how machines without hub access run, yet an object store
may well be reachable there.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where records are read: listing and checking sources (tasks.preflight) needs no datasets
    import datasets

SUPPORTED_SUFFIXES: tuple[str, ...] = (".jsonl.gz", ".json.gz", ".csv.gz", ".jsonl", ".json", ".csv", ".parquet")
"""File endings ``load_records`` reads (compound ones first, so ``.jsonl.gz`` wins over ``.gz``)."""

_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv"}  # datasets' packaged builder per suffix; else json
_KIND_NAMES = {"json": "JSON", "parquet": "Parquet", "csv": "CSV"}

_PATH_HINT_SUFFIXES = (".gz", ".tsv", ".txt", ".arrow", ".zip", ".bz2", ".xz", ".zst", ".yaml", ".yml")
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")
"""The form of a hub dataset's name: ``name`` or ``org/name``, no trailing slash, no deeper folders."""


class DataLoadError(ValueError):
    """A data source could not be read; the message names the source and the reason."""


def load_records(
    source: str | Path,
    *,
    split: str = "train",
    storage_options: dict[str, Any] | None = None,
    source_name: str | None = None,
) -> datasets.Dataset:
    """Read every record of ``source`` into one ``datasets.Dataset``.

    Args:
        source: a local ``.json`` (JSON array or JSON lines), ``.jsonl``, ``.jsonl.gz``,
            ``.json.gz``, ``.csv``, ``.csv.gz`` (a header line, then one record per line; every
            cell is read as text, an empty cell as ``""``) or ``.parquet`` file; a local folder
            (its supported files, sorted, not recursive, all of one kind); a URI such as
            ``s3://bucket/key.jsonl`` or ``s3://bucket/prefix/`` (fsspec; credentials and endpoint
            come from ``storage_options`` or the environment); or else a hub dataset name
            (``datasets.load_dataset(name, split=split)``).
        split: the split of a hub dataset. Files and folders are read whole.
        storage_options: fsspec options for URIs (for s3fs e.g. ``{"client_kwargs": {"endpoint_url": ...}}``).
        source_name: the name errors show instead of ``source`` (see ``local_files``), e.g. the
            URI a local snapshot was copied from.

    Raises:
        DataLoadError: missing file, unsupported extension, malformed JSON (with the line), a CSV
            record with more or fewer cells than the header (with its line), a CSV header with a blank
            or repeated name, empty file, or a hub dataset that cannot be loaded.
    """
    with local_files(source, storage_options=storage_options, source_name=source_name) as files:
        if files is None:
            return _load_hub(str(source), split)
        shown = {str(path): name for path, name in files}
        return _load_files(list(shown), label=source_name or str(source), shown=shown)


@contextmanager
def local_files(
    source: str | Path, *, storage_options: dict[str, Any] | None = None, source_name: str | None = None, utf8: bool = True
) -> Iterator[list[tuple[Path, str]] | None]:
    """The data files ``source`` names, as (local path, name shown to users); ``None`` for a hub name.

    Objects behind a URI are copied to a temporary folder that lives as long as the context.
    Shown names are the paths or object URIs themselves; with ``source_name`` they are
    ``source_name`` for a single file (or a folder holding one file, when ``source_name`` names
    a data file: a snapshot of that file), else ``source_name/<file name>``. Each file is checked
    (supported type, not empty, UTF-8 text unless ``utf8=False``).
    """
    text = str(source)
    if "://" in text:
        fs, objects = _remote_objects(text, storage_options or {})
        with tempfile.TemporaryDirectory(prefix="rlhf-data-") as tmp:
            files = []
            for i, obj in enumerate(objects):
                local = Path(tmp) / f"{i:05d}-{Path(obj).name}"  # index prefix keeps the listing order
                try:
                    fs.get(obj, str(local))
                except OSError as err:
                    raise DataLoadError(f"{fs.unstrip_protocol(obj)}: cannot download: {err}") from err
                files.append((local, Path(obj).name, fs.unstrip_protocol(obj)))
            yield _checked(files, source_name, utf8, single=data_suffix(text) is not None)
        return
    path = Path(text).expanduser()
    if path.is_dir():
        files = [(Path(f), Path(f).name, f) for f in _folder_files(path, source_name or str(path))]
        yield _checked(files, source_name, utf8, single=False)
    elif path.is_file():
        yield _checked([(path, path.name, str(path))], source_name, utf8, single=True)
    elif looks_like_path(text):
        raise DataLoadError(f"{source_name or text}: no such file or folder")
    else:
        yield None


def _checked(files: list[tuple[Path, str, str]], source_name: str | None, utf8: bool, *, single: bool) -> list[tuple[Path, str]]:
    """(local path, shown name) for (local path, file name, default shown name), each file checked."""
    out = []
    for path, name, default in files:
        if source_name is None:
            shown = default
        elif single or (len(files) == 1 and data_suffix(source_name)):
            shown = source_name
        else:
            shown = f"{source_name.rstrip('/')}/{name}"
        _check_local_file(path, shown, utf8=utf8)
        out.append((path, shown))
    return out


def data_suffix(name: str) -> str | None:
    lowered = name.lower()
    return next((s for s in SUPPORTED_SUFFIXES if lowered.endswith(s)), None)


def _builder(suffix: str) -> str:
    return _BUILDERS.get(suffix, "json")


def looks_like_path(text: str) -> bool:
    """True for strings a user meant as a local path (so a typo is not sent to the hub).

    A hub dataset is named ``name`` or ``org/name``; any other form is a path, e.g. one that is
    absolute, starts with ``./``, ``../`` or ``~``, ends in a separator (``prefs/``), is more than
    one folder deep (``data/prefs/train``), holds a backslash, or ends in a data file's suffix. A
    source that exists is read as a path before this is asked (relative to the folder the stages
    run in, by :func:`local_files`, ``tasks.sources.kind_of`` and ``tasks.preflight.source_as_staged``).
    """
    if text.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(text):
        return True
    if text in (".", "..") or not _HUB_NAME.fullmatch(text):
        return True
    return data_suffix(text) is not None or text.lower().endswith(_PATH_HINT_SUFFIXES)


def _unsupported(name: str) -> DataLoadError:
    return DataLoadError(f"{name}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")


def _folder_files(folder: Path, shown: str) -> list[str]:
    entries = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in entries if data_suffix(p.name)]
    if not files:
        found = ", ".join(p.name for p in entries) or "nothing"
        raise DataLoadError(
            f"{shown}: no supported data files in this folder (supported: {', '.join(SUPPORTED_SUFFIXES)}; found: {found})"
        )
    return [str(p) for p in files]


def _remote_objects(uri: str, storage_options: dict[str, Any]) -> tuple[Any, list[str]]:
    """(fsspec filesystem, the data objects a URI names: the object itself, or the supported ones under a prefix)."""
    import fsspec  # a dependency of datasets; a protocol's own package (s3fs for s3) is imported by fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        if data_suffix(uri):
            if not fs.exists(path):
                raise DataLoadError(f"{uri}: no such object")
            return fs, [path]
        if not fs.isdir(path):
            raise DataLoadError(
                f"{uri}: no such object or prefix, or an unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
        objects = sorted(p for p in fs.ls(path, detail=False) if data_suffix(p))
    except DataLoadError:
        raise
    except (ImportError, ValueError) as err:  # unknown protocol, or its package is missing
        raise DataLoadError(f"{uri}: cannot open this URI: {err}") from err
    except OSError as err:  # permissions, unreachable endpoint, bad credentials
        raise DataLoadError(f"{uri}: cannot list or read: {err}") from err
    if not objects:
        raise DataLoadError(f"{uri}: no supported data files under this prefix (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    return fs, objects


def _open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") else open(path, encoding="utf-8")


def _check_local_file(path: Path, shown: str | None = None, *, utf8: bool = True) -> None:
    """Reject unsupported and empty files before ``datasets`` turns them into opaque errors.

    ``utf8=False``: text that is not UTF-8 is left to the caller (``read_rows`` reports it per line).
    """
    shown = shown or str(path)
    if data_suffix(path.name) is None:
        raise _unsupported(shown)
    if path.stat().st_size == 0:
        raise DataLoadError(f"{shown}: empty file")
    if path.suffix.lower() != ".parquet":
        try:
            with _open_text(path) as handle:
                blank = not handle.read(4096).strip() and not handle.read(1 << 20).strip()
        except UnicodeDecodeError as err:
            if utf8:
                raise DataLoadError(f"{shown}: cannot read as UTF-8 text: {err}") from err
            blank = False
        except OSError as err:
            raise DataLoadError(f"{shown}: cannot read as UTF-8 text: {err}") from err
        if blank:
            raise DataLoadError(f"{shown}: empty file (only whitespace)")


def _load_files(files: list[str], *, label: str, shown: dict[str, str] | None = None) -> datasets.Dataset:
    """Local files -> one dataset; ``shown`` maps a temporary copy to the name users know."""
    import datasets

    builders = {_builder(data_suffix(f) or "") for f in files}
    if len(builders) > 1:
        *others, last = sorted(_KIND_NAMES[b] for b in builders)
        raise DataLoadError(f"{label}: mixes {', '.join(others)} and {last} files; keep one kind per folder")
    builder = builders.pop()
    options = _csv_options(files, label, shown or {}) if builder == "csv" else {}
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **options)
    except Exception as err:  # datasets wraps parser errors in many types; re-raise with a location
        raise _explain_failure(files, label, err, shown or {}) from err
    if len(ds) == 0:
        raise DataLoadError(f"{label}: no records")
    return ds


def _csv_options(files: list[str], label: str, shown: dict[str, str]) -> dict[str, Any]:
    """The ``csv`` builder's options that read every cell as text, once each file is checked by hand.

    pandas would turn numbers-looking cells into numbers and empty ones into NaN, treat a first
    record with one cell too many as an index, and fill a short record's missing cells; so every
    record must match its header, and all files share one set of columns.
    """
    import datasets

    from rlhf_core.data.rows import csv_records, field_count_problem  # rows builds on this module

    columns: dict[str, str] = {}  # column -> the file it was first seen in
    records = 0
    for name in files:
        where = shown.get(name, name)
        header: list[str] | None = None
        for line, record, problem in csv_records(Path(name), where):
            if problem is None and None in record.values():
                problem = field_count_problem(sum(v is not None for v in record.values()), len(record))
            if problem is not None:
                raise DataLoadError(f"{where}: line {line} {problem}")
            header = header or list(record)
            records += 1
        if header is None:
            continue  # a header-only file adds no record
        if columns and set(header) != set(columns):
            first = next(iter(columns.values()))
            raise DataLoadError(f"{label}: CSV files with different columns: {first} has {list(columns)}, {where} has {header}")
        columns = columns or dict.fromkeys(header, where)
    if not records:
        raise DataLoadError(f"{label}: no records")
    return {"features": datasets.Features({c: datasets.Value("string") for c in columns}), "na_filter": False}


def _explain_failure(files: list[str], label: str, err: Exception, shown: dict[str, str]) -> DataLoadError:
    """Find the broken file and line (JSON files); else pass on the library's reason."""
    for name in files:
        if _builder(data_suffix(name) or "") == "json":
            problem = _json_problem(Path(name))
            if problem:
                return DataLoadError(f"{shown.get(name, name)}: {problem}")
    cause = err.__cause__ or err
    return DataLoadError(f"{label}: cannot load records: {type(cause).__name__}: {cause}")


def _json_problem(path: Path) -> str | None:
    """Where a JSON / JSON-lines file breaks the format, or None if it parses."""
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except UnicodeDecodeError as err:
        return f"not UTF-8 text: {err}"
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            return f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        if not records:
            return "no records (an empty JSON array)"
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        return None if bad is None else f"element {bad} of the JSON array is not an object"
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            return f"malformed JSON at line {lineno}, column {err.colno}: {err.msg}"
        if not isinstance(record, dict):
            return f"line {lineno} is not a JSON object"
    return None


def _load_hub(name: str, split: str) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, missing, gated: all mean "cannot load this name"
        raise DataLoadError(
            f"{name!r} is not a local file or folder, and loading it as a hub dataset (split {split!r}) failed: "
            f"{type(err).__name__}: {err}"
        ) from err
