"""The gate's check of what ``prepare`` dropped: no source may lose more than ``max_invalid_fraction``.

``prepare`` (with ``invalid_rows: drop``) writes ``data/prepared/invalid_rows.json``: per source
the rows read, the rows dropped per rule and a few examples (see
``rlhf_core.data.cleaning.summary``). A few invalid rows are normal in real data; many mean the
source itself is wrong (a bad export, the wrong format), and training on the rest would hide it.
Each source becomes one pseudo-dataset of the report with one rule, so the summary, the JSON
report and the stage's failure name it like any Great Expectations rule.
"""

from __future__ import annotations

from typing import Any

RULE = "invalid rows within max_invalid_fraction"
KIND = "source"
CHECK_TYPE = "prepare_invalid_rows"  # not a GX expectation: the check is a ratio of two counts prepare made


def source_results(summary: dict[str, Any], max_fraction: float) -> dict[str, Any]:
    """{"<kind> source <name>": DatasetResult} for each source in ``summary`` (``invalid_rows.json``)."""
    from tasks.validation.gate import DatasetResult, RuleResult

    results = {}
    for entry in summary.get("sources", []):
        rows, dropped = int(entry.get("rows") or 0), int(entry.get("invalid") or 0)
        fraction = dropped / rows if rows else 0.0
        success = fraction <= max_fraction
        counts = ", ".join(f"{rule} {n}" for rule, n in (entry.get("by_rule") or {}).items() if n) or "none"
        detail = (
            f"{dropped} of {rows} rows ({100 * fraction:.1f}%) dropped by prepare as invalid; "
            f"at most {100 * max_fraction:.1f}% allowed. By rule: {counts}. "
            "All of them: data/prepared/quarantine.jsonl"
        )
        rule = RuleResult(
            rule=RULE,
            expectation_type=CHECK_TYPE,
            columns=[],
            success=success,
            detail=detail,
            unexpected_count=dropped,
            unexpected_percent=100 * fraction,
            element_count=rows,
            observed_value=entry.get("by_rule"),
            examples=[] if success else list(entry.get("examples") or []),
        )
        name = f"{entry.get('kind')} source {entry.get('source')}"
        results[name] = DatasetResult(name, KIND, rows, success, [rule], [])
    return results
