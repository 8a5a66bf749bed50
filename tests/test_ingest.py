"""Stage ``ingest`` (tasks/ingest.py, tasks/sources.py): DVC-versioned snapshots of the data sources.

Three levels:

- unit: ``tasks.ingest.run`` on a plain folder with local file and folder sources;
- S3: object and prefix sources in a versioned bucket on a moto server on 127.0.0.1
  (ETag/VersionId identity, no download when unchanged, the listed version is what is fetched);
- DVC (slow): the real ``dvc`` CLI in a temporary git repo whose ``prepare.preference_data`` is
  an ``s3://`` object: an unchanged object re-runs nothing, an overwritten one re-runs
  ``prepare``, an older checkout of the snapshot is brought up to date from the DVC cache without a
  download, and ``dvc pull`` at the first commit restores the first content after the object was
  overwritten and after it was deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

import tasks.ingest as ingest
from rlhf_core.data.loading import DataLoadError
from tasks.tracking.dvc_hash import dvc_md5
from tasks.workspace import Workspace


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _pairs(n: int, tag: str = "a") -> str:
    return "".join(
        json.dumps({"prompt": f"q{tag}{i}", "chosen": f"good {tag} {i}", "rejected": f"bad {tag} {i}"}) + "\n"
        for i in range(n)
    )


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


class FetchCounter:
    """Wraps ``tasks.ingest.fetch`` (the name ingest calls) and records the URIs it downloads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        real = ingest.fetch

        def counting(source, dest):
            self.calls.append(source.uri)
            return real(source, dest)

        monkeypatch.setattr(ingest, "fetch", counting)


class Ingest:
    """``tasks.ingest.run`` on one workspace folder, with its state in a separate folder."""

    def __init__(self, root: Path) -> None:
        self.ws = Workspace(root)

    def run(self, **sources: str | None) -> dict[str, Any]:
        keys = {"preference": "preference_data", "sft": "sft_data", "prompt": "prompt_data"}
        params = {"prepare": {keys[role]: uri for role, uri in sources.items()}}
        return ingest.run(params, self.ws, tracker=None)

    @property
    def manifest_file(self) -> Path:
        return self.ws.sources / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_file.read_text())

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.ws.metrics("ingest").read_text())["sources"]

    def snapshot(self, role: str) -> Path:
        return self.ws.sources / role


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("RLHF_STATE_DIR", str(state))
    return state


@pytest.fixture
def stage(tmp_path, state_dir) -> Ingest:
    return Ingest(tmp_path / "ws")


# =========================================================================== local sources


def test_local_file_is_snapshotted_with_manifest_and_metrics(stage, tmp_path, state_dir):
    src = tmp_path / "in" / "prefs.jsonl"
    src.parent.mkdir()
    src.write_text(_pairs(7) + "\n")  # a trailing blank line is not a row
    out = stage.run(preference=str(src))

    copy = stage.snapshot("preference") / "prefs.jsonl"
    assert copy.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in stage.snapshot("preference").iterdir()) == ["prefs.jsonl"]
    md5 = _md5(src)
    assert stage.manifest() == {
        "preference": {"uri": str(src), "rows": 7, "files": [{"name": "prefs.jsonl", "md5": md5, "size": src.stat().st_size}]}
    }
    m = stage.metrics()["preference"]
    assert m["uri"] == str(src) and m["rows"] == 7 and m["bytes"] == src.stat().st_size
    assert m["action"] == "downloaded"
    assert m["files"] == [{"uri": str(src.resolve()), "md5": md5, "mtime_ns": src.stat().st_mtime_ns}]
    assert m["digest"] == hashlib.md5(f"prefs.jsonl {md5}\n".encode()).hexdigest()
    assert out == {"sources/preference/rows": 7, "sources/preference/bytes": src.stat().st_size}
    # the identities are remembered in $RLHF_STATE_DIR, not in the workspace
    state = json.loads((state_dir / "ingest-state.json").read_text())["files"]
    assert state[str(src.resolve())]["md5"] == md5
    assert not (stage.ws.root / ".rlhf").exists()


