"""tasks/tracking/, tasks/parent_run.py and tasks/registry.py against a real ``mlflow server`` on 127.0.0.1
(no mocks of MLflow), a real DVC repo, and an S3 artifact store (moto on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.parent_run import close_parent_run, download_run_record, log_parent_summary, open_parent_run
from tasks.registry import register_model
from tasks.tracking.client import PARENT_RUN_ENV, connect, local_artifact_location, resolve_tracking_uri
from tasks.tracking.dvc_hash import dvc_md5
from tasks.tracking.gitinfo import git_info
from tasks.tracking.outage import RunSink
from tasks.tracking.stage_run import stage_run
from tasks.tracking.values import PARAM_VALUE_LIMIT, flatten_params, params_hash

EXPERIMENT = {"experiment": "test-tracking"}


@pytest.fixture
def client(mlflow_server, monkeypatch):
    """An MlflowClient of the test server, with ``$MLFLOW_TRACKING_URI`` pointing at it."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    return MlflowClient(mlflow_server)


def _experiment_id(tmp_path) -> str:
    return connect(tmp_path, EXPERIMENT).experiment_id()


# --------------------------------------------------------------------------- no server needed


def test_resolve_tracking_uri_precedence_and_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(tmp_path)  # the result must not depend on the working directory

    assert resolve_tracking_uri(None, project) == f"sqlite:///{project.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///runs/m.db", project) == f"sqlite:///{project.resolve()}/runs/m.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db", project) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://tracking:5000", project) == "http://tracking:5000"
    assert resolve_tracking_uri("mlruns", project) == str(project.resolve() / "mlruns")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri("http://tracking:5000", project) == "http://from-env:5000"
    assert resolve_tracking_uri(None, project) == "http://from-env:5000"


