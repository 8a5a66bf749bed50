"""Stage ``ingest``: snapshot the configured data sources into ``data/sources/`` (DVC-tracked).

``dvc.yaml`` marks this stage ``always_changed`` (a source can change under the same path or
URI, which DVC cannot see) and its output ``persist`` (DVC leaves the previous snapshot in
place). Each run lists every source's files with a cheap identity (size + mtime, S3 ETag /
VersionId, hub revision) and compares it with the identity recorded when that content was last
fetched (``.rlhf/ingest-state.json``, see ``tasks.workspace.state_dir``):

- unchanged, and the snapshot already holds it: nothing is read or written;
- unchanged, but this checkout's snapshot is older (an isolated run from a git ref): the
  content is copied from the DVC cache by its md5, not downloaded;
- changed or unknown: the file is downloaded, hashed and swapped in.

The snapshot's content therefore changes exactly when a source's content changes, so DVC's
own hashes decide what re-runs downstream: an unchanged source re-runs nothing after
``ingest``, and ``dvc.lock`` pins the data a run used (``rlhf reproduce`` pulls it back from
the DVC remote, even after the source changed or disappeared).

Writes ``data/sources/<role>/<file>`` (roles: ``sft``, ``preference``, ``prompt``),
``data/sources/manifest.json`` (URIs, file digests, rows: deterministic, so identical content
gives an identical snapshot) and ``metrics/ingest.json`` (the identity of each source,
including ETag/VersionId, and whether it was downloaded).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from tasks.sources import (
    SourceFile,
    configured_sources,
    count_rows,
    fetch,
    list_source,
    snapshot_path,
    source_tags,
)
from tasks.workspace import Workspace, file_md5, state_dir, write_json

STAGE = "ingest"
STATE_FILE = "ingest-state.json"


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}  # a damaged state file only costs a download


def _dvc_cache_object(root: Path, md5: str) -> Path | None:
    """The DVC cache's copy of content ``md5``, if the cache has it (DVC's own layout, asked of DVC)."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            path = Path(repo.cache.local.oid_to_path(md5))
    except Exception:
        return None
    return path if path.is_file() else None


def _remove_except(folder: Path, keep: set[str]) -> None:
    for entry in folder.iterdir():
        if entry.name not in keep:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _ingest_file(ws: Workspace, source: SourceFile, dest: Path, known: dict[str, Any] | None,
                 previous_md5: str | None) -> tuple[str, str]:
    """Make ``dest`` hold the source file's current content; return (md5, action)."""
    unchanged = known is not None and known.get("identity") == source.identity and known.get("md5")
    if unchanged and previous_md5 == known["md5"] and dest.is_file():
        return known["md5"], "unchanged"
    if unchanged:
        cached = _dvc_cache_object(ws.root, known["md5"])
        if cached is not None:
            tmp = dest.with_name(dest.name + ".part")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cached, tmp)
            tmp.replace(dest)
            return known["md5"], "copied from the DVC cache"
    fetch(source, dest)
    return file_md5(dest), "downloaded"


def ingest_source(ws: Workspace, role: str, uri: str, state: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """Bring ``data/sources/<role>/`` up to date with ``uri``; return its manifest entry and identity."""
    files = list_source(uri)
    folder = snapshot_path(ws, role)
    same_uri = previous.get("uri") == uri
    previous_md5 = {f["name"]: f["md5"] for f in previous.get("files", [])} if same_uri else {}
    entries, identities, actions = [], [], []
    for source in files:
        md5, action = _ingest_file(ws, source, folder / source.name, state.get(source.uri), previous_md5.get(source.name))
        state[source.uri] = {"identity": source.identity, "md5": md5}
        entries.append({"name": source.name, "md5": md5, "size": (folder / source.name).stat().st_size})
        identities.append({"uri": source.uri, "md5": md5, **source.version})
        actions.append(action)
        print(f"[ingest] {role}: {source.uri} {action}", flush=True)
    _remove_except(folder, {e["name"] for e in entries})  # files that left the source leave the snapshot
    # Rows are counted only when the snapshot's files (names and digests) differ from the last manifest's.
    changed = entries != previous.get("files") or "rows" not in previous
    rows = sum(count_rows(folder / e["name"]) or 0 for e in entries) if changed else previous["rows"]
    manifest = {"uri": uri, "files": entries, "rows": rows}
    identity = {
        "uri": uri, "rows": rows, "bytes": sum(e["size"] for e in entries), "files": identities,
        "digest": file_digest(entries),
        "action": "downloaded" if "downloaded" in actions else ("unchanged" if set(actions) == {"unchanged"} else "restored"),
    }
    if len(identities) == 1:  # a single object: its ETag/VersionId at the top, where people look
        identity.update({k: v for k, v in identities[0].items() if k in ("etag", "version_id", "revision")})
    return {"manifest": manifest, "identity": identity}


def file_digest(entries: list[dict[str, Any]]) -> str:
    """One digest of a snapshot's files: md5 of its sorted ``name md5`` lines."""
    import hashlib

    listing = "".join(f"{e['name']} {e['md5']}\n" for e in sorted(entries, key=lambda e: e["name"]))
    return hashlib.md5(listing.encode()).hexdigest()


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    started = time.perf_counter()
    sources = configured_sources(params)
    state_file = state_dir(ws.root) / STATE_FILE
    state = _load_json(state_file).get("files", {})
    previous = _load_json(ws.sources / "manifest.json")
    ws.sources.mkdir(parents=True, exist_ok=True)
    _remove_except(ws.sources, {*sources, "manifest.json"})  # roles no longer configured
    manifest, metrics = {}, {}
    for role, uri in sources.items():
        result = ingest_source(ws, role, uri, state, previous.get(role, {}))
        manifest[role], metrics[role] = result["manifest"], result["identity"]
    write_json(ws.sources / "manifest.json", manifest)
    write_json(state_file, {"files": state})
    if not sources:
        print("[ingest] no data sources configured (the synthetic task is generated by prepare)", flush=True)
    write_json(ws.metrics(STAGE), {"sources": metrics, "seconds": round(time.perf_counter() - started, 3)})
    if tracker is not None:
        tracker.set_tags(source_tags(metrics))
    return {f"sources/{role}/{k}": v for role, m in metrics.items() for k, v in m.items() if k in ("rows", "bytes")}


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run, torch_threads=False)


if __name__ == "__main__":
    main()