def test_unchanged_file_is_not_copied_again(stage, tmp_path, monkeypatch):
    src = tmp_path / "prefs.jsonl"
    src.write_text(_pairs(5))
    stage.run(preference=str(src))
    copy = stage.snapshot("preference") / "prefs.jsonl"
    before, manifest_before = _stat(copy), stage.manifest_file.read_bytes()

    fetches = FetchCounter(monkeypatch)
    stage.run(preference=str(src))
    assert fetches.calls == []
    assert stage.metrics()["preference"]["action"] == "unchanged"
    assert _stat(copy) == before  # same inode, same mtime: the snapshot was not rewritten
    assert stage.manifest_file.read_bytes() == manifest_before
    assert stage.metrics()["preference"]["rows"] == 5


def test_changed_content_under_the_same_path_is_downloaded(stage, tmp_path, monkeypatch):
    src = tmp_path / "prefs.jsonl"
    src.write_text(_pairs(5))
    stage.run(preference=str(src))
    first = stage.manifest()["preference"]

    src.write_text(_pairs(9, tag="b"))
    fetches = FetchCounter(monkeypatch)
    stage.run(preference=str(src))
    second = stage.manifest()["preference"]
    assert fetches.calls == [str(src.resolve())]
    assert second["files"][0]["md5"] == _md5(src) != first["files"][0]["md5"]
    assert second["rows"] == 9 and first["rows"] == 5
    assert (stage.snapshot("preference") / "prefs.jsonl").read_bytes() == src.read_bytes()
    assert stage.metrics()["preference"]["action"] == "downloaded"


def test_same_size_edit_with_a_new_mtime_is_downloaded(stage, tmp_path):
    """Identity is size + mtime: an edit that keeps the size is seen through its modification time."""
    src = tmp_path / "prefs.jsonl"
    src.write_text(_pairs(4, tag="a"))
    stage.run(preference=str(src))
    first_md5 = stage.manifest()["preference"]["files"][0]["md5"]
    mtime = src.stat().st_mtime_ns
    src.write_text(_pairs(4, tag="z"))  # same length, different bytes
    os.utime(src, ns=(mtime + 2_000_000_000, mtime + 2_000_000_000))  # a later write, whatever the clock's tick
    stage.run(preference=str(src))
    assert stage.manifest()["preference"]["files"][0]["md5"] == _md5(src) != first_md5


def test_touch_leaves_the_manifest_and_dvc_hash_byte_identical(stage, tmp_path):
    src = tmp_path / "prefs.jsonl"
    src.write_text(_pairs(6))
    stage.run(preference=str(src))
    manifest, tree_hash = stage.manifest_file.read_bytes(), dvc_md5(stage.ws.sources)

    mtime = src.stat().st_mtime_ns
    os.utime(src, ns=(mtime + 5_000_000_000, mtime + 5_000_000_000))  # touch: new mtime, same content
    stage.run(preference=str(src))
    assert stage.manifest_file.read_bytes() == manifest
    assert dvc_md5(stage.ws.sources) == tree_hash  # what DVC would record for data/sources: no change


def test_folder_source_with_two_files(stage, tmp_path):
    folder = tmp_path / "prefs"
    folder.mkdir()
    (folder / "a.jsonl").write_text(_pairs(3, "a"))
    (folder / "b.jsonl").write_text(_pairs(4, "b"))
    (folder / "notes.txt").write_text("not data")
    (folder / ".hidden.jsonl").write_text(_pairs(1, "h"))
    stage.run(preference=str(folder))

    snap = stage.snapshot("preference")
    assert sorted(p.name for p in snap.iterdir()) == ["a.jsonl", "b.jsonl"]
    entry = stage.manifest()["preference"]
    assert entry["rows"] == 7 and entry["uri"] == str(folder)
    assert [(f["name"], f["md5"]) for f in entry["files"]] == [
        ("a.jsonl", _md5(folder / "a.jsonl")), ("b.jsonl", _md5(folder / "b.jsonl"))]
    m = stage.metrics()["preference"]
    assert [f["uri"] for f in m["files"]] == [str((folder / n).resolve()) for n in ("a.jsonl", "b.jsonl")]
    assert m["bytes"] == (folder / "a.jsonl").stat().st_size + (folder / "b.jsonl").stat().st_size

    # a file that leaves the folder leaves the snapshot
    (folder / "a.jsonl").unlink()
    stage.run(preference=str(folder))
    assert sorted(p.name for p in snap.iterdir()) == ["b.jsonl"]
    assert stage.manifest()["preference"]["rows"] == 4


