"""The scheduled story, end to end: real `prefect server` + process workers, real `mlflow server`, real DVC.

A workspace whose preference data is an external file (a "bucket" that new data lands in) is
deployed from prefect.yaml. Runs go through the deployments and a process worker, each isolated
from the workspace's git HEAD, and are read back from MLflow (which stages ran = which stage runs
the parent run has; the decision = the parent's ``promotion.*`` tags; the champion = the alias):

1. trains everything and crowns a champion;
2. with no new data re-runs no training stage and keeps the champion;
3. after new data lands re-trains and moves ``@champion`` only if the challenger wins;
4. two on-demand runs at once (different overrides) both finish, each with its own parameters, and, with
   criteria that make their challengers lose (a win rate of 1.0 at 99% confidence), leave the alias where it
   was and the workspace's params.yaml untouched;
then `rlhf status` shows it all, `rlhf promote --force` overrides, and `rlhf reproduce` of run 1
restores run 1's data from the DVC remote after the source file is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import prefect_cli
from tests.workspace_factory import make_workspace

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TRAINING = {"sft", "reward", "ppo", "dpo"}
EXPERIMENT, MODEL = "recurring-story", "recurring-policy"


def _write_preferences(dest: Path, seed: int) -> None:
    from rlhf_core.synthetic import generate_task

    scratch = dest.parent / f"syn-{seed}"
    generate_task(scratch, seed=seed, n_sft=240, n_pref_train=160, n_pref_test=48, n_prompts=24, temperature=0.2)
    shutil.copy(scratch / "preferences_train.jsonl", dest)


class Story:
    def __init__(self, ws: Path, env: dict, api, mlflow_uri: str) -> None:
        from mlflow import MlflowClient

        self.ws, self.env, self.api = ws, env, api
        self.client = MlflowClient(mlflow_uri)
        self.deployments = {d["name"]: d for d in api.post("/deployments/filter", json={}).json()}

    def run(self, deployment: str, pool: str, *, overrides: list[str] | None = None, concurrent: int = 1) -> list[dict]:
        """Create ``concurrent`` flow runs of a deployment, let one worker run them all, return each run's record."""
        ids = []
        for i in range(concurrent):
            params = {"workspace": str(self.ws), "push": True, "overrides": (overrides or [[]])[i] if concurrent > 1 else overrides or []}
            ids.append(self.create_flow_run(deployment, params))
        prefect_cli(["worker", "start", "--pool", pool, "--run-once", "--limit", str(concurrent)], self.env, self.ws, timeout=600)
        return [self.record(fid) for fid in ids]

    def create_flow_run(self, deployment: str, params: dict) -> str:
        """A flow run of ``deployment``; a server error (its SQLite database busy under a loaded machine) is retried."""
        import time

        for attempt in range(4):
            response = self.api.post(f"/deployments/{self.deployments[deployment]['id']}/create_flow_run",
                                     json={"parameters": params})
            if response.status_code < 500:
                break
            time.sleep(2 ** attempt)
        assert response.status_code == 201, f"create_flow_run: HTTP {response.status_code}: {response.text[-2000:]}"
        return response.json()["id"]

    def record(self, flow_run_id: str) -> dict:
        state = self.api.get(f"/flow_runs/{flow_run_id}").json()["state"]
        if state["type"] != "COMPLETED":
            logs = self.api.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}).json()
            pytest.fail(f"flow run {state['type']}: {state.get('message')}\n" + "\n".join(x["message"][-2000:] for x in logs[-40:]))
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        [parent] = self.client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        children = self.client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        return {"parent": parent, "tags": parent.data.tags, "ran": {c.data.tags["stage"] for c in children}}

    def champion(self):
        from tasks.registry import version_by_alias

        return version_by_alias(self.client, MODEL)


