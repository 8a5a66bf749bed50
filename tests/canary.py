"""Canary secrets (issue 14 item 7): unique values for the credentials a run sees, and a search of every byte
of every store for them after the run.

:data:`CANARY_ENV` gives each secret environment variable (AWS keys, MLflow and Hugging Face tokens) a
value unique to this test process. :func:`search` reads every file under the given folders, raw and as
their stores keep it: gzip and zip files decompressed (torch checkpoints are zip files), zlib streams
(git's loose objects), SQLite databases (their raw pages and every value of every table, since a value
longer than a page is split over overflow pages), Parquet files (their pages are compressed: every row and
the metadata), and a git repository's objects through ``git cat-file`` (packs are compressed). Each secret
is looked for as it is and base64-encoded (at the three byte alignments, standard and URL-safe alphabets),
the way a serialised blob would carry it; runs of base64 text broken into lines (Prefect keeps pickled task
results and exceptions so, under its local storage path) are also decoded and searched. A hit names the
file, the layer it was found in and the offset.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import sqlite3
import subprocess
import uuid
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
                    "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_TOKEN = uuid.uuid4().hex  # one per test process: a hit cannot come from an earlier run's leftovers
CANARY_ENV = {name: f"canary-{name.lower().replace('_', '-')}-{_TOKEN}" for name in SECRET_VARIABLES}
"""{variable: a value no store may hold}: set these in a run's environment, then :func:`search` its stores."""

SQLITE_MAGIC = b"SQLite format 3\x00"
CHUNK = 8 << 20
BASE64_RUN = re.compile(rb"(?:[A-Za-z0-9+/=_-]|\r|\n|\\n){64,}")
"""Base64 text of at least 48 bytes, possibly wrapped (real or JSON-escaped line breaks)."""
DECODE_LIMIT = 64 << 20


@dataclass(frozen=True)
class Hit:
    path: Path
    layer: str
    """``raw``, ``gzip``, ``zip:<member>``, ``zlib``, ``sqlite:<table>.<column> row <n>``, ``parquet``, ``git <oid>``."""
    offset: int
    """Byte offset of the match in that layer (in the file itself for ``raw``)."""
    secret: str
    """The variable whose value was found, with ``(base64)`` when it was found encoded."""

    def __str__(self) -> str:
        return f"{self.secret} in {self.path} [{self.layer}] at byte {self.offset}"


@dataclass
class Search:
    hits: list[Hit] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    """Every file read (so a test can check that the stores it meant were searched)."""
    bytes: int = 0


def needles(secrets: Mapping[str, str]) -> dict[bytes, str]:
    """{bytes to look for: secret name}: each value as it is, and the part of its base64 encodings that does not
    depend on the bytes around it (at each of the three alignments, standard and URL-safe alphabets)."""
    out: dict[bytes, str] = {}
    for name, value in secrets.items():
        raw = value.encode()
        out[raw] = name
        for shift in range(3):
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                encoded = encode(b"\0" * shift + raw)
                out[encoded[4 if shift else 0:-4]] = f"{name} (base64)"
    return out


def _find(data: bytes, wanted: Mapping[bytes, str], path: Path, layer: str, base: int = 0) -> list[Hit]:
    hits = []
    for needle, name in wanted.items():
        start = data.find(needle)
        while start != -1:
            hits.append(Hit(path, layer, base + start, name))
            start = data.find(needle, start + 1)
    return hits


def _raw(path: Path, wanted: Mapping[bytes, str], chunk: int) -> tuple[list[Hit], int]:
    """Every byte of ``path``, read in chunks that overlap by the longest needle (a match across a boundary counts)."""
    overlap = max(map(len, wanted)) - 1
    hits: list[Hit] = []
    seen: set[tuple[int, str]] = set()
    size, tail, offset = 0, b"", 0
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            size += len(block)
            data = tail + block
            for hit in _find(data, wanted, path, "raw", offset):
                if (hit.offset, hit.secret) not in seen:
                    seen.add((hit.offset, hit.secret))
                    hits.append(hit)
            tail = data[-overlap:] if overlap else b""
            offset += len(data) - len(tail)
    return hits, size