def test_vanished_source_raises_naming_the_path(stage, tmp_path):
    src = tmp_path / "prefs.jsonl"
    src.write_text(_pairs(3))
    stage.run(preference=str(src))
    manifest = stage.manifest_file.read_bytes()
    src.unlink()
    with pytest.raises(DataLoadError, match=re.escape(str(src))):
        stage.run(preference=str(src))
    assert stage.manifest_file.read_bytes() == manifest  # the last good snapshot stays

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataLoadError, match=re.escape(str(empty))):
        stage.run(preference=str(empty))


def test_no_sources_configured_gives_an_empty_manifest(stage, tmp_path):
    assert stage.run() == {}
    assert stage.manifest() == {}
    assert stage.metrics() == {}
    assert ingest.run({"prepare": {"sft_data": None, "preference_data": ""}}, stage.ws) == {}
    assert stage.manifest() == {}

    # a role that is no longer configured loses its snapshot
    src = tmp_path / "sft.jsonl"
    src.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    stage.run(sft=str(src))
    assert (stage.snapshot("sft") / "sft.jsonl").is_file()
    stage.run()
    assert stage.manifest() == {} and not stage.snapshot("sft").exists()


def test_each_role_gets_its_own_snapshot_and_tracker_tags(stage, tmp_path):
    pref, prompts = tmp_path / "p.jsonl", tmp_path / "prompts.json"
    pref.write_text(_pairs(2))
    prompts.write_text(json.dumps([{"prompt": "x"}, {"prompt": "y"}, {"prompt": "z"}]))

    class Tracker:
        tags: dict[str, str] = {}

        def set_tags(self, tags):
            self.tags = dict(tags)

    tracker = Tracker()
    ingest.run({"prepare": {"preference_data": str(pref), "prompt_data": str(prompts)}}, stage.ws, tracker=tracker)
    assert set(stage.manifest()) == {"preference", "prompt"}
    assert stage.manifest()["prompt"]["rows"] == 3  # a JSON array counts its elements
    assert tracker.tags["source.preference.uri"] == str(pref)
    assert tracker.tags["source.prompt.action"] == "downloaded"
    assert tracker.tags["source.prompt.digest"] == stage.metrics()["prompt"]["digest"]


def test_deleted_snapshot_is_fetched_again(stage, tmp_path, monkeypatch):
    """The state says 'known', but the snapshot file is gone (and no DVC cache here): download."""
    src = tmp_path / "prefs.jsonl"
    src.write_text(_pairs(3))
    stage.run(preference=str(src))
    (stage.snapshot("preference") / "prefs.jsonl").unlink()
    fetches = FetchCounter(monkeypatch)
    stage.run(preference=str(src))
    assert fetches.calls == [str(src.resolve())]
    assert (stage.snapshot("preference") / "prefs.jsonl").read_bytes() == src.read_bytes()


# =========================================================================== S3 (moto on 127.0.0.1)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A boto3 client on the moto server, a fresh versioned bucket, and ``AWS_ENDPOINT_URL`` set for ingest."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"src-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return client, bucket


def test_s3_object_identity_unchanged_and_overwritten(stage, s3, monkeypatch):
    client, bucket = s3
    uri = f"s3://{bucket}/prefs.jsonl"
    put1 = client.put_object(Bucket=bucket, Key="prefs.jsonl", Body=_pairs(6, "a").encode())
    stage.run(preference=uri)

    copy = stage.snapshot("preference") / "prefs.jsonl"
    assert copy.read_bytes() == _pairs(6, "a").encode()
    m1 = stage.metrics()["preference"]
    assert m1["action"] == "downloaded" and m1["rows"] == 6 and m1["uri"] == uri
    assert m1["etag"] == put1["ETag"].strip('"') and m1["version_id"] == put1["VersionId"]
    assert m1["files"][0]["etag"] == m1["etag"] and m1["files"][0]["version_id"] == m1["version_id"]
    md5_1 = stage.manifest()["preference"]["files"][0]["md5"]
    assert md5_1 == hashlib.md5(_pairs(6, "a").encode()).hexdigest()

    # unchanged object: HEAD only, no download, snapshot untouched
    before = _stat(copy)
    fetches = FetchCounter(monkeypatch)
    stage.run(preference=uri)
    assert fetches.calls == []
    assert stage.metrics()["preference"]["action"] == "unchanged"
    assert stage.metrics()["preference"]["version_id"] == put1["VersionId"]
    assert _stat(copy) == before

    # overwritten under the same key: new ETag and VersionId, downloaded, new md5
    put2 = client.put_object(Bucket=bucket, Key="prefs.jsonl", Body=_pairs(8, "b").encode())
    stage.run(preference=uri)
    m2 = stage.metrics()["preference"]
    assert fetches.calls == [uri]
    assert m2["action"] == "downloaded" and m2["rows"] == 8
    assert m2["etag"] == put2["ETag"].strip('"') != m1["etag"]
    assert m2["version_id"] == put2["VersionId"] != m1["version_id"]
    md5_2 = stage.manifest()["preference"]["files"][0]["md5"]
    assert md5_2 == hashlib.md5(_pairs(8, "b").encode()).hexdigest() != md5_1
    assert copy.read_bytes() == _pairs(8, "b").encode()


