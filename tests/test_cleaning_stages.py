"""`prepare.invalid_rows` in the pipeline: dropped rows go to the quarantine file and the metrics,
the gate stops a run whose sources lost too many rows, `fail` stops `prepare` writing nothing, and
every report names rows by their place in the source file, through splits and shuffles."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from rlhf_core.data.cleaning import InvalidRowsError
from tasks.params import ParamsError, apply_overrides, load_params
from tasks.stage_main import StageError
from tasks.workspace import Workspace
from tests.workspace_factory import PROJECT, TINY

N = 60


def _pairs(bad: dict[int, dict]) -> list[dict]:
    rows = [{"prompt": f"Question {i} about things?", "chosen": f"good answer {i}.", "rejected": f"bad answer {i}."} for i in range(N)]
    for index, change in bad.items():
        rows[index].update(change)
    return rows


def _workspace(tmp_path: Path, rows: list[dict], *overrides: str) -> tuple[Workspace, Path, dict]:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    (ws.root / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    (ws.root / "dvc.yaml").write_text((PROJECT / "dvc.yaml").read_text())
    apply_overrides(ws.params_file, TINY + ["validate.min_rows=5", "prepare.test_fraction=0.2", f"prepare.preference_data={data}", *overrides])
    return ws, data, load_params(ws.params_file)


def _split_rows(ws: Workspace, name: str) -> list[dict]:
    return [json.loads(line) for line in ws.split(name).read_text().splitlines()]


# Two invalid rows of 60 (3.3%): within the default max_invalid_fraction of 5%.
FEW_BAD = {4: {"chosen": " "}, 9: {"prompt": "Question 0 about things?", "chosen": "good answer 0.", "rejected": "bad answer 0."}}


def test_drop_quarantines_counts_and_keeps_source_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import tasks.prepare
    import tasks.validate

    ws, data, params = _workspace(tmp_path, _pairs(FEW_BAD))
    metrics = tasks.prepare.run(params, ws)
    assert f"{data} line 5: 'chosen' is empty" in capsys.readouterr().out  # the stage log shows the report

    quarantine = [json.loads(line) for line in (ws.prepared / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["source_file"], q["source_row"], q["source_unit"], q["rule"]) for q in quarantine] == [
        (str(data), 5, "line", "blank_text"), (str(data), 10, "line", "duplicate"),
    ]
    assert quarantine[0]["record"]["chosen"] == " " and quarantine[1]["detail"] == "same prompt, chosen, rejected as line 1"
    assert quarantine[0]["kind"] == "preference" and quarantine[0]["source"] == str(data)

    assert metrics["invalid_rows/blank_text"] == 1 and metrics["invalid_rows/duplicate"] == 1
    assert metrics["invalid_rows/unparseable"] == 0  # every rule is listed
    assert metrics["invalid_rows/preference"] == 2 and metrics["rows_read/preference"] == N
    assert metrics["invalid_rows/sft"] == 0  # the synthetic SFT task has no invalid rows
    assert json.loads(ws.metrics("prepare").read_text())["invalid_rows/total"] == 2

    summary = json.loads((ws.prepared / "invalid_rows.json").read_text())
    (entry,) = [s for s in summary["sources"] if s["kind"] == "preference"]
    assert (entry["source"], entry["rows"], entry["invalid"]) == (str(data), N, 2)
    assert entry["by_rule"]["blank_text"] == 1 and entry["examples"][0]["source"] == f"{data} line 5"

    # Through shuffle and split, each prepared row still names its line in the source file.
    source_lines = data.read_text().splitlines()
    prepared = _split_rows(ws, "pref_train") + _split_rows(ws, "pref_test")
    assert len(prepared) == N - 2
    assert sorted(r["source_row"] for r in prepared) == [i for i in range(1, N + 1) if i not in (5, 10)]
    for row in prepared:
        assert row["source_file"] == str(data) and row["source_unit"] == "line"
        assert json.loads(source_lines[row["source_row"] - 1])["prompt"] == row["prompt"]
    assert {"source_file", "source_row"} <= set(_split_rows(ws, "prompts")[0])

    tasks.validate.run(params, ws)  # 3.3% dropped: the gate lets it through
    report = json.loads((ws.reports("validate") / "validation.json").read_text())
    assert report["datasets"][f"preference source {data}"]["success"] is True


def test_later_stages_ignore_the_source_columns(tmp_path: Path) -> None:
    import tasks.prepare
    from rlhf_core.data.tokenize import TruncationConfig, tokenize_preference
    from tasks.training_io import load_split, load_tokenizer

    ws, _, params = _workspace(tmp_path, _pairs({}))
    tasks.prepare.run(params, ws)
    split = load_split(ws, "pref_train")
    assert "source_row" in split.column_names
    tokens, _ = tokenize_preference(split, load_tokenizer(ws), TruncationConfig(max_length=64))
    assert tokens.column_names == ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]


def test_gate_stops_a_run_whose_source_lost_too_many_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import tasks.prepare
    import tasks.validate

    bad = {i: {"rejected": f"good answer {i}."} for i in range(0, N, 10)}  # 6 rows: chosen equals rejected
    bad.update({i: {"chosen": None} for i in (3, 7)})  # 2 rows: missing field; 8 of 60 = 13.3%
    ws, data, params = _workspace(tmp_path, _pairs(bad))
    tasks.prepare.run(params, ws)
    with pytest.raises(StageError, match="validation failed"):
        tasks.validate.run(params, ws)
    printed = capsys.readouterr().out
    assert "invalid rows within max_invalid_fraction" in printed
    assert "8 of 60 rows (13.3%) dropped" in printed and "at most 5.0% allowed" in printed
    assert "chosen_equals_rejected 6" in printed and "missing_field 2" in printed
    assert f"{data} line 1: chosen_equals_rejected: chosen and rejected are both 'good answer 0.'" in printed
    report = json.loads((ws.reports("validate") / "validation.json").read_text())
    entry = report["datasets"][f"preference source {data}"]
    assert entry["success"] is False and entry["rules"][0]["unexpected_count"] == 8
    assert report["datasets"]["pref_train"]["success"] is True  # the kept rows themselves are fine

    # A looser threshold lets the same data through.
    apply_overrides(ws.params_file, ["validate.max_invalid_fraction=0.2"])
    tasks.validate.run(load_params(ws.params_file), ws)


def test_fail_stops_prepare_writing_nothing(tmp_path: Path) -> None:
    import tasks.prepare

    lines = [json.dumps(r) for r in _pairs({})]
    lines[30] = lines[30][:25]  # a truncated line in the middle of the file
    lines[40] = json.dumps({"prompt": "Nul\x00", "chosen": "a", "rejected": "b"})
    ws, data, params = _workspace(tmp_path, [], "prepare.invalid_rows=fail")
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidRowsError) as err:
        tasks.prepare.run(params, ws)
    message = str(err.value)
    assert f"{data}: 2 of 60 rows invalid" in message
    assert f"{data} line 31: malformed JSON" in message
    assert f"{data} line 41: 'prompt' holds control character U+0000" in message
    assert not ws.prepared.exists() and not ws.metrics("prepare").exists() and not ws.tokenizer.exists()


def test_config_rejects_unknown_policies_and_bad_fractions(tmp_path: Path) -> None:
    from tasks.params import typed
    from tasks.prepare import PrepareConfig
    from tasks.validation import ValidationConfig

    with pytest.raises(ParamsError, match="invalid_rows must be 'drop' or 'fail', got 'skip'"):
        typed({"prepare": {"invalid_rows": "skip"}}, "prepare", PrepareConfig)
    with pytest.raises(ParamsError, match="validate.max_invalid_fraction"):
        typed({"validate": {"max_invalid_fraction": 1.5}}, "validate", ValidationConfig)
    assert typed({"prepare": {}}, "prepare", PrepareConfig).invalid_rows == "drop"
    assert typed({"validate": {}}, "validate", ValidationConfig).max_invalid_fraction == 0.05


def test_gate_examples_name_the_source_row_and_control_characters_fail(tmp_path: Path) -> None:
    """Frames that did not come through prepare (no cleaning) still meet the gate's own rules."""
    from tasks.validation import ValidationConfig, validate_frames

    rows = [{"prompt": f"Q{i}?", "prompt_messages": [{"role": "user", "content": f"Q{i}?"}], "completion": f"A{i}.",
             "source_file": "raw/demos.jsonl", "source_row": 100 + i, "source_unit": "line"} for i in range(10)]
    rows[6]["completion"] = "bad\x00byte"
    report = validate_frames({"sft_train": ("sft", pd.DataFrame(rows))}, ValidationConfig(min_rows=5), tmp_path)
    (failure,) = report.failures
    assert failure.rule == "completion has no control characters"
    assert failure.examples == [{"row": 6, "source": "raw/demos.jsonl line 106", "completion": "bad\x00byte"}]
    assert "row 6 (raw/demos.jsonl line 106): completion='bad\\x00byte'" in report.summary()