def test_artifacts_of_a_local_store_go_to_the_workspace_whatever_the_working_directory(tmp_path, monkeypatch):
    """MLflow puts a SQLite store's artifacts in ``./mlruns`` of the process that creates the experiment; the
    project's client puts them next to the store: ``<workspace>/mlruns``, also from an isolated run's checkout."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    workspace, elsewhere = tmp_path / "ws", tmp_path / "elsewhere"
    checkout = workspace / ".rlhf" / "runs" / "flow-1"  # an isolated run's checkout, tracking into the workspace's store
    checkout.mkdir(parents=True)
    (checkout / "params.yaml").write_text("dpo:\n  beta: 0.1\n")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where MLflow's default ./mlruns would appear
    artifacts = workspace / "mlruns"

    parent = open_parent_run(checkout, {"uri": resolve_tracking_uri(None, workspace), "experiment": "isolated"},
                             run_name="pipeline", tags={})
    store = connect(checkout, {"uri": resolve_tracking_uri(None, workspace)})
    store.client.log_text(parent, "parent", "notes/parent.txt")
    with stage_run("sft", {}, project_dir=workspace, tracking=EXPERIMENT) as tracker:  # the workspace's default store
        tracker.log_dict({"a": 1}, "config.json")

    for experiment in ("isolated", EXPERIMENT["experiment"]):
        assert store.client.get_experiment_by_name(experiment).artifact_location == artifacts.as_uri()
    assert store.client.get_run(parent).info.artifact_uri == f"{artifacts.as_uri()}/{parent}/artifacts"
    assert (artifacts / parent / "artifacts" / "notes" / "parent.txt").read_text() == "parent"
    assert json.loads((artifacts / tracker.run_id / "artifacts" / "config.json").read_text()) == {"a": 1}
    assert list(elsewhere.iterdir()) == [] and not (checkout / "mlruns").exists()
    # A file store keeps them inside itself, a tracking server in its own root: the project does not choose
    assert local_artifact_location(f"sqlite:///{workspace}/runs/m.db?timeout=5") == (workspace / "runs" / "mlruns").as_uri()
    assert local_artifact_location(str(workspace / "filestore")) is None
    assert local_artifact_location("http://tracking:5000") is None


@pytest.mark.slow
def test_set_tracking_reaches_the_parent_run_and_the_stages_alike(tmp_path, monkeypatch):
    """The flow reads ``tracking`` after ``--set`` is applied (to the workspace's params.yaml, or to an isolated run's
    checkout): its parent run and its stages' runs go to the overridden store and experiment, a relative store
    path is the workspace's. One stage (ingest) per run."""
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.alignment import alignment_flow
    from tests.workspace_factory import make_workspace

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    ws = make_workspace(tmp_path / "ws")
    with prefect_test_harness(server_startup_timeout=120):
        results = {mode: alignment_flow(workspace=str(ws), stages=["ingest"], push=False, ref=ref,
                                        overrides=[f"tracking.uri=sqlite:///{mode}.db", f"tracking.experiment={mode}-runs"])
                   for mode, ref in (("workspace", None), ("isolated", "HEAD"))}

    assert not (ws / "mlflow.db").exists()  # the store params.yaml named before the overrides
    for mode, result in results.items():
        client = MlflowClient(f"sqlite:///{ws / f'{mode}.db'}")
        assert result["tracking_uri"] == f"sqlite:///{ws / f'{mode}.db'}"
        assert client.get_experiment_by_name("rlhf-pipeline") is None
        experiment = client.get_experiment_by_name(f"{mode}-runs").experiment_id
        parent = client.get_run(result["parent_run_id"])
        assert parent.info.experiment_id == experiment and parent.info.status == "FINISHED"
        assert parent.data.params["tracking.experiment"] == f"{mode}-runs"
        (stage,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert stage.data.tags["stage"] == "ingest" and stage.info.status == "FINISHED"


def test_git_info_reads_commit_dirty_and_branch(tmp_path):
    assert git_info(tmp_path) == {"commit": "unknown", "dirty": "unknown", "branch": "unknown"}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                              cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q", "-b", "trunk")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    info = git_info(tmp_path)
    assert info == {"commit": git("rev-parse", "HEAD"), "dirty": False, "branch": "trunk"}
    (tmp_path / "untracked.txt").write_text("not a change to tracked files\n")
    assert git_info(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("two\n")
    assert git_info(tmp_path)["dirty"] is True


def test_flatten_params_and_params_hash():
    flat = flatten_params({"sft": {"learning_rate": 1e-4, "model": {"n_layer": 2}, "extra": {}}, "seed": 0,
                           "long": "x" * (PARAM_VALUE_LIMIT + 10)})
    assert flat["sft.learning_rate"] == "0.0001"
    assert flat["sft.model.n_layer"] == "2"
    assert flat["sft.extra"] == "{}"
    assert flat["seed"] == "0"
    assert len(flat["long"]) == PARAM_VALUE_LIMIT and flat["long"].startswith("xxx")

    a = params_hash({"dpo": {"beta": 0.1, "seed": 1}, "sft": {"lr": 1e-4}})
    assert a == params_hash({"sft": {"lr": 1e-4}, "dpo": {"seed": 1, "beta": 0.1}})  # key order is irrelevant
    assert a != params_hash({"dpo": {"beta": 0.2, "seed": 1}, "sft": {"lr": 1e-4}})
    assert a == hashlib.sha256(b'{"dpo":{"beta":0.1,"seed":1},"sft":{"lr":0.0001}}').hexdigest()  # canonical JSON


def _sh(cmd: list[str], cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_dvc_md5_equals_the_md5_dvc_lock_records_and_honours_dvcignore(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _sh(["dvc", "init", "--no-scm", "-q"], repo)
    (repo / ".dvcignore").write_text("*.tmp\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": {
        "cmd": "mkdir -p out/sub/deeper && echo hello > out/a.txt && printf 'x\\r\\ny\\000' > out/sub/b.bin"
               " && echo '{\"k\": 1}' > out/sub/deeper/c.json && echo scratch > out/junk.tmp && echo one > single.txt",
        "outs": ["out", "single.txt"],
    }}}))
    _sh(["dvc", "repro", "-q"], repo)
    locked = {o["path"]: o["md5"] for o in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["make"]["outs"]}
    assert locked["out"].endswith(".dir")

    assert dvc_md5(repo / "out") == locked["out"]  # the .dvcignore'd out/junk.tmp is not part of it
    assert dvc_md5(repo / "out", repo) == locked["out"]
    assert dvc_md5(repo / "single.txt") == locked["single.txt"]
    (repo / "out" / "sub" / "more.tmp").write_text("ignored too")
    assert dvc_md5(repo / "out") == locked["out"]
    assert dvc_md5(repo / "out", tmp_path / "elsewhere") != locked["out"]  # without the repo's rules it counts
    (repo / "out" / "a.txt").write_text("changed\n")
    assert dvc_md5(repo / "out") != locked["out"]
    with pytest.raises(FileNotFoundError, match="missing"):
        dvc_md5(repo / "missing")


# --------------------------------------------------------------------------- against the server


def test_stage_run_logs_params_tags_and_batched_curves(client, mlflow_server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    # The URI comes from the configured value here; stage_run must not leave it in the environment.
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    metric_batches: list[int] = []
    original = MlflowClient.log_batch

    def spy(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            metric_batches.append(len(metrics))
        return original(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", spy)
    global_uri = mlflow.get_tracking_uri()
    params = {"sft": {"learning_rate": 1e-4, "model": {"n_layer": 2}}, "many": {f"k{i}": i for i in range(150)}}
    losses = [1.0 / (step + 1) for step in range(250)]

    with stage_run("sft", params, project_dir=tmp_path, tracking={"uri": mlflow_server, **EXPERIMENT}) as tracker:
        for step, loss in enumerate(losses):  # 250 steps x 2 metrics = 500 values
            tracker.log_fn({"sft/loss": loss, "sft/lr": step * 1e-3}, step)
        tracker.log_fn({"sft/nan": float("nan"), "sft/inf": float("inf"), "sft/text": "n/a", "sft/none": None}, 250)
        tracker.log_metrics({"sft/final_loss": 0.25})
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == global_uri  # MLflow's global state is left alone

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "sft"
    assert run.data.tags["stage"] == "sft"
    assert run.data.tags["git.commit"] == "unknown"  # tmp_path is not a git repo
    assert "mlflow.parentRunId" not in run.data.tags  # standalone without $RLHF_PARENT_RUN_ID
    assert run.data.params["sft.learning_rate"] == "0.0001"
    assert run.data.params["sft.model.n_layer"] == "2"
    assert {f"many.k{i}" for i in range(150)} <= set(run.data.params)  # more than one params batch

    history = client.get_metric_history(tracker.run_id, "sft/loss")
    assert sorted(m.step for m in history) == list(range(250))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(losses)
    assert len(client.get_metric_history(tracker.run_id, "sft/lr")) == 250
    assert run.data.metrics["sft/final_loss"] == 0.25
    assert not {"sft/nan", "sft/inf", "sft/text", "sft/none"} & set(run.data.metrics)
    # 501 values in a handful of requests, not one request per value or per step
    assert sum(metric_batches) == 501
    assert len(metric_batches) <= 5 and max(metric_batches) <= 1000


def test_stage_run_nests_under_parent_from_environment(client, tmp_path, monkeypatch):
    parent = client.create_run(_experiment_id(tmp_path), run_name="pipeline").info.run_id  # as another process would
    monkeypatch.setenv(PARENT_RUN_ENV, parent)

    with stage_run("dpo", {"dpo": {"beta": 0.1}}, project_dir=tmp_path, tracking=EXPERIMENT) as tracker:
        tracker.log_fn({"dpo/loss": 0.69}, 0)

    child = client.get_run(tracker.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.info.status == "FINISHED"
    assert client.get_run(parent).info.status == "RUNNING"  # the parent belongs to the flow
    assert client.get_metric_history(tracker.run_id, "dpo/loss")[0].value == pytest.approx(0.69)


def test_failing_block_marks_run_failed_and_keeps_its_curve(client, tmp_path):
    with pytest.raises(ValueError, match="boom"), stage_run("reward", {}, project_dir=tmp_path, tracking=EXPERIMENT) as tracker:
        tracker.log_fn({"reward/loss": 0.5}, 3)
        raise ValueError("boom")

    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "reward/loss")] == [(3, 0.5)]


def test_dataset_inputs_artifacts_and_output_hashes(client, tmp_path):
    import mlflow.data
    import pandas as pd

    df = pd.DataFrame({"prompt": ["1+1=", "2+2="], "completion": ["2", "4"]})
    data_file = tmp_path / "data" / "sft_train.jsonl"
    data_file.parent.mkdir()
    df.to_json(data_file, orient="records", lines=True)
    report = tmp_path / "report"
    report.mkdir()
    (report / "result.json").write_text('{"success": true}')
    rows = [{"prompt": "1+1=", "completion": "2", "reward": 1.0}, {"prompt": "2+2=", "completion": "5", "reward": 0.0}]

    with stage_run("prepare", {}, project_dir=tmp_path, tracking=EXPERIMENT) as tracker:
        tracker.log_dataset(df, name="sft_train", context="train", source=str(data_file))
        tracker.log_dict({"a": 1}, "config.json")
        tracker.log_table(rows, "samples.json")
        tracker.log_artifact(data_file, "data")
        tracker.log_artifacts(report, "validation")
        hashes = tracker.log_output_hashes([tmp_path / "data", report / "result.json", tmp_path / "missing"], tmp_path)

    run = client.get_run(tracker.run_id)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "sft_train"
    assert dataset_input.dataset.digest == mlflow.data.from_pandas(df).digest  # MLflow's content digest
    assert dataset_input.dataset.digest != mlflow.data.from_pandas(df.iloc[:1]).digest
    assert dataset_input.dataset.schema == mlflow.data.from_pandas(df).to_dict()["schema"]  # inferred from fewer rows
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "train"

    listed = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.json", "samples.json", "data", "validation"} <= listed
    local = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "downloaded")))
    assert json.loads((local / "config.json").read_text()) == {"a": 1}
    table = json.loads((local / "samples.json").read_text())
    assert table["columns"] == ["prompt", "completion", "reward"] and len(table["data"]) == 2
    assert (local / "validation" / "result.json").read_text() == '{"success": true}'
    assert (local / "data" / "sft_train.jsonl").read_bytes() == data_file.read_bytes()

    expected = {"dvc.hash.data": dvc_md5(tmp_path / "data", tmp_path),
                "dvc.hash.report/result.json": dvc_md5(report / "result.json", tmp_path)}
    assert hashes == expected
    assert {k: v for k, v in run.data.tags.items() if k.startswith("dvc.hash.")} == expected