def test_s3_fetch_gets_the_listed_version_even_if_overwritten_since(s3, tmp_path):
    from tasks.sources import fetch, list_source

    client, bucket = s3
    client.put_object(Bucket=bucket, Key="prefs.jsonl", Body=b"first\n")
    [listed] = list_source(f"s3://{bucket}/prefs.jsonl")
    client.put_object(Bucket=bucket, Key="prefs.jsonl", Body=b"second\n")
    fetch(listed, tmp_path / "got.jsonl")
    assert (tmp_path / "got.jsonl").read_bytes() == b"first\n"  # identity and content agree


def test_s3_prefix_with_two_objects(stage, s3):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="dir/a.jsonl", Body=_pairs(2, "a").encode())
    client.put_object(Bucket=bucket, Key="dir/b.jsonl", Body=_pairs(3, "b").encode())
    client.put_object(Bucket=bucket, Key="dir/readme.txt", Body=b"not data")
    client.put_object(Bucket=bucket, Key="dir/sub/c.jsonl", Body=_pairs(5, "c").encode())  # not at this level
    client.put_object(Bucket=bucket, Key="other/d.jsonl", Body=_pairs(5, "d").encode())
    uri = f"s3://{bucket}/dir/"
    stage.run(preference=uri)

    snap = stage.snapshot("preference")
    assert sorted(p.name for p in snap.iterdir()) == ["a.jsonl", "b.jsonl"]
    assert (snap / "b.jsonl").read_bytes() == _pairs(3, "b").encode()
    assert stage.manifest()["preference"]["rows"] == 5
    m = stage.metrics()["preference"]
    assert [f["uri"] for f in m["files"]] == [f"s3://{bucket}/dir/a.jsonl", f"s3://{bucket}/dir/b.jsonl"]
    for f, key in zip(m["files"], ("dir/a.jsonl", "dir/b.jsonl")):
        head = client.head_object(Bucket=bucket, Key=key)
        assert f["etag"] == head["ETag"].strip('"') and f["version_id"] == head["VersionId"]
    assert "etag" not in m  # several files: the identities are per file

    # the same prefix without the trailing slash names the same files
    stage.run(preference=f"s3://{bucket}/dir")
    assert sorted(p.name for p in snap.iterdir()) == ["a.jsonl", "b.jsonl"]


def test_s3_deleted_object_and_missing_bucket_raise_naming_the_uri(stage, s3):
    client, bucket = s3
    client.put_object(Bucket=bucket, Key="prefs.jsonl", Body=_pairs(2).encode())
    uri = f"s3://{bucket}/prefs.jsonl"
    stage.run(preference=uri)
    client.delete_object(Bucket=bucket, Key="prefs.jsonl")  # versioned: a delete marker on top
    with pytest.raises(DataLoadError, match=re.escape(uri)):
        stage.run(preference=uri)
    missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/prefs.jsonl"
    with pytest.raises(DataLoadError, match=re.escape(missing)):
        stage.run(preference=missing)


# =========================================================================== DVC, real CLI, S3 source


def _lock_hash(ws: Path, stage_name: str, path: str) -> str:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage_name]["outs"] if o["path"] == path)


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, check=True, text=True, capture_output=True).stdout.strip()


def _dvc(ws: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=ws, env=env, text=True, capture_output=True)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _ingest_action(ws: Path) -> str:
    return json.loads((ws / "metrics" / "ingest.json").read_text())["sources"]["preference"]["action"]


