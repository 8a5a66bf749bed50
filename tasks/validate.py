"""Stage ``validate``: the data gate. Great Expectations suites over every prepared split.

On failure the stage exits non-zero with a summary naming each failed expectation, its
counts and example rows; the JSON result and Data Docs are written to ``reports/validate``
(and logged to MLflow), and no downstream stage runs. Earlier outputs stay as they were.
Besides the splits, the gate checks ``data/prepared/invalid_rows.json``: no source may have lost
more than ``max_invalid_fraction`` of its rows to ``prepare``'s cleaning.
"""

from __future__ import annotations

from typing import Any

from tasks.params import typed
from tasks.workspace import SPLITS, Workspace, write_json

STAGE = "validate"
KIND_OF_SPLIT = {"sft_train": "sft", "sft_test": "sft", "pref_train": "preference", "pref_test": "preference", "prompts": "prompt"}


def prompt_token_counts(frame, tokenizer) -> list[int]:
    """Prompt length in tokens as the trainers will tokenise it (chat template when there is one)."""
    import datasets
    import pyarrow.compute

    from rlhf_core.data.tokenize import TruncationConfig, tokenize_prompts

    ds = datasets.Dataset.from_pandas(frame[["prompt", "prompt_messages"]].reset_index(drop=True), preserve_index=False)
    tokenized, _ = tokenize_prompts(ds, tokenizer, TruncationConfig(max_length=1_000_000))
    ids = tokenized.with_format("arrow")["prompt_input_ids"]  # the whole column at once, not row by row
    return pyarrow.compute.list_value_length(ids).to_pylist()


def load_frames(ws: Workspace, tokenizer) -> dict[str, tuple[str, Any]]:
    import pandas as pd

    frames = {}
    for name in SPLITS:
        frame = pd.read_json(ws.split(name), lines=True, dtype=False)
        if tokenizer is not None and {"prompt", "prompt_messages"} <= set(frame.columns) and len(frame):
            try:
                frame["prompt_tokens"] = prompt_token_counts(frame, tokenizer)
            except Exception as err:  # malformed rows: the suites below name them; token counts are secondary
                print(f"[validate] {name}: prompt token counts unavailable ({err})")
        frames[name] = (KIND_OF_SPLIT[name], frame)
    return frames


def load_invalid_rows(ws: Workspace) -> dict[str, Any] | None:
    """``prepare``'s per-source counts of dropped rows, or None for data prepared before it wrote them."""
    import json

    path = ws.prepared / "invalid_rows.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    from tasks.lengths import with_auto_lengths
    from tasks.stage_main import StageError
    from tasks.training_io import load_tokenizer
    from tasks.validation import ValidationConfig, validate_frames

    params, lengths = with_auto_lengths(params, ws, STAGE)  # max_prompt_tokens: auto
    cfg = typed(params, STAGE, ValidationConfig)
    tokenizer = load_tokenizer(ws) if ws.tokenizer.exists() else None
    frames = load_frames(ws, tokenizer)
    report_dir = ws.reports(STAGE)
    report = validate_frames(frames, cfg, report_dir, invalid_rows=load_invalid_rows(ws))
    # Deterministic content (no timings): downstream stages depend on this file.
    metrics = {"success": report.success, "failed_rules": len(report.failures)}
    metrics.update({f"rows/{name}": len(frame) for name, (_, frame) in frames.items()})
    metrics.update(lengths)
    write_json(ws.metrics(STAGE), metrics)
    if tracker is not None:
        tracker.log_artifacts(str(report_dir), "validation")
    print(report.summary())
    if not report.success:
        raise StageError(
            f"data validation failed: {len(report.failures)} rule(s) broken (listed above). "
            f"Report: {report_dir / 'validation.json'}, Data Docs: {report_dir / 'data_docs'}"
        )
    return metrics


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
