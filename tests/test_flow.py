"""The Prefect alignment flow under `prefect_test_harness`: it runs DVC, owns the parent MLflow run,
applies overrides, pushes to the DVC remote, fails loudly and safely, and runs can be reproduced
and compared."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_core import metrics as M
from tasks.dvc_ops import status_clean
from tests.workspace_factory import make_workspace, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def flow_ws(tmp_path_factory, prefect_harness) -> Path:
    """A workspace on which the flow has run once (tracking to its own SQLite MLflow store)."""
    ws = make_workspace(tmp_path_factory.mktemp("flow") / "ws")
    return ws


@pytest.fixture(scope="module")
def first_run(flow_ws, monkeypatch_module):
    from flows.alignment import alignment_flow

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tests.canary import CANARY_ENV

    for key, value in CANARY_ENV.items():  # secrets in the run's environment: test_no_secret_reaches_any_store
        monkeypatch_module.setenv(key, value)
    result = alignment_flow(workspace=str(flow_ws))
    run(["git", "add", "-A"], flow_ws)
    run(["git", "commit", "-qm", "after first run"], flow_ws)
    return result


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def beta_run(flow_ws, first_run):
    """A second pipeline run with ``dpo.beta=0.3`` (committed): what the override and compare tests look at,
    whichever of them runs first."""
    from flows.alignment import alignment_flow

    result = alignment_flow(workspace=str(flow_ws), overrides=["dpo.beta=0.3"])
    run(["git", "commit", "-qam", "dpo.beta=0.3"], flow_ws)
    return result


def _parent(flow_ws: Path, run_id: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{flow_ws / 'mlflow.db'}").get_run(run_id)


def test_flow_runs_every_stage_and_summarises_on_the_parent_run(flow_ws, first_run):
    stages = [s["stage"] for s in first_run["stages"]]
    assert stages == ["ingest", "prepare", "validate", "sft", "reward", "ppo", "dpo", "grpo", "evaluate", "promote"]  # dvc.yaml order
    assert all(s["ran"] for s in first_run["stages"])
    parent = _parent(flow_ws, first_run["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["git.commit"] != "unknown"
    evaluation = first_run["metrics"]["evaluate"]  # what this run wrote (later tests rewrite the workspace's file)
    assert parent.data.metrics["evaluate/dpo/gold_reward"] == pytest.approx(evaluation["dpo/gold_reward"])
    assert parent.data.params["dpo.beta"] == "0.1"
    # stage runs are nested under the parent
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{flow_ws / 'mlflow.db'}")
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {c.data.tags["stage"] for c in children} == set(stages)
    # pushed to the local DVC remote
    assert any((flow_ws.parent / "ws-remote").rglob("*"))
    # the compute share: the loops' seconds of the stages that ran, over the run's wall time
    share = first_run["compute"]
    trained = [first_run["metrics"][s["stage"]][M.COMPUTE_SECONDS] for s in first_run["stages"] if s["stage"] in ("sft", "reward", "dpo")]
    assert all(c > 0 for c in trained)
    assert sum(trained) <= share[M.PIPELINE_COMPUTE_SECONDS] + 0.1 < share[M.PIPELINE_WALL_SECONDS]  # (rounding)
    assert parent.data.metrics[M.PIPELINE_COMPUTE_SHARE] == pytest.approx(share[M.PIPELINE_COMPUTE_SHARE])
    assert share[M.PIPELINE_COMPUTE_SHARE] == pytest.approx(share[M.PIPELINE_COMPUTE_SECONDS] / share[M.PIPELINE_WALL_SECONDS], abs=1e-3)


def test_second_run_skips_every_stage_and_dvc_has_nothing_to_do(flow_ws, first_run):
    from flows.alignment import alignment_flow

    result = alignment_flow(workspace=str(flow_ws))
    assert not any(s["ran"] for s in result["stages"] if s["stage"] != "ingest")  # ingest always checks the sources
    assert status_clean(flow_ws)
    assert result["compute"][M.PIPELINE_COMPUTE_SECONDS] == 0  # nothing trained or sampled: no compute this time


def test_override_reruns_only_the_affected_stages(flow_ws, beta_run):
    ran = {s["stage"] for s in beta_run["stages"] if s["ran"]}
    assert ran == {"ingest", "dpo", "evaluate", "promote"}
    assert "beta: 0.3" in (flow_ws / "params.yaml").read_text()
    assert _parent(flow_ws, beta_run["parent_run_id"]).data.params["dpo.beta"] == "0.3"


def test_reproduce_reports_matching_metrics(flow_ws, first_run, tmp_path):
    from tasks.reproduce import reproduce

    parent_id = first_run["parent_run_id"]
    params_before = (flow_ws / "params.yaml").read_text()
    report = reproduce(flow_ws, parent_id, worktree=tmp_path / "rebuild")
    assert report.outputs_match_lock
    assert report.checks and all(c.status in ("match", "timing") for c in report.checks), [
        c for c in report.checks if c.status not in ("match", "timing")
    ]
    assert report.matches
    # the user's workspace was not touched by the rebuild
    assert (flow_ws / "params.yaml").read_text() == params_before
    run(["git", "worktree", "remove", "--force", str(tmp_path / "rebuild")], flow_ws)


def test_reproduce_with_recompute_retrains_and_matches_exactly_on_cpu(flow_ws, first_run, tmp_path):
    from tasks.reproduce import reproduce

    report = reproduce(flow_ws, first_run["parent_run_id"], recompute=True, worktree=tmp_path / "recompute")
    differing = [c for c in report.checks if c.status not in ("match", "timing")]
    assert not differing, differing
    assert report.outputs_match_lock  # the retrained models hash exactly like the originals
    assert any(c.name == "dpo/eval/loss" and c.status == "match" for c in report.checks)
    run(["git", "worktree", "remove", "--force", str(tmp_path / "recompute")], flow_ws)


def test_compare_shows_the_differing_parameter(flow_ws, first_run, beta_run):
    from tasks.compare import compare, pipeline_runs

    runs = pipeline_runs(flow_ws, None, last=10)
    table = compare(runs)
    assert "dpo.beta" in table.differing_params
    assert set(table.differing_params["dpo.beta"]) >= {"0.1", "0.3"}
    assert "evaluate/dpo/gold_reward" in table.metrics


def test_a_failing_stage_fails_the_flow_names_it_and_keeps_earlier_outputs(flow_ws, first_run):
    from flows.alignment import alignment_flow
    from tasks.dvc_ops import StageFailed
    from tasks.params import ParamsError

    before = (flow_ws / "models" / "sft" / "model.safetensors").read_bytes()
    params_before = (flow_ws / "params.yaml").read_text()
    # A value no stage accepts is refused before anything runs, and params.yaml is not touched.
    with pytest.raises(ParamsError, match="reward: learning_rate must be > 0"):
        alignment_flow(workspace=str(flow_ws), overrides=["reward.learning_rate=-1"], push=False)
    assert (flow_ws / "params.yaml").read_text() == params_before
    # A learning rate that makes only the reward stage diverge: prepare..sft are untouched, reward fails, naming the step.
    with pytest.raises(StageFailed) as info:
        alignment_flow(workspace=str(flow_ws), overrides=["reward.learning_rate=1e30"], push=False)
    assert info.value.stage == "reward"
    assert "reward" in str(info.value) and "training diverged at optimizer step" in str(info.value)
    assert (flow_ws / "models" / "sft" / "model.safetensors").read_bytes() == before
    # The failed stage's previous outputs are in the DVC cache (models) and git (metrics): nothing is lost.
    # (dvc.lock too: ingest ran before the failure and recorded its new metrics file, which holds its timing.)
    run(["git", "checkout", "--", "params.yaml", "metrics", "dvc.lock"], flow_ws)
    run(["dvc", "checkout"], flow_ws)
    assert list((flow_ws / "models" / "reward").glob("*.safetensors"))
    assert status_clean(flow_ws)


def test_no_secret_reaches_any_store(flow_ws, first_run):
    """Issue 14 item 7: the first run had canary values for the AWS keys and the MLflow and Hugging Face tokens in its
    environment (and so had every stage process); none of them is in any store the run wrote: the workspace
    (params.yaml, dvc.lock, metrics, plots, reports, logs, .rlhf, the DVC cache, git), the DVC remote, the MLflow
    store (SQLite database and artifacts), the Prefect server's database (flow and task runs, their logs) and
    Prefect's result storage. Searched raw and decoded (tests/canary.py)."""
    import os
    from urllib.parse import unquote, urlparse

    from mlflow.tracking import MlflowClient
    from prefect.settings import get_current_settings

    from tests.canary import CANARY_ENV, search

    assert all(os.environ[key] == value for key, value in CANARY_ENV.items())  # what the run's processes inherited
    client = MlflowClient(f"sqlite:///{flow_ws / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    artifacts = {Path(unquote(urlparse(uri).path)) for uri in [
        *(r.info.artifact_uri for r in client.search_runs(experiments)),
        *(m.artifact_location for m in client.search_logged_models(experiments))]}
    artifacts = {a for a in artifacts if a.exists()}  # a run that logged no file has no folder
    settings = get_current_settings()
    prefect_db = Path(settings.server.database.connection_url.get_secret_value().split(":///", 1)[1])
    stores = [flow_ws, flow_ws.parent / "ws-remote", prefect_db.parent,
              *(a for a in artifacts if not a.is_relative_to(flow_ws)),
              *([settings.results.local_storage_path] if settings.results.local_storage_path.exists() else [])]
    found = search(stores, CANARY_ENV)
    assert not found.hits, "\n".join(map(str, found.hits))
    # The search saw what the run wrote there: the run's own records are found by the same search.
    parent = first_run["parent_run_id"]
    assert search([flow_ws / "mlflow.db"], {"parent run id": parent}).hits
    assert search([prefect_db.parent], {"a stage's log line": "stage sft ran in"}).hits  # the flow run's logs
    assert {flow_ws / "params.yaml", flow_ws / "dvc.lock", prefect_db} <= set(found.files)
    assert any(".dvc/cache" in str(p) for p in found.files) and any("ws-remote" in str(p) for p in found.files)
    assert any(str(a) in str(p) for a in artifacts for p in found.files)  # MLflow's artifacts
