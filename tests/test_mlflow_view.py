"""The MLflow view a team opens (issue 15 item 4): the experiment's view tag and the parent run's links.

Against a real ``mlflow server`` (``tests.servers``), without a pipeline run: the closing step of the flow
(``tasks.parent_run.close_parent_run``) runs on a small prepared workspace (metrics, plots, prepared data), with
a model version registered the way ``promote`` registers one. Then the parent run must hold the datasets it used,
the registered version (as MLflow's UI finds it: the version's logged model among the run's outputs, listed in the
logged model's ``mlflow.modelVersions``), the one-page report and the headline charts; also when the server was
down at the end and ``rlhf sync`` sent the calls later. The pure parts (the report page, the metric sections, the
dataset list) are checked without a server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

from rlhf_core import metrics as M
from tasks.parent_run import (
    ML_VIEW,
    MLFLOW_RUN_NOTE,
    REPORT_PATH,
    close_parent_run,
    headline_metrics,
    open_parent_run,
    parent_datasets,
    run_description,
    ui_paths,
)
from tasks.run_report import Plot, cell, plot_files, policies_in, report_html
from tasks.tracking.client import EXPERIMENT_TAGS, PARENT_RUN_ENV, connect
from tasks.tracking.dvc_hash import dvc_md5
from tasks.tracking.outage import REGISTERED_MODEL_TAGS, pending_journals

EVALUATION = {
    "n_prompts": 200, "samples_per_prompt": 1,
    "sft/gold_reward": 1.617, "sft/gold_reward_ci_low": 1.566, "sft/gold_reward_ci_high": 1.666,
    "sft/kl_per_token": 0.0, "sft/kl_per_token_ci_low": 0.0, "sft/kl_per_token_ci_high": 0.0, "sft/rm_score": -0.328,
    "dpo/gold_reward": 1.774, "dpo/gold_reward_ci_low": 1.722, "dpo/gold_reward_ci_high": 1.82,
    "dpo/kl_per_token": 0.0699, "dpo/kl_per_token_ci_low": 0.0495, "dpo/kl_per_token_ci_high": 0.0897,
    "dpo/win_rate_vs_sft/gold": 0.695, "dpo/win_rate_vs_sft/gold_ci_low": 0.645, "dpo/win_rate_vs_sft/gold_ci_high": 0.7425,
    "kto/gold_reward": 1.7, "ppo/gold_reward": 1.799, "ppo/distinct_2": 0.873,
}
PROMOTION = {"decision": "kept", "policy": "dpo", "against": "champion", "metric": "gold_reward", "n_prompts": 200,
             "promoted": 0, "win_rate": 0.4425, "mean_diff": -0.0399, "ci_low": -0.0564, "ci_high": -0.0255,
             "kl_per_token": 0.0699, "previous_champion": 1, "challenger_version": 5, "champion_version": 1,
             "reasons": ["win rate 0.443 < 0.55 against the champion", "a <b>bold</b> claim & more"]}
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def _project(root: Path, *, promotion: dict | None = PROMOTION) -> Path:
    """A workspace as a finished run leaves it, in small: metrics, an evaluation plot, prepared data, a source."""
    (root / "metrics").mkdir(parents=True)
    (root / "metrics" / "evaluate.json").write_text(json.dumps(EVALUATION))
    if promotion is not None:
        (root / "metrics" / "promote.json").write_text(json.dumps(promotion))
    (root / "metrics" / "ingest.json").write_text(json.dumps({"sources": {"preference": {
        "uri": "s3://bucket/prefs.jsonl", "digest": "0123456789abcdef0123456789abcdef", "rows": 3}}}))
    (root / "metrics" / "sft.json").write_text('{"eval": {"loss": 1.25}}')
    (root / "plots" / "evaluate").mkdir(parents=True)
    (root / "plots" / "evaluate" / "reward_vs_kl.png").write_bytes(PNG)
    (root / "plots" / "ppo").mkdir()
    (root / "plots" / "ppo" / "overoptimization.png").write_bytes(PNG[:-1] + b"\x82")
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "sft_train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    (prepared / "pref_test.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    (prepared / "prompts.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n\n{"prompt": "c"}\n')
    (root / "params.yaml").write_text("dpo:\n  beta: 0.1\n")
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    return root


# --------------------------------------------------------------------------- no server needed


def test_policy_table_cells_carry_their_intervals_and_policies_come_in_pipeline_order():
    assert policies_in(EVALUATION) == ["sft", "ppo", "dpo", "kto"]
    assert cell(EVALUATION, "dpo", M.GOLD_REWARD) == "1.774 [1.722, 1.820]"
    assert cell(EVALUATION, "dpo", M.WIN_RATE_VS_SFT_GOLD) == "0.695 [0.645, 0.743]"
    assert cell(EVALUATION, "sft", M.KL_PER_TOKEN) == "0.000"  # a [0, 0] interval of the reference itself is not shown
    assert cell(EVALUATION, "sft", M.RM_SCORE) == "-0.328"  # no interval recorded
    assert cell(EVALUATION, "ppo", M.KL_PER_TOKEN) == "-"


def test_report_page_holds_the_table_the_plots_the_decision_and_the_data_escaped():
    plots = [Plot("evaluate/reward_vs_kl", PNG), Plot("ppo/overoptimization", b"\x89PNG-other")]
    datasets = [{"name": "data/prepared/sft_train.jsonl", "context": "training", "rows": 2, "digest": "abc",
                 "source": "/w/data/prepared/sft_train.jsonl"}]
    page = report_html(EVALUATION, promotion=PROMOTION, datasets=datasets, plots=plots, facts=[("parent run", "r1")],
                       model_name="rlhf-policy")

    rows = re.findall(r"<tr><td>(\w+)</td>", page)
    assert rows[:4] == ["sft", "ppo", "dpo", "kto"]
    assert "<td>1.774<br><small>[1.722, 1.820]</small></td>" in page
    assert "<td>0.695<br><small>[0.645, 0.743]</small></td>" in page
    assert "On 200 held-out prompts" in page
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert [base64.b64decode(i) for i in images] == [p.png for p in plots]
    assert page.index("evaluate/reward_vs_kl") < page.index("ppo/overoptimization")
    assert "kept the current champion" in page and "rlhf-policy version 5" in page
    assert "a &lt;b&gt;bold&lt;/b&gt; claim &amp; more" in page and "<b>bold" not in page
    assert "data/prepared/sft_train.jsonl" in page and "<td>training</td>" in page


def test_report_page_says_when_promotion_did_not_run_and_when_there_is_no_evaluation():
    page = report_html({}, promotion=PROMOTION, promotion_ran=False)
    assert "No evaluation in this run" in page
    assert "Unchanged" in page and "kept the current champion" not in page
    assert "No promotion in this run" in report_html(EVALUATION)


def test_plot_files_put_the_evaluation_first(tmp_path):
    project = _project(tmp_path)
    (project / "plots" / "dpo").mkdir()
    (project / "plots" / "dpo" / "curve.png").write_bytes(PNG)
    assert [p.relative_to(project / "plots").as_posix() for p in plot_files(project / "plots")] == [
        "evaluate/reward_vs_kl.png", "dpo/curve.png", "ppo/overoptimization.png"]


def _ui_section(metric: str) -> str:
    """The chart section MLflow's UI puts a metric in: its name up to the last "/" (extractChartSectionName)."""
    return metric.rsplit("/", 1)[0] if "/" in metric else "Model metrics"