def test_log_parent_summary(client, tmp_path):
    parent = client.create_run(_experiment_id(tmp_path), run_name="pipeline").info.run_id
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "sft.json").write_text(json.dumps({"loss": 1.5, "eval": {"accuracy": 0.75}, "model": "gpt2"}))
    (metrics_dir / "dpo.json").write_text('{"reward_margin": 0.3, "diverged": NaN}')
    (tmp_path / "params.yaml").write_text("sft:\n  learning_rate: 0.0001\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")

    logged = log_parent_summary(RunSink(client, parent), metrics_dir=metrics_dir, params_file=tmp_path / "params.yaml",
                                lock_file=tmp_path / "dvc.lock", extra_tags={"prefect.flow_run_id": "abc-123"})

    expected = {"sft/loss": 1.5, "sft/eval/accuracy": 0.75, "dpo/reward_margin": 0.3}
    assert logged == expected
    run = client.get_run(parent)
    assert run.data.metrics == expected
    assert run.data.tags["prefect.flow_run_id"] == "abc-123"
    assert {"pipeline/params.yaml", "pipeline/dvc.lock"} <= {a.path for a in client.list_artifacts(parent, "pipeline")}


def _tiny_gpt2():
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", *"abcdefgh", "=", "+"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(config).eval(), tokenizer


