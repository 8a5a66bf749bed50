"""The summary a person reads at the end of ``rlhf run``: what ran, the key numbers, where to look."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhf_core import metrics as M
from rlhf_core.metrics import POLICY_HEADLINE
from tasks.parent_run import ui_links
from tasks.policies import POLICY_STAGES


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=140)  # logs and CI: do not wrap at 80


def print_run_summary(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or _console()
    stages = Table(title="Stages")
    for col in ("stage", "status", "seconds", "compute seconds"):
        stages.add_column(col, justify="right" if "seconds" in col else "left")
    for s in result["stages"]:
        stage_metrics = result["metrics"].get(s["stage"], {})
        not_selected = stage_metrics.get("trained") == 0  # its <stage>.train switch is off
        status = "not trained (train: false)" if not_selected else "ran" if s["ran"] else "up to date (skipped)"
        compute = stage_metrics.get(M.COMPUTE_SECONDS) if s["ran"] else None
        stages.add_row(s["stage"], status, f"{s['seconds']:.1f}", "-" if compute is None else f"{compute:.1f}")
    console.print(stages)
    if share := result.get("compute"):
        console.print(f"compute share: {share[M.PIPELINE_COMPUTE_SHARE]:.0%} of the run's {share[M.PIPELINE_WALL_SECONDS]:.0f} s "
                      f"went into training, generation and scoring loops ({share[M.PIPELINE_COMPUTE_SECONDS]:.0f} s; the "
                      "rest: starting processes and servers, loading and saving, tracking, DVC)")

    prepare = result["metrics"].get("prepare", {})
    if "seconds/data" in prepare:
        console.print(f"data prepared in {prepare['seconds/data']:.2f}s, tokenizer trained in "
                      f"{prepare.get('seconds/tokenizer', 0.0):.2f}s (metrics/prepare.json)")
    evaluation = result["metrics"].get("evaluate", {})
    if evaluation:
        table = Table(title="Policies on held-out prompts (metrics/evaluate.json)")
        table.add_column("policy")
        policies = [p for p in ("sft", *POLICY_STAGES) if any(k.startswith(f"{p}/") for k in evaluation)]
        present = [k for k in POLICY_HEADLINE if any(f"{p}/{k}" in evaluation for p in policies)]
        for k in present:
            table.add_column(k, justify="right")
        for policy in policies:
            table.add_row(policy, *(f"{evaluation[f'{policy}/{k}']:.3f}" if f"{policy}/{k}" in evaluation else "-" for k in present))
        console.print(table)

    print_promotion(result, console)
    uri = result["tracking_uri"]
    console.print(f"\nMLflow parent run: [bold]{result['parent_run_id']}[/bold]")
    console.print("Where to look:")
    if not uri.startswith(("http://", "https://")):
        console.print(f"  mlflow ui --backend-store-uri {uri}      # then open the links below")
    links = ui_links(uri, result["parent_run_id"], Path(result.get("workspace") or "."))
    if links:  # on MLflow's model-training view (a fresh browser opens on GenAI's)
        console.print(f"  {links['run']}      # this run: data, registered model, report", soft_wrap=True)
        console.print(f"  {links['experiment']}      # every run: stages, curves, samples", soft_wrap=True)
    elif uri.startswith(("http://", "https://")):
        console.print(f"  {uri}      # MLflow: runs, curves, samples, registered model")
    console.print("  dvc metrics show                          # metrics/*.json of every stage")
    console.print("  dvc plots show                            # training curves -> dvc_plots/index.html")
    console.print(f"  DVC remote push: {result['push'] or 'nothing new'}")


def print_promotion(result: dict[str, Any], console: Console) -> None:
    """One line on what ``promote`` decided (or that it had nothing new to judge)."""
    stage = next((s for s in result["stages"] if s["stage"] == "promote"), None)
    if stage is None:
        return
    if not stage["ran"]:
        console.print("promotion: nothing new to judge, @champion unchanged (`rlhf status` shows it)")
        return
    p = result["metrics"].get("promote", {})
    if not p:
        return
    colour = "green" if p.get("promoted") else "yellow"
    evidence = (f"{p['policy']} vs the {p['against']} on {p['metric']}: win rate {p['win_rate']:.3f}, "
                f"gain {p['mean_diff']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}], KL {p['kl_per_token']:.3f}")
    where = f" -> @champion is version {p['champion_version']}" if p.get("champion_version") else ""
    console.print(f"promotion: [{colour}]{p['decision']}[/{colour}] ({evidence}){where}")
    for reason in p.get("reasons") or []:
        console.print(f"  - {reason}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_reproduce_report(report: Any, console: Console | None = None) -> None:
    console = console or _console()
    table = Table(title=f"Reproduction of run {report.run_id} ({report.mode}, commit {report.commit[:12]})")
    for col in ("metric", "logged", "reproduced", "status"):
        table.add_column(col)
    for c in report.checks:
        colour = {"match": "green", "timing": "dim", "differs": "red", "missing": "yellow"}[c.status]
        table.add_row(c.name, _fmt(c.logged), _fmt(c.reproduced), f"[{colour}]{c.status}[/{colour}]")
    console.print(table)
    console.print(f"outputs identical to the run's dvc.lock: {'yes' if report.outputs_match_lock else 'NO'}")
    console.print(f"worktree: {report.worktree}")
    console.print("[bold green]REPRODUCED[/bold green]" if report.matches else "[bold red]DOES NOT MATCH[/bold red]")


def print_comparison(cmp: Any, console: Console | None = None) -> None:
    console = console or _console()
    table = Table(title="Pipeline runs")
    table.add_column("")
    for name, rid in zip(cmp.names, cmp.run_ids):
        table.add_column(f"{name}\n{rid[:8]}", justify="right")
    if cmp.differing_params:
        table.add_row("[bold]parameters that differ[/bold]", *[""] * len(cmp.run_ids))
        for key, values in cmp.differing_params.items():
            table.add_row(key, *(_fmt(v) for v in values))
    else:
        table.add_row("[dim]same parameters[/dim]", *[""] * len(cmp.run_ids))
    table.add_row("[bold]metrics[/bold]", *[""] * len(cmp.run_ids))
    for key, values in cmp.metrics.items():
        table.add_row(key, *(_fmt(v) for v in values))
    console.print(table)


def print_status(status: Any, console: Console | None = None) -> None:
    """``rlhf status``: the champion and the recent runs' decisions."""
    import datetime as dt

    console = console or _console()
    champion = status.champion
    if champion is None:
        console.print(f"model [bold]{status.model}[/bold]: no @champion yet (a run crowns one when its policy passes the gate)")
    else:
        tags = champion.tags
        console.print(f"model [bold]{status.model}[/bold]: @champion is version [bold]{champion.version}[/bold] "
                      f"({tags.get('policy', '?')}, pipeline run {tags.get('pipeline.run_id', '?')}, "
                      f"decision: {tags.get('promotion.decision', '?')}, win rate {tags.get('promotion.win_rate', '-')} "
                      f"against the {tags.get('promotion.against', '?')})")
    table = Table(title="Recent pipeline runs")
    for col in ("run", "started", "status", "mode", "promotion decision", "challenger", "champion after"):
        table.add_column(col)
    for run in status.runs:
        t = run.data.tags
        started = dt.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        table.add_row(run.info.run_id[:12], started, run.info.status, t.get("run.mode", "-"), t.get("promotion.decision", "-"),
                      t.get("promotion.challenger_version", "-"), t.get("promotion.champion_version", "-"))
    console.print(table)
