"""The validation gate inside the pipeline: malformed datasets configured in params.yaml are
rejected, naming the broken rule and example rows by their line in the source file; nothing
downstream runs. With `prepare.invalid_rows: fail`, row-level defects (blank text, duplicates,
chosen == rejected) stop `prepare` itself; the rest reach the `validate` gate."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tasks.params import apply_overrides, load_params
from tasks.stage_main import StageError
from tasks.workspace import Workspace
from tests.workspace_factory import PROJECT, TINY, make_workspace


def _pairs(n: int, **overrides) -> list[dict]:
    topics = ["fruit", "animal", "color", "tool"]
    rows = [{"prompt": f"Question {i} about {topics[i % 4]}?", "chosen": f"good answer {i}.", "rejected": f"bad answer {i}."}
            for i in range(n)]
    for index, change in overrides.get("rows", {}).items():
        rows[index].update(change)
    return rows


def _demos(n: int, **overrides) -> list[dict]:
    rows = [{"prompt": f"Say {i}.", "completion": f"number {i}."} for i in range(n)]
    for index, change in overrides.get("rows", {}).items():
        rows[index].update(change)
    return rows


# name -> (kind, rows, rule that must be named, the source line of the first offending row or None).
# Rules in rlhf_core.data.rules.RULES are prepare's row rules; the others are the gate's.
MALFORMED = {
    "empty chosen reply": ("preference", _pairs(80, rows={3: {"chosen": ""}, 7: {"chosen": ""}}), "blank_text", 4),
    "blank prompt": ("preference", _pairs(80, rows={5: {"prompt": "   "}}), "blank_text", 6),
    "chosen equals rejected": ("preference", _pairs(80, rows={i: {"rejected": f"good answer {i}."} for i in (2, 9, 40)}),
                               "chosen_equals_rejected", 3),
    "duplicate pairs": ("preference", _pairs(80) + _pairs(80)[:6], "duplicate", 81),
    "too few pairs": ("preference", _pairs(12), "enough rows", None),
    "overlong rejected text": ("preference", _pairs(80, rows={4: {"rejected": "word " * 6000}}), "rejected length within limits", 5),
    "prompts too long for the model": ("preference", _pairs(80, rows={i: {"prompt": "very long question " * 40} for i in range(0, 80, 4)}),
                                       "prompt tokens within max_prompt_tokens", None),
    "empty demonstration": ("sft", _demos(80, rows={1: {"completion": ""}}), "blank_text", 2),
    "duplicate demonstrations": ("sft", _demos(80) + _demos(80)[:5], "duplicate", 81),
    "overlong demonstration": ("sft", _demos(80, rows={6: {"completion": "x" * 25000}}), "completion length within limits", 7),
    "too few demonstrations": ("sft", _demos(15), "enough rows", None),
}


@pytest.fixture(scope="module")
def base_ws(tmp_path_factory) -> Path:
    """A workspace directory with the tiny params (no git/DVC needed to call the stages' run())."""
    ws = tmp_path_factory.mktemp("gate")
    (ws / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    (ws / "dvc.yaml").write_text((PROJECT / "dvc.yaml").read_text())
    apply_overrides(ws / "params.yaml", TINY + ["validate.min_rows=40", "prepare.invalid_rows=fail"])
    return ws


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_the_gate_rejects_malformed_data_naming_the_rule(case, base_ws, tmp_path, capsys):
    import tasks.prepare
    import tasks.validate
    from rlhf_core.data.cleaning import InvalidRowsError
    from rlhf_core.data.rules import RULES

    kind, rows, rule, line = MALFORMED[case]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    (ws.root / "params.yaml").write_text((base_ws / "params.yaml").read_text())
    (ws.root / "dvc.yaml").write_text((base_ws / "dvc.yaml").read_text())
    key = "preference_data" if kind == "preference" else "sft_data"
    apply_overrides(ws.params_file, [f"prepare.{key}={data}"])
    params = load_params(ws.params_file)
    if rule in RULES:  # a row rule: prepare stops with the report and writes nothing
        with pytest.raises(InvalidRowsError, match=rule) as err:
            tasks.prepare.run(params, ws)
        assert f"{data} line {line}:" in str(err.value), err.value
        assert not ws.prepared.exists() and not ws.metrics("prepare").exists()
        return
    tasks.prepare.run(params, ws)
    with pytest.raises(StageError, match="validation failed"):
        tasks.validate.run(params, ws)
    printed = capsys.readouterr().out
    assert rule in printed, printed
    if line is not None:  # the example row is named by its line in the source file, not its place in a split
        assert f"({data} line {line})" in printed, printed
    report = json.loads((ws.reports("validate") / "validation.json").read_text())
    failed = {r["rule"] for d in report["datasets"].values() for r in d["rules"] if not r["success"]}
    assert rule in failed
    assert (ws.reports("validate") / "data_docs" / "index.html").exists()
    assert not ws.model("sft").exists()


@pytest.mark.slow
def test_dvc_repro_stops_at_the_gate_and_keeps_earlier_outputs(tmp_path):
    """With the default `invalid_rows: drop`, 10 of 80 pairs (12.5%) dropped is more than the gate allows."""
    ws = make_workspace(tmp_path / "ws")
    data = tmp_path / "bad.jsonl"
    rows = _pairs(80, rows={i: {"rejected": f"good answer {i}."} for i in range(0, 80, 8)})
    rule = "invalid rows within max_invalid_fraction"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    apply_overrides(ws / "params.yaml", [f"prepare.preference_data={data}"])
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run(["dvc", "repro"], cwd=ws, text=True, capture_output=True, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "stage 'validate' failed" in output and rule in output and "chosen_equals_rejected 10" in output
    assert "Running stage 'sft'" not in output and not (ws / "models").exists()
    assert (ws / "data" / "prepared" / "pref_train.jsonl").exists()  # prepare's output is kept
