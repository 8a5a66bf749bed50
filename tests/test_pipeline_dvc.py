"""The pipeline as DVC stages, end to end, with the real `dvc` CLI in a temporary git repo.

MLflow is a real `mlflow server` on 127.0.0.1; the S3 remote is a moto server on 127.0.0.1.
One tiny workspace is built and reproduced once per module; the tests then read and change it
in any order, each leaving it reproduced (a no-op repro, a policy switched off and on, tracking,
push/pull). A parameter change that re-runs only what follows it is tested through the flow (test_flow).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tasks.dvc_ops import status_clean
from tests.workspace_factory import make_workspace, run

pytestmark = pytest.mark.slow
STAGES = ["ingest", "prepare", "validate", "sft", "reward", "ppo", "dpo", "grpo", "evaluate", "promote"]
ALWAYS_RUN = {"ingest"}  # always_changed: it checks the sources, and rewrites nothing when they did not change


def repro(ws: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", "repro", *args], cwd=ws, text=True, capture_output=True, env={**os.environ, **(env or {})})


def stages_run(output: str) -> set[str]:
    """Stages whose command ran, besides the always-run ``ingest``."""
    return set(re.findall(r"Running stage '([a-z_]+)'", output)) - ALWAYS_RUN


@pytest.fixture(scope="module")
def tracked_env(mlflow_server):
    return {"MLFLOW_TRACKING_URI": mlflow_server}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tracked_env) -> Path:
    # Two samples per prompt: evaluate and promote sample, pair and bootstrap k > 1 (the default 1 runs in test_flow).
    ws = make_workspace(tmp_path_factory.mktemp("pipeline") / "ws", ["grpo.train=true", "evaluate.samples_per_prompt=2"])
    proc = repro(ws, env=tracked_env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert stages_run(proc.stdout) == set(STAGES) - ALWAYS_RUN
    run(["git", "add", "-A"], ws)
    run(["git", "commit", "-qm", "first run"], ws)
    return ws


def test_full_repro_produces_every_output(workspace):
    for stage in STAGES:
        assert json.loads((workspace / "metrics" / f"{stage}.json").read_text()), stage
    for model in ("sft", "reward", "ppo", "dpo", "grpo"):
        assert list((workspace / "models" / model).glob("*.safetensors")), model
        assert not list((workspace / "models" / model).glob("*.bin")), model
    lock = (workspace / "dvc.lock").read_text()
    assert all(f"  {stage}:" in lock for stage in STAGES)
    assert (workspace / "reports" / "validate" / "data_docs" / "index.html").exists()
    assert (workspace / "plots" / "sft" / "train.csv").read_text().startswith("step,")
    evaluation = json.loads((workspace / "metrics" / "evaluate.json").read_text())
    for policy in ("sft", "ppo", "dpo", "grpo"):
        for name in ("gold_reward", "rm_score", "kl_per_token", "kl_per_sequence", "response_length", "distinct_2"):
            assert f"{policy}/{name}" in evaluation
    assert "dpo/win_rate_vs_sft/gold" in evaluation and "ppo/win_rate_vs_sft/rm" in evaluation
    for key in ("sft/gold_reward", "dpo/rm_score", "ppo/kl_per_token", "dpo/win_rate_vs_sft/gold", "grpo/win_rate_vs_sft/rm"):
        assert evaluation[f"{key}_ci_low"] <= evaluation[key] <= evaluation[f"{key}_ci_high"], key  # 95% bootstrap
    assert evaluation["n_prompts"] == 24 and evaluation["samples_per_prompt"] == 2  # 24 prompts x 2 samples
    samples = [json.loads(line) for line in (workspace / "reports" / "evaluate" / "samples.jsonl").read_text().splitlines()]
    sft_rows = [s for s in samples if s["policy"] == "sft"]
    assert [s["sample"] for s in sft_rows] == [0, 1, 0, 1] and sft_rows[0]["prompt"] == sft_rows[1]["prompt"] != sft_rows[2]["prompt"]
    for stage in ("ppo", "dpo", "grpo"):  # over-optimisation curves: the initial policy, then each evaluation
        rows = list(csv.DictReader((workspace / "plots" / stage / "overoptimization.csv").open()))
        assert rows[0]["step"] == "0" and len(rows) >= 2 and all(r["kl"] and r["proxy_reward"] and r["gold_reward"] for r in rows), stage
        assert (workspace / "plots" / stage / "overoptimization.png").stat().st_size > 0, stage
        summary = json.loads((workspace / "metrics" / f"{stage}.json").read_text())
        assert summary["overopt/peak_gold/step"] in {int(r["step"]) for r in rows}, stage
    promotion = json.loads((workspace / "metrics" / "promote.json").read_text())
    assert promotion["n_prompts"] == 24 and promotion["samples_per_prompt"] == 2
    assert "24 held-out prompts × 2 sample(s)" in (workspace / "reports" / "promote" / "decision.md").read_text()


def test_second_repro_runs_nothing(workspace, tracked_env):
    proc = repro(workspace, env=tracked_env)
    assert proc.returncode == 0, proc.stdout
    assert stages_run(proc.stdout) == set()
    assert status_clean(workspace), run(["dvc", "status"], workspace).stdout


def test_a_policy_switched_off_reruns_only_its_stage_and_is_left_out_of_evaluation(workspace, tracked_env):
    from tasks.params import apply_overrides
    from tasks.stage_host import hosted

    trained = (workspace / "models" / "grpo" / "model.safetensors").read_bytes()
    apply_overrides(workspace / "params.yaml", ["grpo.train=false"])
    # The module's first repro ran every command by itself (plain `dvc repro`); here a warm stage host starts them, as
    # `rlhf run` does: what DVC re-runs is the same either way.
    with hosted({**os.environ, **tracked_env}) as host:
        proc = repro(workspace, env={**tracked_env, **host})
        assert proc.returncode == 0, proc.stdout[-3000:]
    assert stages_run(proc.stdout) == {"grpo", "evaluate", "promote"}
    assert (workspace / "models" / "grpo" / "NOT_TRAINED").exists()
    assert json.loads((workspace / "metrics" / "grpo.json").read_text()) == {"trained": 0}
    evaluation = json.loads((workspace / "metrics" / "evaluate.json").read_text())
    assert not any(k.startswith("grpo/") for k in evaluation) and "dpo/gold_reward" in evaluation
    # Switched back on and retrained (not restored from the run cache, so MLflow's latest runs match the files): the same model.
    apply_overrides(workspace / "params.yaml", ["grpo.train=true"])
    with hosted({**os.environ, **tracked_env}) as host:
        proc = repro(workspace, "--no-run-cache", env={**tracked_env, **host})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (workspace / "models" / "grpo" / "model.safetensors").read_bytes() == trained
    run(["git", "commit", "-qam", "grpo off and on again"], workspace)


def _mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_every_stage_is_tracked_in_mlflow_with_curves_and_final_metrics(workspace, mlflow_server):
    client = _mlflow_client(mlflow_server)
    experiment = client.get_experiment_by_name("rlhf-pipeline")
    runs = client.search_runs([experiment.experiment_id], max_results=200)
    by_stage: dict[str, list] = {}
    for r in runs:
        by_stage.setdefault(r.data.tags.get("stage"), []).append(r)
    assert set(STAGES) <= set(by_stage)
    sft_run = by_stage["sft"][-1]
    history = client.get_metric_history(sft_run.info.run_id, "train/loss")
    assert len({m.step for m in history}) >= 3  # a curve, not a point
    assert "git.commit" in sft_run.data.tags and sft_run.data.params.get("sft.max_steps") == "12"
    assert any(k.startswith("dvc.hash.") for k in sft_run.data.tags)
    # the final metrics logged equal metrics/<stage>.json (the latest run of each stage)
    for stage in ("sft", "reward", "evaluate"):
        latest = max(by_stage[stage], key=lambda r: r.info.start_time)
        on_disk = json.loads((workspace / "metrics" / f"{stage}.json").read_text())
        for key, value in on_disk.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert latest.data.metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (stage, key)
    prepare_run = max(by_stage["prepare"], key=lambda r: r.info.start_time)
    inputs = client.get_run(prepare_run.info.run_id).inputs.dataset_inputs
    assert inputs and all(d.dataset.digest for d in inputs)
    validate_run = max(by_stage["validate"], key=lambda r: r.info.start_time)
    assert any(a.path == "validation" for a in client.list_artifacts(validate_run.info.run_id))


def test_final_policy_is_registered_with_lineage_and_loads_back(workspace, mlflow_server):
    import mlflow
    import torch

    client = _mlflow_client(mlflow_server)
    version = client.get_model_version_by_alias("rlhf-policy", "champion")  # crowned by the first run or the grpo off-and-on re-run
    assert version.tags["promotion.decision"] == "promoted" and version.tags["promotion.against"] in ("reference", "champion")
    first = client.get_model_version("rlhf-policy", "1")
    assert first.tags["promotion.against"] == "reference"  # no champion before the first run: the absolute gate
    for tag in ("git.commit", "data.digest", "params.hash", "policy"):
        assert version.tags.get(tag), tag
    mlflow.set_tracking_uri(mlflow_server)
    try:
        loaded = mlflow.transformers.load_model("models:/rlhf-policy@champion", return_type="components")
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    from rlhf_core.models import load_causal_lm

    on_disk = load_causal_lm(str(workspace / "models" / version.tags["policy"]))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded["model"](ids).logits, on_disk(ids).logits, atol=1e-5)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_dvc_push_to_s3_and_pull_into_a_fresh_clone(workspace, s3_server, tmp_path):
    import boto3

    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket="rlhf-dvc")
    run(["dvc", "remote", "add", "s3", "s3://rlhf-dvc/pipeline"], workspace)
    run(["dvc", "remote", "modify", "s3", "endpointurl", s3_server], workspace)
    run(["git", "commit", "-qam", "s3 remote"], workspace)
    config = (workspace / ".dvc" / "config").read_text()
    assert "secret" not in config.lower() and "access_key" not in config.lower()  # credentials only from env
    run(["dvc", "push", "-r", "s3"], workspace)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(workspace), str(clone)], tmp_path)
    assert not (clone / "models" / "dpo").exists()
    run(["dvc", "pull", "-r", "s3"], clone)
    for rel in ("models/dpo/model.safetensors", "models/sft/model.safetensors", "data/prepared/pref_train.jsonl"):
        assert _md5(clone / rel) == _md5(workspace / rel), rel
    # metrics (cache: false) live in git, outputs came from S3: nothing left to do
    assert status_clean(clone), run(["dvc", "status"], clone).stdout