def test_headline_sections_come_before_every_stage_section_in_mlflow_order():
    logged = {f"evaluate/{k}": v for k, v in EVALUATION.items()}
    logged.update({"dpo/data/eval/n_input": 400.0, "prepare/rows/sft_train": 10.0, "sft/eval/loss": 1.2})
    headline = headline_metrics(logged)
    assert headline == {"1_gold_reward/sft": 1.617, "1_gold_reward/dpo": 1.774, "1_gold_reward/kto": 1.7,
                        "1_gold_reward/ppo": 1.799, "2_rm_score/sft": -0.328, "3_kl_per_token/sft": 0.0,
                        "3_kl_per_token/dpo": 0.0699, "4_win_rate_vs_sft_gold/dpo": 0.695}
    # The UI sorts the sections by name (JavaScript's sort and localeCompare agree here: digits before letters).
    sections = sorted({_ui_section(k) for k in {**headline, **logged}})
    assert sections[:4] == ["1_gold_reward", "2_rm_score", "3_kl_per_token", "4_win_rate_vs_sft_gold"]
    stages = {s for s in sections if not s[0].isdigit()}
    assert all(s[0].isalpha() for s in stages) and all(h[0].isdigit() for h in M.PARENT_HEADLINE.values())
    assert sorted(M.PARENT_HEADLINE.values()) == list(M.PARENT_HEADLINE.values())  # reward, then KL, then win rates


