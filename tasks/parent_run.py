"""The parent MLflow run of one pipeline run: opened by the flow, closed with its summary.

Stage processes nest their runs under it through ``$RLHF_PARENT_RUN_ID``. At the end it gets
every ``metrics/*.json`` value (also of stages DVC skipped), ``params.yaml``, ``dvc.lock``,
the git commit and dirty flag, and the Prefect flow-run id (:func:`log_parent_summary`), and what
a person opening it in MLflow's UI looks for (:func:`link_parent_run`): the data it used as dataset
inputs, the model version it registered (under "Registered models"), a one-page report
(``report/index.html``, :mod:`tasks.run_report`) and a description linking them; the policies'
reward and KL charts come first (``rlhf_core.metrics.PARENT_HEADLINE``).
Everything goes through a client bound to the project's store (``tasks.tracking.client``); the
closing calls through a :class:`~tasks.tracking.outage.RunSink`, so a server that is down at the
end keeps them (with copies of the files) for ``rlhf sync``.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_core import metrics as M
from tasks.run_report import REPORT_DIR, REPORT_FILE
from tasks.tracking.client import connect
from tasks.tracking.lifecycle import create_run
from tasks.tracking.outage import RunSink, pending_dir, pending_journals
from tasks.tracking.values import finite_number, flatten_params

if TYPE_CHECKING:
    from mlflow.entities import Run

    from tasks.tracking.outage import Journal

RECORD_DIR = "pipeline"  # artifact folder of a parent run: params.yaml, dvc.lock, metrics/
REPORT_PATH = f"{REPORT_DIR}/{REPORT_FILE}"
MLFLOW_RUN_NOTE = "mlflow.note.content"  # a run's description in MLflow's UI (mlflow.utils.mlflow_tags.MLFLOW_RUN_NOTE)
SPLIT_CONTEXT = {"sft_train": "training", "pref_train": "training", "sft_test": "validation", "pref_test": "validation",
                 "prompts": "evaluation"}
"""What each prepared split is used for (MLflow's dataset context): training, held-out losses during training
(validation), held-out prompts of ``evaluate``/``promote`` and of the online trainers' evaluations (evaluation)."""
SOURCE_CONTEXT = "source"
ML_VIEW = "workflowType=machine_learning"
"""The query that opens MLflow 3's UI on its model-training view. Its "GenAI / Model training" switch is global (kept in
the browser; a fresh one opens on GenAI), and the 3.17 UI reads an experiment's kind from it, not from the experiment's
``mlflow.experimentKind`` tag (which the pipeline sets too: ``tasks.tracking.client.EXPERIMENT_TAGS``)."""


def open_parent_run(project_dir: Path, tracking: dict[str, Any] | None, *, run_name: str, tags: dict[str, str]) -> str:
    """Create the parent run (left RUNNING for the stage processes), log params.yaml flattened; return its id."""
    from tasks.params import load_params

    store = connect(project_dir, tracking)
    # Every params.yaml value as a dotted param: what `rlhf compare` and the MLflow UI diff.
    return create_run(store, run_name=run_name, tags={"pipeline": "rlhf", **tags},
                      params=flatten_params(load_params(project_dir / "params.yaml")), doing="the pipeline did not start")


def close_stale_runs_of(project_dir: Path, tracking: dict[str, Any] | None, workspace: Path) -> list[Run]:
    """Before a run starts: stop what killed runs of ``workspace`` left running (``tasks.process_groups``), then
    close the runs they left RUNNING (``tasks.tracking.lifecycle``), but those whose calls wait for ``rlhf sync``."""
    from tasks.process_groups import stop_orphans
    from tasks.tracking.lifecycle import close_stale_runs
    from tasks.workspace import state_dir

    stop_orphans(state_dir(workspace))
    waiting = {journal.meta["run_id"] for journal in pending_journals(workspace)}
    return close_stale_runs(connect(project_dir, tracking), skip=waiting)


def run_tags(project_dir: Path, stages: list[dict[str, Any]] | None) -> dict[str, str]:
    """Tags that say what this run used and decided: each data source's identity (``source.*``) and,
    when ``promote`` had nothing new to judge, that the champion stayed (``promotion.*``)."""
    from tasks.sources import source_tags

    tags: dict[str, str] = {}
    ingest = project_dir / "metrics" / "ingest.json"
    if ingest.is_file():
        tags.update(source_tags(json.loads(ingest.read_text()).get("sources", {})))
    if any(s["stage"] == "promote" and not s["ran"] for s in stages or []):
        tags["promotion.decision"] = "unchanged: no new challenger (the policy and its inputs did not change)"
    return tags


def compute_share(stages: list[dict[str, Any]], metrics: dict[str, dict[str, Any]], wall_seconds: float) -> dict[str, float]:
    """How much of a pipeline run's wall time went into training, generation and scoring loops: the
    ``compute_seconds`` of the stages that ran (``metrics/<stage>.json``; stages DVC skipped did nothing)."""
    from rlhf_core import metrics as M

    ran = {s["stage"] for s in stages if s["ran"]}
    compute = round(sum(float(metrics.get(stage, {}).get(M.COMPUTE_SECONDS, 0.0)) for stage in ran), 1)
    wall = round(wall_seconds, 1)  # the share of the two numbers logged beside it
    return {M.PIPELINE_WALL_SECONDS: wall, M.PIPELINE_COMPUTE_SECONDS: compute,
            M.PIPELINE_COMPUTE_SHARE: round(compute / wall, 4) if wall > 0 else 0.0}


def close_parent_run(project_dir: Path, tracking: dict[str, Any] | None, run_id: str, *, status: str,
                     summary_tags: dict[str, str] | None = None, stages: list[dict[str, Any]] | None = None,
                     journal_dir: Path | None = None, extra_metrics: dict[str, float] | None = None) -> tuple[str, Journal | None]:
    """Log the summary (metrics, ``extra_metrics`` such as the run's :func:`compute_share`, params.yaml, dvc.lock,
    tags) and end the run.

    Returns the tracking URI and, when the server was down, the journal that keeps the calls
    (in ``journal_dir``, default the project's ``<state>/tracking_pending``) for ``rlhf sync``.
    """
    store = connect(project_dir, tracking)
    sink = RunSink(store.client, run_id, journal_dir=journal_dir or pending_dir(project_dir), name="pipeline", uri=store.uri,
                   parent_run_id=run_id)
    if status == "FINISHED":
        log_parent_summary(
            sink, metrics_dir=project_dir / "metrics", params_file=project_dir / "params.yaml",
            lock_file=project_dir / "dvc.lock", extra_tags={**run_tags(project_dir, stages), **(summary_tags or {})},
            extra_metrics=extra_metrics,
        )
        link_parent_run(sink, project_dir, registered_model=store.registered_model, stages=stages)
    elif summary_tags:
        sink.send("log_batch", tags=[[k, str(v)] for k, v in summary_tags.items()])
    sink.send("set_terminated", status=status)
    return store.uri, sink.journal


def parent_datasets(project_dir: Path) -> list[dict[str, Any]]:
    """The data a pipeline run used, as dataset inputs of its parent run (the ``log_inputs`` call's dicts).

    Each prepared split ``data/prepared/<split>.jsonl`` (digest: its md5, the hash DVC records for it; context:
    :data:`SPLIT_CONTEXT`) and each data-source snapshot ``data/sources/<role>`` that ``ingest`` recorded in
    ``metrics/ingest.json`` (digest and URI of the source as ingested; context ``source``). Rows in ``profile``.
    """
    from tasks.sources import kind_of
    from tasks.workspace import SPLITS, Workspace, file_md5

    ws = Workspace(Path(project_dir))
    datasets: list[dict[str, Any]] = []
    for split in SPLITS:
        path = ws.split(split)
        if path.is_file():
            with path.open("rb") as handle:
                rows = sum(1 for line in handle if line.strip())
            datasets.append(_dataset(path.relative_to(ws.root).as_posix(), file_md5(path), "local", str(path), rows,
                                     SPLIT_CONTEXT[split]))
    ingest = _read_json(ws.metrics("ingest"))
    for role, identity in sorted(((ingest or {}).get("sources") or {}).items()):
        if isinstance(identity, Mapping) and identity.get("digest") and identity.get("uri"):
            kind = kind_of(str(identity["uri"]))
            datasets.append(_dataset(f"data/sources/{role}", str(identity["digest"]),
                                     {"hub": "hugging_face", "fsspec": "uri"}.get(kind, kind), str(identity["uri"]),
                                     identity.get("rows"), SOURCE_CONTEXT))
    return datasets


def _dataset(name: str, digest: str, source_type: str, uri: str, rows: Any, context: str) -> dict[str, Any]:
    profile = json.dumps({"num_rows": int(rows)}) if isinstance(rows, int) else None
    return {"name": name, "digest": digest, "source_type": source_type, "source": json.dumps({"uri": uri}),
            "schema": None, "profile": profile, "context": context}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def promotion_ran(stages: list[dict[str, Any]] | None) -> bool:
    """Whether ``promote`` ran in this run (else ``metrics/promote.json`` is an earlier run's); True when unknown."""
    return not any(s["stage"] == "promote" and not s["ran"] for s in stages or [])


def ui_paths(experiment_id: str, run_id: str) -> dict[str, str]:
    """Paths in MLflow's UI (after the server's address), opened on the model-training view: the experiment's runs,
    the run, its charts and its report."""
    run = f"#/experiments/{experiment_id}/runs/{run_id}"
    return {"experiment": f"#/experiments/{experiment_id}/runs?{ML_VIEW}", "run": f"{run}?{ML_VIEW}",
            "charts": f"{run}/model-metrics?{ML_VIEW}", "report": f"{run}/artifacts/{REPORT_PATH}?{ML_VIEW}"}


def ui_links(tracking_uri: str, run_id: str, project_dir: Path) -> dict[str, str] | None:
    """:func:`ui_paths` of a run, after ``tracking_uri`` when it is a server's (``http://127.0.0.1:5000/`` for the
    ``mlflow ui`` of a local store); None when the run cannot be read (a server that is down)."""
    try:
        experiment_id = connect(project_dir, {"uri": tracking_uri}).client.get_run(run_id).info.experiment_id
    except Exception:  # the summary is printed all the same
        return None
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return {name: f"{base}/{path}" for name, path in ui_paths(experiment_id, run_id).items()}


def run_description(evaluation: Mapping[str, Any], promotion: Mapping[str, Any] | None, *, ran: bool,
                    datasets: list[dict[str, Any]], registered_model: str, paths: Mapping[str, str] | None) -> str:
    """The parent run's description (``mlflow.note.content``, Markdown, shown at the top of its page): the
    headline numbers, the promotion decision and links to the report and the registered version."""
    from tasks.run_report import cell, policies_in

    lines = ["**RLHF pipeline run**" + (f" · [one-page report]({paths['report']})" if paths else "")]
    policies = policies_in(evaluation)
    if policies:
        lines.append("")
        lines.append("Held-out gold reward / KL to SFT (nats/token), 95% intervals: " + "; ".join(
            f"{p} {cell(evaluation, p, M.GOLD_REWARD)} / {cell(evaluation, p, M.KL_PER_TOKEN)}" for p in policies))
    if promotion is not None:
        lines.append("")
        if not ran:
            lines.append("Promotion: unchanged (nothing new to judge; @champion stayed).")
        else:
            text = f"Promotion: {promotion.get('decision', '?')} ({promotion.get('policy', '?')} against the {promotion.get('against', '?')}"
            if isinstance(promotion.get("win_rate"), (int, float)):
                text += f", win rate {promotion['win_rate']:.3f}"
            text += ")"
            version = promotion.get("challenger_version")
            if version:
                text += f"; registered `{registered_model}` version {version} ([open](#/models/{registered_model}/versions/{version}))"
            lines.append(text + ".")
    if datasets:
        lines.append("")
        lines.append("Data: " + ", ".join(f"`{d['name']}` ({d['context']}, md5 {d['digest'][:8]})" for d in datasets) + ".")
    return "\n".join(lines)


def link_parent_run(sink: RunSink, project_dir: Path, *, registered_model: str, stages: list[dict[str, Any]] | None) -> None:
    """What a person opening the parent run in MLflow's UI looks for, logged through ``sink``: the data the run used
    (dataset inputs, :func:`parent_datasets`), the model version it registered (``link_registered_version``, see
    :mod:`tasks.tracking.outage`), the one-page report ``report/index.html`` and the run's description."""
    from tasks.run_report import write_run_report
    from tasks.tracking.outage import is_outage

    project_dir = Path(project_dir)
    datasets = parent_datasets(project_dir)
    if datasets:
        sink.send("log_inputs", datasets=datasets)
    sink.send("link_registered_version", name=registered_model)
    ran = promotion_ran(stages)
    paths = None
    if sink.journal is None:
        try:
            paths = ui_paths(sink.client.get_run(sink.run_id).info.experiment_id, sink.run_id)
        except Exception as err:
            if not is_outage(err):
                raise
    facts = [("parent run", sink.run_id)]
    shown = [{**d, "source": json.loads(d["source"])["uri"], "rows": json.loads(d["profile"])["num_rows"] if d["profile"] else "-"}
             for d in datasets]
    with tempfile.TemporaryDirectory(prefix="rlhf-report-") as tmp:
        report = write_run_report(project_dir, Path(tmp), datasets=shown, promotion_ran=ran, facts=facts,
                                  model_name=registered_model)
        sink.send("log_artifact", path=str(report), artifact_path=REPORT_DIR)
    description = run_description(_read_json(project_dir / "metrics" / "evaluate.json") or {},
                                  _read_json(project_dir / "metrics" / "promote.json"), ran=ran, datasets=datasets,
                                  registered_model=registered_model, paths=paths)
    sink.send("log_batch", tags=[[MLFLOW_RUN_NOTE, description]])


def _flatten_metrics(tree: Mapping[str, Any], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, raw in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(raw, Mapping):
            out.update(_flatten_metrics(raw, name))
        elif (value := finite_number(raw)) is not None:
            out[name] = value
    return out


def metrics_dir_values(metrics_dir: Path) -> dict[str, float]:
    """Every finite number in ``metrics_dir/*.json`` as ``<stage>/<key>`` (nested keys joined by ``/``):
    what the parent run logs and what ``rlhf reproduce`` compares."""
    metrics: dict[str, float] = {}
    for path in sorted(metrics_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
        if isinstance(data, Mapping):
            metrics.update(_flatten_metrics(data, path.stem))
    return metrics


def headline_metrics(logged: Mapping[str, float]) -> dict[str, float]:
    """Each policy's held-out reward, KL and win rates (``evaluate/<policy>/<metric>``) once more under the chart
    sections that MLflow's UI shows first (``rlhf_core.metrics.parent_headline``: ``1_gold_reward/<policy>``, ...)."""
    out: dict[str, float] = {}
    for key, value in logged.items():
        stage, _, rest = key.partition("/")
        policy, _, name = rest.partition("/")
        if stage == "evaluate" and name in M.PARENT_HEADLINE:
            out[M.parent_headline(name, policy)] = value
    return out


def log_parent_summary(
    sink: RunSink, *, metrics_dir: Path, params_file: Path, lock_file: Path, extra_tags: Mapping[str, Any],
    extra_metrics: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Summarise a pipeline run on its parent run (``sink``'s run).

    Logs every finite number in ``metrics_dir/*.json`` as ``<stage>/<key>`` (nested keys joined
    by ``/``; also for stages DVC skipped) and the policies' headline numbers again as
    :func:`headline_metrics`, ``extra_metrics``, ``params_file`` and ``lock_file`` as artifacts (when they exist)
    and ``extra_tags``. Returns the metrics it logged.
    """
    values = metrics_dir_values(Path(metrics_dir))
    metrics = {**headline_metrics(values), **values, **(extra_metrics or {})}  # headline first: the run page lists them in order
    timestamp = int(time.time() * 1000)
    sink.send("log_batch", metrics=[[k, v, timestamp, 0] for k, v in metrics.items()],
              tags=[[k, str(v)] for k, v in extra_tags.items()])
    # The run's record, what `rlhf reproduce` rebuilds from: pipeline/{params.yaml,dvc.lock,metrics/*.json}.
    for path in (Path(params_file), Path(lock_file)):
        if path.is_file():
            sink.send("log_artifact", path=str(path), artifact_path=RECORD_DIR)
    for path in sorted(Path(metrics_dir).glob("*.json")):
        sink.send("log_artifact", path=str(path), artifact_path=f"{RECORD_DIR}/metrics")
    return metrics


def download_run_record(project_dir: Path, tracking: dict[str, Any] | None, run_id: str, dest: Path) -> dict[str, Any]:
    """Fetch a parent run's record: commit, params.yaml, dvc.lock, metrics files and logged metric values."""
    store = connect(project_dir, tracking)
    try:
        run = store.client.get_run(run_id)
    except Exception as err:  # MlflowException for an unknown id
        raise ValueError(f"no MLflow run {run_id!r} at {store.uri}: {err}") from err
    try:
        local = Path(store.client.download_artifacts(run_id, RECORD_DIR, str(dest)))
    except Exception as err:
        raise ValueError(f"run {run_id} has no '{RECORD_DIR}/' record: is it a finished pipeline parent run? ({err})") from err
    params, lock = local / "params.yaml", local / "dvc.lock"
    if not params.exists() or not lock.exists():
        raise ValueError(f"run {run_id} has no params.yaml/dvc.lock under '{RECORD_DIR}/': is it a pipeline parent run?")
    return {
        "commit": run.data.tags.get("git.commit", ""),
        "params": params,
        "lock": lock,
        "metrics": sorted((local / "metrics").glob("*.json")),
        "logged_metrics": metrics_dir_values(local / "metrics"),
    }
