"""The one-page report of a pipeline run: ``report/index.html`` on its MLflow parent run.

One self-contained HTML page (the plots inlined as base64 PNG, so MLflow's artifact viewer shows
it as it is, and it opens from a download too): each policy's held-out numbers with their 95%
intervals (``metrics/evaluate.json``), the promotion decision (``metrics/promote.json``), the data
the run used (the parent run's dataset inputs) and the evaluation plots (``plots/evaluate/*.png``,
then every stage's ``plots/<stage>/*.png``, e.g. an over-optimisation curve).

:func:`report_html` is a pure function of those values; :func:`write_run_report` reads them from a
workspace and writes the page.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_core import metrics as M

REPORT_DIR = "report"
"""Artifact folder of the report on the parent run."""
REPORT_FILE = "index.html"
POLICY_ORDER = ("sft", "ppo", "dpo", "grpo")
"""Rows of the policies table, in this order (other policies found in the metrics follow, sorted)."""
COLUMNS = (
    (M.GOLD_REWARD, "gold reward"),
    (M.RM_SCORE, "reward-model score"),
    (M.KL_PER_TOKEN, "KL to SFT (nats/token)"),
    (M.WIN_RATE_VS_SFT_GOLD, "win rate vs SFT (gold)"),
    (M.WIN_RATE_VS_SFT_RM, "win rate vs SFT (RM)"),
    (M.DISTINCT_2, "distinct-2"),
)
"""(metric, column title) of the policies table."""


@dataclass(frozen=True)
class Plot:
    """One image of the report: its caption (e.g. ``evaluate/reward_vs_kl``) and PNG bytes."""

    caption: str
    png: bytes


def policies_in(evaluation: Mapping[str, Any]) -> list[str]:
    """The policies ``metrics/evaluate.json`` holds numbers for (keys ``<policy>/<metric>``), table order."""
    found = {key.split("/", 1)[0] for key in evaluation if "/" in key and key.split("/", 1)[1] in {c for c, _ in COLUMNS}}
    return [p for p in POLICY_ORDER if p in found] + sorted(found - set(POLICY_ORDER))


def cell(evaluation: Mapping[str, Any], policy: str, metric: str) -> str:
    """``"1.774 [1.722, 1.820]"``: the value with its 95% interval when the metrics hold one; ``"-"`` when absent."""
    value = evaluation.get(f"{policy}/{metric}")
    if not isinstance(value, (int, float)):
        return "-"
    low, high = evaluation.get(f"{policy}/{M.ci_low(metric)}"), evaluation.get(f"{policy}/{M.ci_high(metric)}")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)) and (low, high) != (value, value):
        return f"{value:.3f} [{low:.3f}, {high:.3f}]"
    return f"{value:.3f}"


def _cell_html(evaluation: Mapping[str, Any], policy: str, metric: str) -> str:
    """:func:`cell` for the page: the interval on a second, smaller line (the table fits MLflow's artifact viewer)."""
    value, _, interval = cell(evaluation, policy, metric).partition(" ")
    return html.escape(value) + (f"<br><small>{html.escape(interval)}</small>" if interval else "")


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[str]], *, escaped: bool = False) -> str:
    """An HTML table of text cells (``escaped``: the cells are HTML already)."""
    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c if escaped else html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _promotion_section(promotion: Mapping[str, Any] | None, promotion_ran: bool, model_name: str | None) -> str:
    if promotion is None:
        return "<p>No promotion in this run (no <code>promote</code> stage ran).</p>"
    if not promotion_ran:
        return ("<p>Unchanged: <code>promote</code> had nothing new to judge (the policy and its inputs did not change), "
                "so <code>@champion</code> stayed where it was.</p>")
    verdict = {"promoted": "promoted to @champion", "kept": "kept the current champion"}.get(str(promotion.get("decision")),
                                                                                            str(promotion.get("decision")))
    if promotion.get("against") == "reference" and not promotion.get("promoted"):
        verdict = "not crowned (no champion yet)"
    facts = [
        ("decision", verdict),
        ("challenger", f"{promotion.get('policy', '?')} against the {promotion.get('against', '?')}"
         + (f" (version {promotion['previous_champion']})" if promotion.get("previous_champion") else "")),
        ("judge", f"{promotion.get('metric', '?')} on {promotion.get('n_prompts', '?')} held-out prompts"),
    ]
    if isinstance(promotion.get("win_rate"), (int, float)):
        facts.append(("paired win rate", f"{promotion['win_rate']:.3f}"))
    if all(isinstance(promotion.get(k), (int, float)) for k in ("mean_diff", "ci_low", "ci_high")):
        facts.append(("mean gain", f"{promotion['mean_diff']:+.4f} [{promotion['ci_low']:+.4f}, {promotion['ci_high']:+.4f}]"))
    if isinstance(promotion.get("kl_per_token"), (int, float)):
        facts.append(("KL to the reference (nats/token)", f"{promotion['kl_per_token']:.4f}"))
    if promotion.get("challenger_version"):
        facts.append(("registered", f"{model_name or 'model'} version {promotion['challenger_version']}"))
    if promotion.get("champion_version"):
        facts.append(("@champion", f"version {promotion['champion_version']}"))
    reasons = promotion.get("reasons") or []
    out = _table(None, facts)
    if reasons:
        out += "<p>Why not:</p><ul>" + "".join(f"<li>{html.escape(str(r))}</li>" for r in reasons) + "</ul>"
    return out


