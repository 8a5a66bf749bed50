"""Preflight: every group of params.yaml built into its stage's typed config before anything runs; bad values named, nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks.params import ParamsError, apply_overrides, load_params
from tasks.preflight import check_group, check_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def params_file(tmp_path: Path) -> Path:
    dest = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", dest)
    return dest


def test_the_shipped_params_pass():
    check_params(load_params(ROOT / "params.yaml"))


@pytest.mark.parametrize("override,message", [
    ("dpo.beta=-1", "dpo: beta must be > 0"),
    ("dpo.no_such_key=1", "dpo: unknown key(s) ['no_such_key']"),
    ("sft.max_steps=many", "sft.max_steps"),
    ("model.tiny.n_layer=zero", "model.tiny.n_layer"),
    ("ppo.reward_fn=silver", "ppo.reward_fn must be null or 'gold'"),
    ("grpo.train=yes please", "grpo.train must be true or false"),
    ("grpo.rewards=[{name: rouge}]", "unknown reward(s) ['rouge']"),
    ("dpo.method=cpo", "method 'cpo' is not one of"),
    ("promote.policy=best", "promote.policy"),
])
def test_a_bad_override_is_rejected_before_anything_is_written(params_file, override, message):
    before = params_file.read_text()
    with pytest.raises(ParamsError) as err:
        apply_overrides(params_file, [override], check=check_params)
    assert message in str(err.value)
    assert "\n" not in str(err.value)  # one problem, one line
    assert params_file.read_text() == before


def test_every_problem_is_reported_at_once(params_file):
    with pytest.raises(ParamsError) as err:
        apply_overrides(params_file, ["dpo.beta=-1", "sft.learning_rate=fast", "reward.no_such=1"], check=check_params)
    lines = str(err.value).splitlines()
    assert len(lines) == 4  # a heading and one line per problem, in params.yaml's group order
    assert "sft.learning_rate" in lines[1] and "reward: unknown key(s) ['no_such']" in lines[2] and "dpo: beta" in lines[3]


def test_auto_lengths_are_left_to_the_stages_and_unknown_groups_named():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sft"]["max_length"] = "auto"
    params["ppo"]["max_new_tokens"] = "auto"
    params["dpo"].update(max_length="auto", max_prompt_length=256)  # > the default max_length: the stage checks it
    check_params(params)
    params["sft"]["max_steps"] = "auto"  # not a length setting
    with pytest.raises(ParamsError, match="sft.max_steps"):
        check_group(params, "sft")
    with pytest.raises(ParamsError, match="unknown group 'trainer'"):
        check_params({**params, "trainer": {"lr": 1}})


def _cli(ws: Path, *args: str):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "flows.cli", "run", "-w", str(ws), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": ""}, check=False)


@pytest.mark.parametrize("args,message", [
    (["--set", "dpo.beta=-1"], "dpo: beta must be > 0"),
    (["--set", "dpo=0.2"], "dpo is a group"),
    (["--set", "nonexistent.key=1"], "nonexistent is not a group"),
    (["--set", "dpo.beta"], "expected KEY=VALUE"),
    (["--set", "tracking.uri=http://127.0.0.1:9"], "the MLflow tracking server http://127.0.0.1:9 does not answer"),
])
def test_rlhf_run_stops_before_starting_anything_with_one_line_and_params_intact(params_file, args, message):
    before = params_file.read_text()
    proc = _cli(params_file.parent, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line
    assert params_file.read_text() == before
    # Nothing started: no stage ran (no dvc.lock), no tracking store, no Prefect server's home.
    assert {p.name for p in params_file.parent.iterdir()} <= {"params.yaml", ".prefect"}
    assert not (params_file.parent / "dvc.lock").exists() and not (params_file.parent / "mlflow.db").exists()