@pytest.fixture(scope="module")
def dvc_s3_history(s3_server, tmp_path_factory) -> dict[str, Any]:
    """One workspace through: first repro, commit, push, no-op repro, overwrite + repro, ingest in an
    older checkout of data/sources, then two fresh clones at the first commit pulled after the object
    was overwritten and after it was deleted.

    The fixture does every change; the tests only read what it recorded (order-independent).
    """
    import boto3

    from rlhf_core.synthetic import generate_task
    from tasks.params import load_params
    from tests.workspace_factory import make_workspace

    root = tmp_path_factory.mktemp("ingest-dvc")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"prefs-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    key, uri = "prefs.jsonl", f"s3://{bucket}/prefs.jsonl"

    def upload(seed: int) -> tuple[bytes, dict[str, Any]]:
        folder = root / f"task-{seed}"
        generate_task(folder, seed=seed, n_sft=240, n_pref_train=160, n_pref_test=48, n_prompts=24, temperature=0.2)
        body = (folder / "preferences_train.jsonl").read_bytes()
        return body, client.put_object(Bucket=bucket, Key=key, Body=body)

    env = {k: v for k, v in os.environ.items()
           if k not in ("RLHF_STATE_DIR", "RLHF_WORKSPACE", "RLHF_PARENT_RUN_ID", "AWS_ENDPOINT_URL_S3")}
    env.update({"AWS_ENDPOINT_URL": s3_server, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"})

    rec: dict[str, Any] = {"uri": uri}
    body1, put1 = upload(seed=1)
    ws = make_workspace(root / "ws", [f"prepare.preference_data={uri}"])

    # 1. first run: ingest downloads, prepare runs
    first = _dvc(ws, env, "repro", "prepare")
    rec["first_stdout"] = first.stdout
    rec["first_action"] = _ingest_action(ws)
    rec["first_metrics"] = json.loads((ws / "metrics" / "ingest.json").read_text())["sources"]["preference"]
    rec["first_snapshot_md5"] = _md5(ws / "data" / "sources" / "preference" / key)
    rec["body1_md5"] = hashlib.md5(body1).hexdigest()
    rec["put1"] = put1
    rec["lock1"] = {p: _lock_hash(ws, s, p) for s, p in (("ingest", "data/sources"), ("prepare", "data/prepared"))}
    rec["first_tree_md5"] = dvc_md5(ws / "data" / "sources")
    _git(ws, "add", "-A")
    _git(ws, "commit", "-qm", "first run")
    rec["first_commit"] = _git(ws, "rev-parse", "HEAD")
    _dvc(ws, env, "push")

    # 2. nothing changed at the source: ingest reports unchanged, prepare is skipped
    second = _dvc(ws, env, "repro", "prepare")
    rec["second_stdout"] = second.stdout
    rec["second_action"] = _ingest_action(ws)
    rec["lock2"] = {p: _lock_hash(ws, s, p) for s, p in (("ingest", "data/sources"), ("prepare", "data/prepared"))}

    # 3. the object is overwritten under the same key
    body2, put2 = upload(seed=2)
    third = _dvc(ws, env, "repro", "prepare")
    rec["third_stdout"] = third.stdout
    rec["third_metrics"] = json.loads((ws / "metrics" / "ingest.json").read_text())["sources"]["preference"]
    rec["third_snapshot_md5"] = _md5(ws / "data" / "sources" / "preference" / key)
    rec["body2_md5"] = hashlib.md5(body2).hexdigest()
    rec["put2"] = put2
    rec["lock3"] = {p: _lock_hash(ws, s, p) for s, p in (("ingest", "data/sources"), ("prepare", "data/prepared"))}

    # 3b. an isolated run from the first commit while the object is at version 2: that checkout's
    # snapshot is the first content, the state knows version 2 -> copied from the DVC cache, not downloaded
    _git(ws, "add", "-A")
    _git(ws, "commit", "-qm", "overwritten object")
    _git(ws, "checkout", rec["first_commit"], "--", "dvc.lock")
    _dvc(ws, env, "checkout", "ingest")
    rec["old_checkout_snapshot_md5"] = _md5(ws / "data" / "sources" / "preference" / key)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RLHF_STATE_DIR", "RLHF_WORKSPACE", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", s3_server)
        mp.chdir(ws)
        fetches: list[str] = []
        real_fetch = ingest.fetch

        def counting_fetch(source, dest):
            fetches.append(source.uri)
            real_fetch(source, dest)

        mp.setattr(ingest, "fetch", counting_fetch)
        ingest.run(load_params(ws / "params.yaml"), Workspace(ws))
    rec["restored"] = {
        "action": _ingest_action(ws), "fetches": fetches,
        "snapshot_md5": _md5(ws / "data" / "sources" / "preference" / key),
    }

    def pull_first_commit(name: str) -> dict[str, Any]:
        clone = root / name
        subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True, capture_output=True)
        _git(clone, "checkout", "-q", rec["first_commit"])
        assert not (clone / "data" / "sources").exists()
        _dvc(clone, env, "pull", "--with-deps", "prepare")  # only ingest and prepare have run
        status = _dvc(clone, env, "status", "--with-deps", "prepare")
        return {
            "lock": {p: _lock_hash(clone, s, p) for s, p in (("ingest", "data/sources"), ("prepare", "data/prepared"))},
            "tree_md5": dvc_md5(clone / "data" / "sources"),
            "prepared_md5": dvc_md5(clone / "data" / "prepared"),
            "snapshot_md5": _md5(clone / "data" / "sources" / "preference" / key),
            "status": status.stdout,
        }

    # 4. a fresh clone at the first commit, after the overwrite
    rec["clone_after_overwrite"] = pull_first_commit("clone-overwritten")

    # 5. the object deleted entirely (every version and delete marker), then another fresh clone
    listing = client.list_object_versions(Bucket=bucket, Prefix=key)
    for v in listing.get("Versions", []) + listing.get("DeleteMarkers", []):
        client.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])
    assert not client.list_object_versions(Bucket=bucket, Prefix=key).get("Versions")
    rec["clone_after_delete"] = pull_first_commit("clone-deleted")
    return rec