def test_parent_datasets_name_each_split_and_source_with_dvc_digests(tmp_path):
    project = _project(tmp_path)
    datasets = {d["name"]: d for d in parent_datasets(project)}

    assert list(datasets) == ["data/prepared/sft_train.jsonl", "data/prepared/pref_test.jsonl", "data/prepared/prompts.jsonl",
                              "data/sources/preference"]
    for name in list(datasets)[:3]:
        assert datasets[name]["digest"] == dvc_md5(project / name)  # the hash DVC records for the file
        assert json.loads(datasets[name]["source"]) == {"uri": str(project / name)}
    assert [datasets[n]["context"] for n in datasets] == ["training", "validation", "evaluation", "source"]
    assert [json.loads(d["profile"])["num_rows"] for d in datasets.values()] == [2, 1, 3, 3]
    source = datasets["data/sources/preference"]
    assert (source["digest"], source["source_type"], json.loads(source["source"])) == (
        "0123456789abcdef0123456789abcdef", "s3", {"uri": "s3://bucket/prefs.jsonl"})


def test_run_description_links_the_report_and_the_registered_version():
    paths = ui_paths("7", "abc")
    assert paths["experiment"] == f"#/experiments/7/runs?{ML_VIEW}"
    assert paths["report"] == f"#/experiments/7/runs/abc/artifacts/{REPORT_PATH}?{ML_VIEW}"
    text = run_description(EVALUATION, PROMOTION, ran=True, datasets=[], registered_model="rlhf-policy", paths=paths)
    assert f"[one-page report]({paths['report']})" in text
    assert "registered `rlhf-policy` version 5 ([open](#/models/rlhf-policy/versions/5))" in text
    assert "dpo 1.774 [1.722, 1.820] / 0.070 [0.050, 0.090]" in text
    unchanged = run_description({}, PROMOTION, ran=False, datasets=[], registered_model="m", paths=None)
    assert "unchanged" in unchanged and "versions/5" not in unchanged and "report" not in unchanged


# --------------------------------------------------------------------------- a real mlflow server


def _tiny_policy():
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "a", "b"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(words), n_positions=8, n_embd=8, n_layer=1, n_head=1, bos_token_id=1, eos_token_id=1,
                        pad_token_id=0)
    return GPT2LMHeadModel(config).eval(), tokenizer


def _run_pipeline_end(project: Path, tracking: dict, model_name: str, monkeypatch):
    """Open a parent run and register a version from a child ``promote`` run, as the flow and the stage do."""
    from tasks.registry import register_model
    from tasks.tracking.stage_run import stage_run

    parent = open_parent_run(project, tracking, run_name="pipeline-view", tags={"git.commit": "abc"})
    with monkeypatch.context() as env:
        env.setenv(PARENT_RUN_ENV, parent)
        with stage_run("promote", {}, project_dir=project, tracking=tracking) as tracker:
            model, tokenizer = _tiny_policy()
            version = register_model(tracker.client, tracker.run_id, model, tokenizer, model_name,
                                     {"pipeline.run_id": parent, "policy": "dpo"})
    (project / "metrics" / "promote.json").write_text(json.dumps({**PROMOTION, "challenger_version": int(version.version)}))
    return parent, version, tracker.run_id


def _assert_linked(client, parent: str, version, promote_run: str, model_name: str, tmp_path: Path) -> None:
    run = client.get_run(parent)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"data/prepared/sft_train.jsonl", "data/prepared/pref_test.jsonl", "data/prepared/prompts.jsonl",
                           "data/sources/preference"}
    train = inputs["data/prepared/sft_train.jsonl"]
    expected_md5 = hashlib.md5((tmp_path / "project" / "data" / "prepared" / "sft_train.jsonl").read_bytes()).hexdigest()
    assert train.dataset.digest == expected_md5
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    # the registered version, where MLflow's UI looks for it (run outputs -> logged model -> mlflow.modelVersions)
    (logged,) = [o.model_id for o in client.get_run(promote_run).outputs.model_outputs]
    assert [o.model_id for o in run.outputs.model_outputs] == [logged]
    listed = json.loads(client.get_logged_model(logged).tags["mlflow.modelVersions"])
    assert [(e["name"], str(e["version"])) for e in listed] == [(model_name, str(version.version))]
    assert [run.data.tags[k] for k in REGISTERED_MODEL_TAGS] == [model_name, str(version.version),
                                                                 f"models:/{model_name}/{version.version}"]
    # headline charts, the report, the description
    assert run.data.metrics["1_gold_reward/dpo"] == run.data.metrics["evaluate/dpo/gold_reward"] == 1.774
    assert run.data.metrics["3_kl_per_token/dpo"] == 0.0699
    page = Path(client.download_artifacts(parent, REPORT_PATH, str(tmp_path / f"dl-{parent}"))).read_text()
    assert "<td>1.774<br><small>[1.722, 1.820]</small></td>" in page
    assert page.count("src='data:image/png;base64,") == 2
    assert f"{model_name} version {version.version}" in page and "s3://bucket/prefs.jsonl" in page
    assert f"[open](#/models/{model_name}/versions/{version.version})" in run.data.tags[MLFLOW_RUN_NOTE]
    assert run.info.status == "FINISHED"


