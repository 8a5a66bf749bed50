"""``rlhf compare``: the parameters that differ and the key metrics of pipeline runs, from MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_core import metrics as M
from tasks.policies import POLICY_STAGES

COMPARED_METRICS = (
    *(f"evaluate/{policy}/{M.GOLD_REWARD}" for policy in ("sft", *POLICY_STAGES)),
    *(f"evaluate/{policy}/{M.KL_PER_TOKEN}" for policy in POLICY_STAGES),
    *(f"evaluate/{policy}/{M.WIN_RATE_VS_SFT_RM}" for policy in POLICY_STAGES),
    f"reward/{M.key(M.EVAL, M.ACCURACY)}", f"dpo/{M.key(M.EVAL, M.REWARDS_ACCURACIES)}", f"sft/{M.key(M.EVAL, M.LOSS)}",
)
"""Parent-run metrics (``<stage>/<name>``) ``rlhf compare`` shows for every run that has them."""


@dataclass
class Comparison:
    run_ids: list[str]
    names: list[str]
    differing_params: dict[str, list[str | None]]
    metrics: dict[str, list[float | None]]


def pipeline_runs(project_dir: Path, tracking: dict[str, Any] | None, *, run_ids: list[str] | None = None, last: int | None = None,
                  finished_only: bool = True):
    """The given parent runs, or the newest ``last`` (finished) parent runs of the experiment."""
    from tasks.tracking.client import connect

    store = connect(project_dir, tracking)
    if run_ids:
        return [store.client.get_run(r) for r in run_ids]
    experiment = store.client.get_experiment_by_name(store.experiment)
    if experiment is None:
        return []
    return store.client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.pipeline = 'rlhf'" + (" and attributes.status = 'FINISHED'" if finished_only else ""),
        order_by=["attributes.start_time DESC"], max_results=last or 5,
    )


def compare(runs: list) -> Comparison:
    ids = [r.info.run_id for r in runs]
    all_params = sorted({k for r in runs for k in r.data.params})
    differing = {
        k: [r.data.params.get(k) for r in runs] for k in all_params
        if len({r.data.params.get(k) for r in runs}) > 1
    }
    present = [m for m in COMPARED_METRICS if any(m in r.data.metrics for r in runs)]
    metrics = {m: [r.data.metrics.get(m) for r in runs] for m in present}
    return Comparison(ids, [r.info.run_name or r.info.run_id[:8] for r in runs], differing, metrics)