def _ran(stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '([a-z_]+)'", stdout))


@pytest.mark.slow
def test_dvc_first_repro_snapshots_the_s3_object(dvc_s3_history):
    h = dvc_s3_history
    assert _ran(h["first_stdout"]) == {"ingest", "prepare"}
    assert h["first_action"] == "downloaded"
    assert h["first_snapshot_md5"] == h["body1_md5"]
    assert h["first_metrics"]["version_id"] == h["put1"]["VersionId"]
    assert h["first_metrics"]["etag"] == h["put1"]["ETag"].strip('"')
    assert h["first_metrics"]["rows"] == 160
    assert h["lock1"]["data/sources"] == h["first_tree_md5"]


@pytest.mark.slow
def test_dvc_unchanged_object_skips_prepare(dvc_s3_history):
    h = dvc_s3_history
    assert "Stage 'prepare' didn't change, skipping" in h["second_stdout"], h["second_stdout"]
    assert "prepare" not in _ran(h["second_stdout"])
    assert h["second_action"] == "unchanged"
    assert h["lock2"] == h["lock1"]


@pytest.mark.slow
def test_dvc_overwritten_object_reruns_prepare_and_changes_the_lock(dvc_s3_history):
    h = dvc_s3_history
    assert _ran(h["third_stdout"]) == {"ingest", "prepare"}
    assert h["third_metrics"]["action"] == "downloaded"
    assert h["third_metrics"]["version_id"] == h["put2"]["VersionId"] != h["put1"]["VersionId"]
    assert h["third_snapshot_md5"] == h["body2_md5"] != h["body1_md5"]
    assert h["lock3"]["data/sources"] != h["lock1"]["data/sources"]
    assert h["lock3"]["data/prepared"] != h["lock1"]["data/prepared"]


@pytest.mark.slow
def test_dvc_older_checkout_of_an_unchanged_source_is_restored_from_the_dvc_cache(dvc_s3_history):
    h = dvc_s3_history
    assert h["old_checkout_snapshot_md5"] == h["body1_md5"]  # dvc checkout put the first snapshot back
    assert h["restored"]["fetches"] == []  # the object is known (version 2): no download
    assert h["restored"]["action"] == "restored"
    assert h["restored"]["snapshot_md5"] == h["body2_md5"]  # the source's current content, from the cache


@pytest.mark.slow
@pytest.mark.parametrize("clone", ["clone_after_overwrite", "clone_after_delete"])
def test_dvc_pull_at_first_commit_restores_the_first_content(dvc_s3_history, clone):
    h = dvc_s3_history
    pulled = h[clone]
    assert pulled["lock"] == h["lock1"]
    assert pulled["tree_md5"] == h["lock1"]["data/sources"]  # data/sources as the first run saw it
    assert pulled["snapshot_md5"] == h["body1_md5"]  # the first object's bytes, not the overwrite's
    assert pulled["prepared_md5"] == h["lock1"]["data/prepared"]
    # nothing left to do but the always-run ingest (which would ask the source again)
    assert "prepare" not in pulled["status"] and "modified" not in pulled["status"], pulled["status"]