@pytest.fixture(scope="module")
def story(tmp_path_factory, mlflow_server, prefect_server):
    import httpx

    base = tmp_path_factory.mktemp("recurring")
    incoming = base / "incoming"
    incoming.mkdir()
    _write_preferences(incoming / "prefs.jsonl", seed=0)
    # Its own experiment and model name: other modules register into the same session-wide MLflow server.
    ws = make_workspace(base / "ws", [f"prepare.preference_data={incoming / 'prefs.jsonl'}",
                                      f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={MODEL}"])
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RLHF_WORKSPACE": str(ws), "MLFLOW_TRACKING_URI": mlflow_server,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect_cli(["work-pool", "create", "cpu", "--type", "process"], env, ws)
    prefect_cli(["work-pool", "create", "gpu", "--type", "process", "--base-job-template",
                 str(ROOT / "infra" / "prefect" / "gpu-process-template.json")], env, ws)
    prefect_cli(["--no-prompt", "deploy", "--all"], env, ws)
    return Story(ws, env, httpx.Client(base_url=prefect_server, timeout=30), mlflow_server), incoming


@pytest.fixture(scope="module")
def runs(story):
    """The runs of the story, in order (later tests read them)."""
    s, incoming = story
    params_before = (s.ws / "params.yaml").read_bytes()
    out = {"run1": s.run("nightly", "gpu")[0], "champion1": s.champion()}
    out["run2"] = s.run("nightly", "gpu")[0]
    out["champion2"] = s.champion()
    _write_preferences(incoming / "prefs.jsonl", seed=1)  # new data lands at the same path
    out["run3"] = s.run("nightly", "gpu")[0]
    out["champion3"] = s.champion()
    # Two on-demand runs at once, each with its own DPO beta and criteria no challenger can meet (a win rate of 1.0 at
    # 99% confidence): both must lose, leave the alias and leave the workspace's params.yaml alone.
    losing = ["promote.min_win_rate=1.0", "promote.confidence=0.99"]
    out["concurrent"] = s.run("on-demand", "cpu", overrides=[["dpo.beta=0.2", *losing], ["dpo.beta=0.3", *losing]], concurrent=2)
    out["run4"] = out["concurrent"][0]
    out["champion4"] = s.champion()
    # Snapshot the losing version's tags now: a later test forces this version to champion (tests run in random order).
    out["loser4_tags"] = s.client.get_model_version(MODEL, out["run4"]["tags"]["promotion.challenger_version"]).tags
    out["params_after_on_demand"] = (s.ws / "params.yaml").read_bytes()
    out["params_before"] = params_before
    return out


def test_deployments_register_with_schedules_pools_and_isolation(story):
    s, _ = story
    nightly, on_demand = s.deployments["nightly"], s.deployments["on-demand"]
    assert nightly["work_pool_name"] == "gpu" and on_demand["work_pool_name"] == "cpu"
    assert [x["schedule"]["cron"] for x in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert nightly["parameters"]["ref"] == "HEAD" and on_demand["parameters"]["ref"] == "HEAD"
    assert not on_demand["schedules"]


def test_first_run_trains_everything_and_crowns_a_champion(runs):
    run1 = runs["run1"]
    assert TRAINING | {"ingest", "prepare", "validate", "evaluate", "promote"} <= run1["ran"]
    assert run1["tags"]["promotion.decision"] == "promoted" and run1["tags"]["promotion.against"] == "reference"
    assert run1["tags"]["run.mode"] == "isolated from HEAD"
    assert run1["tags"]["source.preference.uri"].endswith("prefs.jsonl") and run1["tags"]["source.preference.digest"]
    champion = runs["champion1"]
    assert champion is not None and champion.tags["pipeline.run_id"] == run1["parent"].info.run_id
    assert run1["parent"].data.metrics["ingest/sources/preference/rows"] == 160


def test_a_run_without_new_data_trains_nothing_and_keeps_the_champion(runs):
    run2 = runs["run2"]
    assert run2["ran"] == {"ingest"}, run2["ran"]  # every other stage restored from the shared DVC cache
    assert run2["tags"]["promotion.decision"].startswith("unchanged")
    assert runs["champion2"].version == runs["champion1"].version
    assert run2["tags"]["source.preference.digest"] == runs["run1"]["tags"]["source.preference.digest"]


def test_new_data_retrains_and_the_alias_moves_only_on_a_win(runs):
    run3 = runs["run3"]
    assert TRAINING | {"prepare", "promote"} <= run3["ran"]
    assert run3["tags"]["source.preference.digest"] != runs["run1"]["tags"]["source.preference.digest"]
    assert run3["tags"]["promotion.against"] == "champion"
    assert run3["tags"]["promotion.previous_champion"] == runs["champion1"].version
    if run3["tags"]["promotion.decision"] == "promoted":
        assert runs["champion3"].version == run3["tags"]["promotion.challenger_version"] != runs["champion1"].version
    else:
        assert runs["champion3"].version == runs["champion1"].version


def test_a_losing_challenger_leaves_the_alias_and_the_decision_is_recorded(story, runs):
    s, _ = story
    for run4 in runs["concurrent"]:
        assert run4["tags"]["promotion.decision"] == "kept" and run4["tags"]["promotion.against"] == "champion"
        assert "win rate" in run4["tags"]["promotion.reasons"]
    run4 = runs["run4"]
    assert runs["champion4"].version == runs["champion3"].version
    loser = runs["loser4_tags"]
    assert loser["promotion.decision"] == "kept" and loser["promotion.previous_champion"] == runs["champion3"].version
    report = s.client.download_artifacts(run4["parent"].info.run_id, "promotion/decision.md")
    assert "KEPT the current champion" in Path(report).read_text()


def test_on_demand_overrides_stay_in_their_run(runs, story):
    s, _ = story
    assert runs["params_after_on_demand"] == runs["params_before"]  # the workspace's params.yaml is untouched
    assert runs["run4"]["parent"].data.params["promote.min_win_rate"] == "1.0"
    assert runs["run3"]["parent"].data.params["promote.min_win_rate"] == "0"
    assert not list((s.ws / ".rlhf" / "runs").iterdir())  # finished runs leave no checkout behind


def test_two_runs_at_once_do_not_interfere(runs):
    first, second = runs["concurrent"]
    betas = {first["parent"].data.params["dpo.beta"], second["parent"].data.params["dpo.beta"]}
    assert betas == {"0.2", "0.3"}
    for record in (first, second):
        assert {"dpo", "evaluate", "promote"} <= record["ran"] and not {"sft", "reward", "ppo"} & record["ran"]
    assert first["parent"].data.metrics["dpo/eval/loss"] != second["parent"].data.metrics["dpo/eval/loss"]


def _rlhf(args: list[str], story) -> str:
    s, _ = story
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args, "--workspace", str(s.ws)], env=s.env, cwd=ROOT,
                          text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_status_shows_the_champion_and_every_decision_and_force_overrides(story, runs):
    s, _ = story
    out = _rlhf(["status", "--last", "10"], story)
    assert f"@champion is version {s.champion().version}" in " ".join(out.split())
    assert "kept" in out and "promoted" in out and "unchanged" in out
    loser = runs["run4"]["parent"].info.run_id
    out = _rlhf(["promote", loser, "--force"], story)
    forced = runs["run4"]["tags"]["promotion.challenger_version"]
    assert s.champion().version == forced
    assert s.client.get_model_version(MODEL, forced).tags["promotion.decision"] == "forced"
    assert s.client.get_run(loser).data.tags["promotion.decision"].startswith("forced")


def test_reproduce_restores_the_first_runs_data_after_the_source_is_gone(story, runs, tmp_path):
    from tasks.reproduce import reproduce

    s, incoming = story
    (incoming / "prefs.jsonl").unlink()
    run1 = runs["run1"]
    rebuilt = tmp_path / "rebuild"
    report = reproduce(s.ws, run1["parent"].info.run_id, tracking={"uri": s.env["MLFLOW_TRACKING_URI"]}, worktree=rebuilt)
    assert report.outputs_match_lock and report.matches
    manifest = json.loads((rebuilt / "data" / "sources" / "manifest.json").read_text())
    from tasks.ingest import file_digest

    assert file_digest(manifest["preference"]["files"]) == run1["tags"]["source.preference.digest"]
    # Recompute prepare from the restored snapshot: the same prepared data as run 1, byte for byte.
    proc = subprocess.run(["dvc", "repro", "--force", "--single-item", "prepare"], cwd=rebuilt, text=True, capture_output=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{rebuilt / 'mlflow.db'}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tasks.reproduce import lock_out_hashes

    record = s.client.download_artifacts(run1["parent"].info.run_id, "pipeline/dvc.lock", str(tmp_path))
    assert lock_out_hashes(rebuilt / "dvc.lock")["data/prepared"] == lock_out_hashes(Path(record))["data/prepared"]
