"""Configured data sources: what they are now (cheap identity), and a copy of their content.

A source is a local file or folder, an object-store URI (``s3://bucket/key`` or a prefix; any
other fsspec protocol), or a hub dataset name. :func:`list_source` states each file of a source
without reading its content: size plus modification time for local files, ETag and VersionId for
S3 objects, the revision for a hub dataset. ``tasks.ingest`` compares that identity with the one
recorded at the last download to decide whether the content must be fetched again.

S3 is reached through boto3 with the standard configuration chain (credentials and
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` from the environment, for MinIO or moto).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_core.data.loading import SUPPORTED_SUFFIXES, DataLoadError, data_suffix, looks_like_path
from rlhf_core.data.rows import csv_records
from tasks.workspace import Workspace

ROLES = {"sft": "sft_data", "preference": "preference_data", "prompt": "prompt_data"}
"""Snapshot role -> the ``prepare`` key that names its source."""
HUB_FILE = "data.parquet"  # a hub dataset's snapshot: its train split as one Parquet file


@dataclass
class SourceFile:
    """One file of a source, as it is at the source now."""

    uri: str
    """Where it lives, as users know it (absolute path or URI)."""
    name: str
    """Its file name in the snapshot folder."""
    size: int | None
    version: dict[str, Any] = field(default_factory=dict)
    """The cheap identity: ``mtime_ns`` (local), ``etag``/``version_id`` (S3), ``revision`` (hub)."""

    @property
    def identity(self) -> dict[str, Any]:
        return {"size": self.size, **self.version}


def kind_of(uri: str) -> str:
    """``local``, ``s3``, ``fsspec`` (another URI protocol) or ``hub``."""
    if uri.startswith("s3://"):
        return "s3"
    if "://" in uri:
        return "fsspec"
    return "local" if Path(uri).expanduser().exists() or looks_like_path(uri) else "hub"


def list_source(uri: str) -> list[SourceFile]:
    """The files a source names now (no content is read). Raises ``DataLoadError`` when it cannot be reached."""
    kind = kind_of(uri)
    if kind == "local":
        return _list_local(uri)
    if kind == "s3":
        return _list_s3(uri)
    if kind == "fsspec":
        return _list_fsspec(uri)
    return [_hub_file(uri)]


def fetch(source: SourceFile, dest: Path) -> None:
    """Copy one source file's content to ``dest`` (a temporary name is written, then renamed)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    kind = kind_of(source.uri)
    try:
        if kind == "local":
            shutil.copyfile(source.uri, tmp)
        elif kind == "s3":
            bucket, key = _split_s3(source.uri)
            extra = {"VersionId": source.version["version_id"]} if source.version.get("version_id") else None
            _s3_client().download_file(bucket, key, str(tmp), ExtraArgs=extra)
        elif kind == "fsspec":
            import fsspec

            fs, path = fsspec.core.url_to_fs(source.uri)
            fs.get(path, str(tmp))
        else:
            _fetch_hub(source.uri, tmp)
    except DataLoadError:
        raise
    except Exception as err:
        tmp.unlink(missing_ok=True)
        raise DataLoadError(f"{source.uri}: cannot download: {type(err).__name__}: {err}") from err
    tmp.replace(dest)


def count_rows(path: Path) -> int | None:
    """Records in a data file without parsing every row (``None`` when the file is not readable as data).

    JSON Lines: non-blank lines (a broken line still counts: ``prepare`` reports it); a JSON
    array: its length; CSV: its records after the header (a quoted cell may span lines; a broken
    record counts too); Parquet: the row count in its footer.
    """
    import gzip

    name = path.name.lower()
    try:
        if data_suffix(name) in (".csv", ".csv.gz"):
            return sum(1 for _ in csv_records(path, str(path)))
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            head = handle.read(4096)
            if head.lstrip().startswith("["):
                rows = json.loads(head + handle.read())
                return len(rows) if isinstance(rows, list) else None
            return sum(1 for line in (head + handle.read()).splitlines() if line.strip())
    except (OSError, UnicodeDecodeError, ValueError):  # DataLoadError is a ValueError
        return None


# --------------------------------------------------------------------------- local files and folders