def _decoded(path: Path, head: bytes, wanted: Mapping[bytes, str]) -> list[Hit]:
    """Matches inside what ``path`` holds compressed or structured (by its first bytes, not its name)."""
    import gzip

    hits: list[Hit] = []
    if head.startswith(b"\x1f\x8b"):
        with contextlib.suppress(OSError, EOFError, zlib.error):
            hits += _find(gzip.decompress(path.read_bytes()), wanted, path, "gzip")
    elif head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    hits += _find(archive.read(member), wanted, path, f"zip:{member}")
        except (zipfile.BadZipFile, OSError, NotImplementedError):
            pass
    elif len(head) > 1 and head[0] == 0x78 and (head[0] * 256 + head[1]) % 31 == 0:  # a zlib header (git's loose objects)
        with contextlib.suppress(zlib.error):
            hits += _find(zlib.decompressobj().decompress(path.read_bytes()), wanted, path, "zlib")
    elif head.startswith(SQLITE_MAGIC):
        hits += _sqlite(path, wanted)
    elif head.startswith(b"PAR1"):
        hits += _parquet(path, wanted)
    if path.stat().st_size <= DECODE_LIMIT:
        hits += _base64_runs(path.read_bytes(), wanted, path)
    return hits


def _base64_runs(data: bytes, wanted: Mapping[bytes, str], path: Path) -> list[Hit]:
    """Matches inside each run of base64 text in ``data`` (line breaks dropped, either alphabet), decoded."""
    hits: list[Hit] = []
    for run in BASE64_RUN.finditer(data):
        text = run.group().replace(b"\\n", b"").replace(b"\n", b"").replace(b"\r", b"").rstrip(b"=")
        text = text.replace(b"-", b"+").replace(b"_", b"/")
        text = text[: len(text) - len(text) % 4]
        try:
            decoded = base64.b64decode(text)
        except ValueError:
            continue
        hits += _find(decoded, wanted, path, f"base64 text at byte {run.start()}")
    return hits


def _sqlite(path: Path, wanted: Mapping[bytes, str]) -> list[Hit]:
    """Every value of every table (WAL content included: the database is opened, read-only, as SQLite reads it)."""
    hits: list[Hit] = []
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as con:
            con.text_factory = bytes
            tables = [name.decode() for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for table in tables:
                cursor = con.execute(f'SELECT * FROM "{table}"')
                columns = [d[0] for d in cursor.description]
                for row_number, row in enumerate(cursor):
                    for column, value in zip(columns, row):
                        if isinstance(value, (bytes, str)):
                            data = value if isinstance(value, bytes) else value.encode()
                            hits += _find(data, wanted, path, f"sqlite:{table}.{column} row {row_number}")
    except sqlite3.DatabaseError:
        pass  # not a database after all (a copy of its header in a blob): its raw bytes were searched
    return hits


def _parquet(path: Path, wanted: Mapping[bytes, str]) -> list[Hit]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception:  # a file that merely starts with PAR1
        return []
    meta = json.dumps({k.decode(errors="replace"): v.decode(errors="replace")
                       for k, v in (table.schema.metadata or {}).items()}).encode()
    rows = json.dumps(table.to_pylist(), default=str, ensure_ascii=False).encode()
    return _find(meta, wanted, path, "parquet metadata") + _find(rows, wanted, path, "parquet rows")


def _git_objects(repo: Path, wanted: Mapping[bytes, str]) -> list[Hit]:
    """Every object of the git repository at ``repo``, decompressed (loose and packed)."""
    out = subprocess.run(["git", "-C", str(repo), "cat-file", "--batch-all-objects", "--batch"], capture_output=True,
                         check=True).stdout
    hits: list[Hit] = []
    position = 0
    while position < len(out):
        header_end = out.index(b"\n", position)
        oid, _, size = out[position:header_end].split(b" ")
        start = header_end + 1
        body = out[start:start + int(size)]
        hits += _find(body, wanted, repo / ".git", f"git {oid.decode()}")
        position = start + int(size) + 1
    return hits


def search(roots: Iterable[Path], secrets: Mapping[str, str], *, chunk: int = CHUNK) -> Search:
    """Every file under ``roots`` (folders or files; symlinks are not followed) searched for ``secrets``' values
    (:func:`needles`), raw and decoded; a git repository met on the way (a ``.git`` folder) also through its objects.
    A root that does not exist raises: a store the caller meant to search must be there."""
    wanted = needles(secrets)
    result = Search()
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"nothing to search at {root}")
        paths = [root] if root.is_file() else [Path(folder) / name for folder, _, names in os.walk(root) for name in names]
        for path in sorted(paths):
            if path.is_symlink() or not path.is_file():
                continue
            hits, size = _raw(path, wanted, chunk)
            with open(path, "rb") as handle:
                head = handle.read(len(SQLITE_MAGIC))
            result.hits += hits + _decoded(path, head, wanted)
            result.files.append(path)
            result.bytes += size
        if root.is_dir():
            for folder, dirs, _ in os.walk(root):
                if ".git" in dirs and (Path(folder) / ".git" / "objects").is_dir():
                    result.hits += _git_objects(Path(folder), wanted)
    return result