def test_the_experiment_opens_on_the_training_view_and_the_parent_run_links_its_data_version_and_report(
        mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    project = _project(tmp_path / "project")
    tracking = {"experiment": "view-test", "registered_model": "view-policy"}
    experiment_id = connect(project, tracking).experiment_id()
    client = connect(project, tracking).client
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == EXPERIMENT_TAGS["mlflow.experimentKind"]

    parent, version, promote_run = _run_pipeline_end(project, tracking, "view-policy", monkeypatch)
    stages = [{"stage": s, "ran": True, "seconds": 1.0} for s in ("evaluate", "promote")]
    _, journal = close_parent_run(project, tracking, parent, status="FINISHED", stages=stages)

    assert journal is None
    _assert_linked(client, parent, version, promote_run, "view-policy", tmp_path)
    note = client.get_run(parent).data.tags[MLFLOW_RUN_NOTE]
    assert f"[one-page report](#/experiments/{experiment_id}/runs/{parent}/artifacts/{REPORT_PATH}?{ML_VIEW})" in note


def test_a_server_down_at_the_end_gets_the_same_links_from_rlhf_sync(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tasks.tracking.outage import sync_pending
    from tests.servers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(key, "1")  # connect() sets them; restored after the test
    monkeypatch.setenv("RLHF_STATE_DIR", str(tmp_path / "state"))
    project = _project(tmp_path / "project")
    tracking = {"experiment": "view-test-outage", "registered_model": "view-policy-outage"}
    parent, version, promote_run = _run_pipeline_end(project, tracking, "view-policy-outage", monkeypatch)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens: the server is down
    _, journal = close_parent_run(project, {**tracking, "timeout_s": 1, "max_retries": 0}, parent, status="FINISHED",
                                  stages=[{"stage": "promote", "ran": True, "seconds": 1.0}])
    assert journal is not None
    ops = [op for op, _ in journal.calls()]
    assert {"log_inputs", "link_registered_version", "log_artifact"} <= set(ops) and ops[-1] == "set_terminated"
    client = MlflowClient(mlflow_server)
    assert client.get_run(parent).info.status == "RUNNING" and not client.get_run(parent).inputs.dataset_inputs

    sync_pending(project, lambda _uri: client)  # `rlhf sync` once the server is back
    assert pending_journals(project) == []
    _assert_linked(client, parent, version, promote_run, "view-policy-outage", tmp_path)


def test_a_local_store_links_the_version_as_a_server_does(tmp_path):
    """The embedded default (a SQLite store written by the client): no server notes the version on its logged
    model, so ``register_model`` does, and the parent run links it the same way."""
    from mlflow import MlflowClient

    from tasks.registry import register_model
    from tasks.tracking.outage import CALLS

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("local", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(experiment).info.run_id
    promote = client.create_run(experiment).info.run_id
    model, tokenizer = _tiny_policy()
    version = register_model(client, promote, model, tokenizer, "local-policy", {"pipeline.run_id": parent})

    (logged,) = [o.model_id for o in client.get_run(promote).outputs.model_outputs]
    assert json.loads(client.get_logged_model(logged).tags["mlflow.modelVersions"]) == [
        {"name": "local-policy", "version": str(version.version)}]
    CALLS["link_registered_version"](client, parent, "local-policy")
    run = client.get_run(parent)
    assert [o.model_id for o in run.outputs.model_outputs] == [logged]
    assert run.data.tags["registered_model.uri"] == f"models:/local-policy/{version.version}"
