"""The `rlhf` command line: help everywhere, data inspection, clear errors; the multi-GPU launcher."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.launch import launch_command

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["run"], ["stage"], ["reproduce"], ["compare"], ["status"], ["promote"], ["data"],
                                  ["data", "inspect"]])
def test_every_command_has_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_data_inspect_detects_and_normalises_a_public_format(fixtures_dir):
    result = runner.invoke(app, ["data", "inspect", str(fixtures_dir / "public" / "sharegpt-dpo-en-demo.json"), "--kind", "preference"])
    assert result.exit_code == 0, result.output
    assert "format: sharegpt_dpo" in result.output and "chosen" in result.output


def test_data_inspect_names_the_columns_of_an_unknown_format(tmp_path):
    bad = tmp_path / "weird.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    result = runner.invoke(app, ["data", "inspect", str(bad), "--kind", "preference"])
    assert result.exit_code == 1
    assert "question" in result.output and "hh_rlhf" in result.output


def test_data_inspect_renames_columns_and_refuses_a_malformed_rename(tmp_path):
    data = tmp_path / "se.jsonl"
    data.write_text('{"question": "Why?", "response_j": "Because.", "response_k": "No."}\n')
    renames = ["--column", "question=prompt", "--column", "response_j=chosen", "--column", "response_k=rejected"]
    result = runner.invoke(app, ["data", "inspect", str(data), *renames])
    assert result.exit_code == 0, result.output
    assert "format: prompt_chosen_rejected" in result.output and "chosen: Because." in result.output
    result = runner.invoke(app, ["data", "inspect", str(data), "--column", "question"])
    assert result.exit_code == 1 and "expected OLD=NEW" in result.output


def test_data_inspect_reads_a_dirty_file_as_prepare_does(tmp_path):
    """A broken line and a null reply are what `prepare.invalid_rows: drop` sets aside: named with their lines, the
    other rows shown (a strict read would stop at the first)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "A?", "chosen": "yes", "rejected": "no"}\n{"prompt": "B?", "chosen": \n'
                    '{"prompt": "C?", "chosen": null, "rejected": "no"}\n{"prompt": "D?", "chosen": "yes", "rejected": "no"}\n')
    result = runner.invoke(app, ["data", "inspect", str(data), "--rows", "2"])
    assert result.exit_code == 0, result.output
    assert f"{data}: 2 of 4 rows invalid" in result.output
    assert f"{data} line 2: malformed JSON" in result.output and f"{data} line 3: column 'chosen' must be a string" in result.output
    assert f"--- row 1 ({data} line 4)" in result.output and "prompt: D?" in result.output


def test_data_inspect_names_a_missing_file(tmp_path):
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and "nope.jsonl" in result.output


def test_promote_by_hand_needs_force():
    result = runner.invoke(app, ["promote", "some-run-id"])
    assert result.exit_code == 2 and "--force" in result.output


def test_training_stages_launch_through_accelerate_on_several_gpus():
    # No GPU here: this checks the command the launcher would exec, not a multi-GPU run.
    assert launch_command("sft", 1) is None
    cmd = launch_command("dpo", 4)
    assert cmd[:2] == ["accelerate", "launch"] and "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[-2:] == ["-m", "tasks.dpo"]
    with pytest.raises(ValueError, match="not a training stage"):
        launch_command("evaluate", 2)