def test_register_model_round_trip(client, mlflow_server, tmp_path):
    import mlflow.artifacts
    import mlflow.transformers
    import torch

    model, tokenizer = _tiny_gpt2()
    lineage = {"git.commit": "abc123", "data.digest": "d41d8cd9", "params.hash": params_hash({"sft": {"lr": 1e-4}})}
    with stage_run("evaluate", {}, project_dir=tmp_path, tracking=EXPERIMENT) as tracker:
        version = register_model(tracker.client, tracker.run_id, model, tokenizer, "test-policy", lineage)

    stored = client.get_model_version_by_alias("test-policy", "challenger")
    assert stored.version == version.version
    assert stored.run_id == tracker.run_id
    assert {k: stored.tags[k] for k in lineage} == lineage
    assert client.get_run(tracker.run_id).info.status == "FINISHED"

    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/test-policy@challenger", tracking_uri=mlflow_server,
                                                dst_path=str(tmp_path / "model"))
    loaded = mlflow.transformers.load_model(local, return_type="components")
    ids = tokenizer("a b + c =", return_tensors="pt").input_ids
    assert loaded["tokenizer"]("a b + c =", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        expected = model(ids).logits
        got = loaded["model"](ids).logits
        torch.testing.assert_close(got, expected)
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert loaded["model"].generate(ids, **kwargs).tolist() == model.generate(ids, **kwargs).tolist()


def test_register_model_into_a_run_open_elsewhere_keeps_it_running(client, tmp_path):
    model, tokenizer = _tiny_gpt2()
    parent = client.create_run(_experiment_id(tmp_path), run_name="pipeline").info.run_id  # RUNNING, as the flow leaves it

    version = register_model(client, parent, model, tokenizer, "test-policy-2", {"git.commit": "abc"}, alias="champion")

    assert client.get_run(parent).info.status == "RUNNING"
    assert client.get_model_version_by_alias("test-policy-2", "champion").version == version.version
    assert version.run_id == parent


def test_parent_run_record_round_trip_through_an_s3_artifact_store(s3_server, tmp_path, monkeypatch):
    """The deployed set-up keeps artifacts in S3 (MinIO): the flow's parent run writes its record
    there and `rlhf reproduce` reads it back, both through the client bound to the project's URI."""
    import boto3
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_server)
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="rlhf-mlflow")
    project = tmp_path / "project"
    (project / "metrics").mkdir(parents=True)
    (project / "params.yaml").write_text("dpo:\n  beta: 0.1\n")
    (project / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (project / "metrics" / "dpo.json").write_text('{"eval": {"loss": 0.5}}')
    tracking = {"uri": "sqlite:///mlflow.db", "experiment": "s3-record"}  # relative: resolved against the project
    store = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    store.create_experiment("s3-record", artifact_location="s3://rlhf-mlflow/runs")

    run_id = open_parent_run(project, tracking, run_name="pipeline-test", tags={"git.commit": "abc"})
    close_parent_run(project, tracking, run_id, status="FINISHED")
    record = download_run_record(project, tracking, run_id, tmp_path / "record")

    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=s3_server).list_objects_v2(Bucket="rlhf-mlflow")["Contents"]}
    assert {f"runs/{run_id}/artifacts/pipeline/{name}" for name in ("params.yaml", "dvc.lock", "metrics/dpo.json")} <= keys
    assert record["params"].read_text() == (project / "params.yaml").read_text()
    assert record["lock"].read_text() == (project / "dvc.lock").read_text()
    assert record["commit"] == "abc" and record["logged_metrics"] == {"dpo/eval/loss": 0.5}
    assert store.get_run(run_id).data.params == {"dpo.beta": "0.1"}
    assert store.get_run(run_id).info.status == "FINISHED"