def _list_local(uri: str) -> list[SourceFile]:
    path = Path(uri).expanduser().resolve()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and data_suffix(p.name))
        if not files:
            raise DataLoadError(f"{uri}: no supported data files in this folder (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    else:
        raise DataLoadError(f"{uri}: no such file or folder")
    out = []
    for f in files:
        stat = f.stat()
        out.append(SourceFile(uri=str(f), name=f.name, size=stat.st_size, version={"mtime_ns": stat.st_mtime_ns}))
    return out


# --------------------------------------------------------------------------- S3 through boto3


def _s3_client():
    import boto3
    from botocore.config import Config

    # Bounded: an unreachable endpoint fails the stage in seconds, not after minutes of retries.
    return boto3.client("s3", config=Config(connect_timeout=10, read_timeout=60, retries={"max_attempts": 3}))


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise DataLoadError(f"{uri}: no bucket in this S3 URI")
    return bucket, key


def _s3_file(bucket: str, key: str, head: dict[str, Any]) -> SourceFile:
    version = {"etag": str(head.get("ETag", "")).strip('"')}
    if head.get("VersionId") and head["VersionId"] != "null":  # "null": a bucket without versioning
        version["version_id"] = head["VersionId"]
    return SourceFile(uri=f"s3://{bucket}/{key}", name=key.rsplit("/", 1)[-1], size=head.get("ContentLength", head.get("Size")),
                      version=version)


def _list_s3(uri: str) -> list[SourceFile]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = _split_s3(uri)
    client = _s3_client()
    try:
        if key and data_suffix(key):
            try:
                return [_s3_file(bucket, key, client.head_object(Bucket=bucket, Key=key))]
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    raise DataLoadError(f"{uri}: no such object") from err
                raise
        prefix = key.rstrip("/") + "/" if key else ""
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/").get("Contents", [])
        objects = sorted((o for o in listed if data_suffix(o["Key"])), key=lambda o: o["Key"])
        if not objects:
            raise DataLoadError(f"{uri}: no supported data files under this prefix (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        # A listing carries ETags but not version ids: ask each object (one HEAD per file, still no download).
        return [_s3_file(bucket, o["Key"], client.head_object(Bucket=bucket, Key=o["Key"])) for o in objects]
    except (BotoCoreError, ClientError) as err:
        raise DataLoadError(f"{uri}: cannot reach the object store: {type(err).__name__}: {err}") from err


# --------------------------------------------------------------------------- other URIs and hub datasets


def _list_fsspec(uri: str) -> list[SourceFile]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
        paths = [path] if data_suffix(path) else sorted(p for p in fs.ls(path, detail=False) if data_suffix(p))
        infos = [fs.info(p) for p in paths]
    except (ImportError, ValueError, OSError) as err:
        raise DataLoadError(f"{uri}: cannot list or read: {err}") from err
    if not infos:
        raise DataLoadError(f"{uri}: no supported data files (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    out = []
    for p, info in zip(paths, infos):
        version = {k: str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "checksum") if info.get(k) is not None}
        out.append(SourceFile(uri=fs.unstrip_protocol(p), name=Path(p).name, size=info.get("size"), version=version))
    return out


def _hub_file(name: str) -> SourceFile:
    try:
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(name).sha
    except Exception as err:
        raise DataLoadError(
            f"{name!r} is not a local file or folder, and the hub does not answer for it as a dataset "
            f"({type(err).__name__}: {err}); no hub is reachable offline: use a local file or an s3:// URI"
        ) from err
    return SourceFile(uri=f"hub://{name}", name=HUB_FILE, size=None, version={"revision": revision})


def _fetch_hub(uri: str, dest: Path) -> None:
    from rlhf_core.data.loading import load_records

    load_records(uri[len("hub://"):]).to_parquet(str(dest))


def configured_sources(params: dict[str, Any]) -> dict[str, str]:
    """{role: source} for every source ``params.yaml``'s ``prepare`` group names (nulls left out)."""
    prepare = params.get("prepare") or {}
    return {role: str(prepare[key]) for role, key in ROLES.items() if prepare.get(key) not in (None, "")}


def snapshot_path(ws: Workspace, role: str) -> Path:
    """The folder ``prepare`` reads for ``role`` (its files have the source's own names)."""
    return ws.sources / role


def ingested_snapshots(params: dict[str, Any], ws: Workspace) -> dict[str, Path]:
    """{role: snapshot folder} for each configured source that ``ingest`` has snapshotted as configured now."""
    manifest_file = ws.sources / "manifest.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    return {
        role: snapshot_path(ws, role) for role, uri in configured_sources(params).items()
        if (manifest.get(role) or {}).get("uri") == uri and snapshot_path(ws, role).is_dir()
    }


def source_tags(sources: dict[str, Any]) -> dict[str, str]:
    """Tags naming each source's identity: ``source.<role>.{uri,digest,etag,version_id,revision}``."""
    return {
        f"source.{role}.{key}": str(identity[key])
        for role, identity in sources.items() for key in ("uri", "digest", "etag", "version_id", "revision", "action")
        if identity.get(key) is not None
    }