def report_html(
    evaluation: Mapping[str, Any],
    *,
    promotion: Mapping[str, Any] | None = None,
    promotion_ran: bool = True,
    datasets: Sequence[Mapping[str, Any]] = (),
    plots: Sequence[Plot] = (),
    title: str = "RLHF pipeline run",
    facts: Sequence[tuple[str, str]] = (),
    model_name: str | None = None,
) -> str:
    """The report page as one HTML string (pure: no files read).

    ``evaluation``: ``metrics/evaluate.json`` (``<policy>/<metric>``, ``<policy>/<metric>_ci_low``/``_ci_high``,
    ``n_prompts``); ``promotion``: ``metrics/promote.json`` or None, ``promotion_ran``: whether ``promote`` ran in
    this run (else its numbers are an earlier run's); ``datasets``: dicts with ``name``, ``context``, ``digest``,
    ``source`` (a URI) and optionally ``rows``; ``plots``: the images, in order; ``facts``: (label, value) lines at the top
    (run id, commit, ...). Every text is HTML-escaped.
    """
    policies = policies_in(evaluation)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if facts:
        parts.append(_table(None, facts))
    parts.append("<h2>Policies on held-out prompts</h2>")
    if policies:
        shown = [(m, t) for m, t in COLUMNS if any(f"{p}/{m}" in evaluation for p in policies)]
        parts.append(_table(("policy", *(t for _, t in shown)),
                            [(html.escape(p), *(_cell_html(evaluation, p, m) for m, _ in shown)) for p in policies], escaped=True))
        n = evaluation.get(M.N_PROMPTS)
        k = evaluation.get(M.SAMPLES_PER_PROMPT)
        scope = (f"{int(n)} held-out prompts" if isinstance(n, (int, float)) else "the held-out prompts") + (
            f" × {int(k)} samples" if isinstance(k, (int, float)) and k > 1 else "")
        parts.append(f"<p class='note'>On {html.escape(scope)}; brackets: 95% bootstrap intervals (paired for win rates), "
                     "from <code>metrics/evaluate.json</code>.</p>")
    else:
        parts.append("<p>No evaluation in this run (<code>metrics/evaluate.json</code> is missing or empty).</p>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for plot in plots:
            data = base64.b64encode(plot.png).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(plot.caption, quote=True)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>")
    parts.append("<h2>Promotion</h2>")
    parts.append(_promotion_section(promotion, promotion_ran, model_name))
    parts.append("<h2>Data</h2>")
    if datasets:
        parts.append(_table(("dataset", "used for", "rows", "digest (md5)", "source"), [
            (str(d["name"]), str(d.get("context", "")), str(d.get("rows", "-")), str(d.get("digest", "")), str(d.get("source", "")))
            for d in datasets]))
    else:
        parts.append("<p>No prepared data found.</p>")
    style = ("body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1f2328;max-width:1100px}"
             "table{border-collapse:collapse;margin:8px 0 12px}th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left}"
             "td{font-variant-numeric:tabular-nums;white-space:nowrap}th{background:#f6f8fa}.note{color:#57606a;font-size:90%}"
             "figure{display:inline-block;margin:8px 16px 8px 0}img{max-width:480px;border:1px solid #d0d7de}"
             "figcaption{font-size:90%;color:#57606a}td small{color:#57606a}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head>"
            f"<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def plot_files(plots_dir: Path) -> list[Path]:
    """``plots/evaluate/*.png`` first, then every other stage's ``plots/<stage>/*.png``, each sorted."""
    plots_dir = Path(plots_dir)
    first = sorted((plots_dir / "evaluate").glob("*.png"))
    return first + sorted(p for p in plots_dir.glob("*/*.png") if p.parent.name != "evaluate")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_run_report(project_dir: Path, out_dir: Path, *, datasets: Sequence[Mapping[str, Any]] = (), promotion_ran: bool = True,
                     facts: Sequence[tuple[str, str]] = (), model_name: str | None = None) -> Path:
    """Write ``out_dir/index.html`` from the workspace's metrics and plots; returns its path."""
    project_dir = Path(project_dir)
    plots = [Plot(f"{p.parent.name}/{p.stem}", p.read_bytes()) for p in plot_files(project_dir / "plots")]
    page = report_html(_read_json(project_dir / "metrics" / "evaluate.json") or {},
                       promotion=_read_json(project_dir / "metrics" / "promote.json"), promotion_ran=promotion_ran,
                       datasets=datasets, plots=plots, facts=facts, model_name=model_name)
    out = Path(out_dir) / REPORT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