def test_the_experiment_opens_on_the_model_training_runs_view(client, tmp_path):
    """MLflow 3's UI reads the experiment's ``mlflow.experimentKind`` tag; without it, it may land on GenAI traces."""
    experiment = connect(tmp_path, {"experiment": "test-tracking-view"}).experiment_id()
    assert client.get_experiment(experiment).tags.get("mlflow.experimentKind") == "custom_model_development"


def test_register_model_uses_the_clients_store_not_the_global_one(tmp_path, monkeypatch):
    """A database registry resolves ``models:/<id>`` through MLflow's global URI; registration must not depend on it."""
    from mlflow import MlflowClient

    from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, train_tokenizer
    from tasks.registry import downloaded_model, register_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # where a stray default store (./mlflow.db, ./mlruns) would appear
    store = tmp_path / "store"
    store.mkdir()
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("e", artifact_location=str(store / "artifacts")))
    tokenizer = train_tokenizer(["hello world"] * 10, vocab_size=300)
    model = build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2))
    version = register_model(client, run.info.run_id, model, tokenizer, "policy", {"git.commit": "abc"})
    assert str(version.version) == "1" and not (tmp_path / "mlflow.db").exists()
    with downloaded_model(client, "policy", str(version.version)) as (model_dir, tokenizer_dir):
        assert (model_dir / "config.json").exists() and any(tokenizer_dir.iterdir())


