"""The summary a person reads at the end of ``rlhf run``: what ran, the key numbers, where to look."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

KEY_METRICS = ("gold_reward", "rm_score", "kl_per_token", "win_rate_vs_sft/gold", "win_rate_vs_sft/rm", "distinct_2")


def _metrics(root: Path, stage: str) -> dict[str, Any]:
    path = root / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def print_run_summary(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    root = Path(result["workspace"])
    stages = Table(title="Stages")
    for col in ("stage", "status", "seconds"):
        stages.add_column(col)
    for s in result["stages"]:
        stages.add_row(s["stage"], "ran" if s["ran"] else "up to date (skipped)", f"{s['seconds']:.1f}")
    console.print(stages)

    evaluation = _metrics(root, "evaluate")
    if evaluation:
        table = Table(title="Policies on held-out prompts (metrics/evaluate.json)")
        table.add_column("policy")
        present = [k for k in KEY_METRICS if any(f"{p}/{k}" in evaluation for p in ("sft", "ppo", "dpo"))]
        for k in present:
            table.add_column(k, justify="right")
        for policy in ("sft", "ppo", "dpo"):
            table.add_row(policy, *(f"{evaluation[f'{policy}/{k}']:.3f}" if f"{policy}/{k}" in evaluation else "-" for k in present))
        console.print(table)

    uri = result["tracking_uri"]
    console.print(f"\nMLflow parent run: [bold]{result['parent_run_id']}[/bold]")
    console.print("Where to look:")
    console.print(f"  mlflow ui --backend-store-uri {uri}      # runs, curves, samples, registered model")
    console.print("  dvc metrics show                          # metrics/*.json of every stage")
    console.print("  dvc plots show                            # training curves -> dvc_plots/index.html")
    console.print(f"  DVC remote push: {result['push'] or 'nothing new'}")
