"""tasks/tracking.py against a real ``mlflow server`` on 127.0.0.1 (no mocks of MLflow)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tasks.registry import register_model
from tasks.tracking import (
    PARAM_VALUE_LIMIT,
    PARENT_RUN_ENV,
    dvc_md5,
    flatten_params,
    git_info,
    log_parent_summary,
    params_hash,
    resolve_tracking_uri,
    stage_run,
)

EXPERIMENT = {"experiment": "test-tracking"}


@pytest.fixture
def client(mlflow_server, monkeypatch):
    """An MlflowClient of the test server, with ``$MLFLOW_TRACKING_URI`` pointing at it."""
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    mlflow.set_tracking_uri(mlflow_server)
    yield MlflowClient(mlflow_server)
    while mlflow.active_run() is not None:  # a failed test must not leave a run open for the next
        mlflow.end_run("FAILED")


def _experiment_id(client) -> str:
    from tasks.tracking import _experiment_id

    return _experiment_id(client, EXPERIMENT["experiment"])


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
    assert len(a) == 64 and int(a, 16) >= 0


def test_dvc_md5_equals_dvc_own_hash(tmp_path):
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    out = tmp_path / "out"
    (out / "sub" / "deeper").mkdir(parents=True)
    (out / "a.txt").write_text("hello\n")
    (out / "sub" / "b.bin").write_bytes(b"x\r\ny\x00" * 100)  # CRLF and NUL: no text normalisation
    (out / "sub" / "deeper" / "c.json").write_text('{"k": 1}')
    fs = LocalFileSystem()
    odb = HashFileDB(fs, str(tmp_path / "odb"))

    for path in (out, out / "a.txt", out / "sub" / "b.bin"):
        _, _, obj = build(odb, str(path), fs, "md5")
        assert dvc_md5(path) == obj.hash_info.value
    with pytest.raises(FileNotFoundError, match="missing"):
        dvc_md5(tmp_path / "missing")


# --------------------------------------------------------------------------- against the server


def test_stage_run_logs_params_tags_and_batched_curves(client, mlflow_server, tmp_path, monkeypatch):
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
    params = {"sft": {"learning_rate": 1e-4, "model": {"n_layer": 2}}, "many": {f"k{i}": i for i in range(150)}}
    losses = [1.0 / (step + 1) for step in range(250)]

    with stage_run("sft", params, project_dir=tmp_path, tracking={"uri": mlflow_server, **EXPERIMENT}) as tracker:
        for step, loss in enumerate(losses):  # 250 steps x 2 metrics = 500 values
            tracker.log_fn({"sft/loss": loss, "sft/lr": step * 1e-3}, step)
        tracker.log_fn({"sft/nan": float("nan"), "sft/inf": float("inf"), "sft/text": "n/a", "sft/none": None}, 250)
        tracker.log_metrics({"sft/final_loss": 0.25})
    assert "MLFLOW_TRACKING_URI" not in os.environ

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
    parent = client.create_run(_experiment_id(client), run_name="pipeline").info.run_id  # as another process would
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
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "train"

    listed = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.json", "samples.json", "data", "validation"} <= listed
    local = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "downloaded")))
    assert json.loads((local / "config.json").read_text()) == {"a": 1}
    table = json.loads((local / "samples.json").read_text())
    assert table["columns"] == ["prompt", "completion", "reward"] and len(table["data"]) == 2
    assert (local / "validation" / "result.json").read_text() == '{"success": true}'
    assert (local / "data" / "sft_train.jsonl").read_bytes() == data_file.read_bytes()

    expected = {"dvc.hash.data": dvc_md5(tmp_path / "data"), "dvc.hash.report/result.json": dvc_md5(report / "result.json")}
    assert hashes == expected
    assert {k: v for k, v in run.data.tags.items() if k.startswith("dvc.hash.")} == expected


def test_log_parent_summary(client, tmp_path):
    parent = client.create_run(_experiment_id(client), run_name="pipeline").info.run_id
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "sft.json").write_text(json.dumps({"loss": 1.5, "eval": {"accuracy": 0.75}, "model": "gpt2"}))
    (metrics_dir / "dpo.json").write_text('{"reward_margin": 0.3, "diverged": NaN}')
    (tmp_path / "params.yaml").write_text("sft:\n  learning_rate: 0.0001\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")

    logged = log_parent_summary(parent, metrics_dir=metrics_dir, params_file=tmp_path / "params.yaml",
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


def test_register_model_round_trip(client, tmp_path):
    import mlflow.transformers
    import torch

    model, tokenizer = _tiny_gpt2()
    lineage = {"git.commit": "abc123", "data.digest": "d41d8cd9", "params.hash": params_hash({"sft": {"lr": 1e-4}})}
    with stage_run("evaluate", {}, project_dir=tmp_path, tracking=EXPERIMENT) as tracker:
        version = register_model(tracker.run_id, model, tokenizer, "test-policy", lineage)

    stored = client.get_model_version_by_alias("test-policy", "challenger")
    assert stored.version == version.version
    assert stored.run_id == tracker.run_id
    assert {k: stored.tags[k] for k in lineage} == lineage
    assert client.get_run(tracker.run_id).info.status == "FINISHED"

    loaded = mlflow.transformers.load_model("models:/test-policy@challenger", return_type="components")
    ids = tokenizer("a b + c =", return_tensors="pt").input_ids
    assert loaded["tokenizer"]("a b + c =", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        expected = model(ids).logits
        got = loaded["model"](ids).logits
        torch.testing.assert_close(got, expected)
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert loaded["model"].generate(ids, **kwargs).tolist() == model.generate(ids, **kwargs).tolist()


def test_register_model_into_a_run_open_elsewhere_keeps_it_running(client):
    model, tokenizer = _tiny_gpt2()
    parent = client.create_run(_experiment_id(client), run_name="pipeline").info.run_id  # RUNNING, no active run here

    version = register_model(parent, model, tokenizer, "test-policy-2", {"git.commit": "abc"}, alias="champion")

    assert client.get_run(parent).info.status == "RUNNING"
    assert client.get_model_version_by_alias("test-policy-2", "champion").version == version.version
    assert version.run_id == parent


def test_s3_server_serves_a_bucket(s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="rlhf-test")
    s3.put_object(Bucket="rlhf-test", Key="a/b.txt", Body=b"hello")
    assert s3.get_object(Bucket="rlhf-test", Key="a/b.txt")["Body"].read() == b"hello"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