def test_calls_a_dead_server_missed_are_kept_with_their_files_and_sync_sends_them(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.tracking.outage import pending_dir, pending_journals, sync_pending
    from tests.servers import free_port

    monkeypatch.delenv("RLHF_STATE_DIR", raising=False)
    store = connect(tmp_path, {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **EXPERIMENT})
    run_id = store.client.create_run(store.experiment_id(), run_name="sft").info.run_id
    dead = MlflowClient(f"http://127.0.0.1:{free_port()}")  # nothing listens: refused, after the bounded retries
    sink = RunSink(dead, run_id, journal_dir=pending_dir(tmp_path), name="sft", uri=store.uri, parent_run_id="p1")
    report = tmp_path / "report.txt"
    report.write_text("as logged\n")
    sink.send("log_batch", metrics=[["train/loss", 2.0, 1, 0], ["train/loss", 1.0, 2, 1]], params=[["lr", "0.1"]])
    sink.send("log_artifact", path=str(report), artifact_path="reports")
    report.write_text("changed later\n")  # the journal kept its own copy
    sink.send("set_terminated", status="FINISHED")
    assert sink.journal is not None and [j.path for j in pending_journals(tmp_path, parent_run_id="p1")] == [sink.journal.path]
    assert store.client.get_run(run_id).info.status == "RUNNING"

    ((meta, sent),) = sync_pending(tmp_path, lambda uri: store.client if uri == store.uri else None)
    assert (meta["name"], meta["reason"], sent) == ("sft", "Connection refused", 3)
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["lr"] == "0.1"
    assert [m.value for m in store.client.get_metric_history(run_id, "train/loss")] == [2.0, 1.0]
    assert Path(store.client.download_artifacts(run_id, "reports/report.txt", str(tmp_path / "dl"))).read_text() == "as logged\n"
    assert pending_journals(tmp_path) == []
    # Only an outage is kept: any other error is the caller's
    with pytest.raises(MlflowException):
        RunSink(store.client, "no-such-run", journal_dir=pending_dir(tmp_path)).send("set_terminated", status="FINISHED")


def test_runs_whose_process_has_ended_are_closed_as_killed_but_live_and_waiting_ones_are_not(tmp_path):
    import socket
    import sys

    from tasks.tracking.lifecycle import close_stale_runs, create_run

    store = connect(tmp_path, {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", **EXPERIMENT})
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    ours = create_run(store, run_name="live", tags={}, params={}, doing="-")  # owned by this (live) process
    assert store.client.get_run(ours).data.tags["rlhf.pid"] == str(os.getpid())

    def orphan(name: str) -> str:
        return store.client.create_run(store.experiment_id(), run_name=name, tags={
            "rlhf.host": socket.gethostname(), "rlhf.pid": ended.stdout.strip()}).info.run_id

    stale, waiting = orphan("stale"), orphan("waiting for sync")
    closed = close_stale_runs(store, skip={waiting})
    assert [r.info.run_id for r in closed] == [stale]
    assert store.client.get_run(stale).info.status == "KILLED"
    assert "had ended without closing it" in store.client.get_run(stale).data.tags["rlhf.closed_by"]
    assert {store.client.get_run(r).info.status for r in (ours, waiting)} == {"RUNNING"}
