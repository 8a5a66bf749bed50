"""tasks/dvc_ops.py on a small real DVC repo: the pipeline read through DVC's API, and whether
``dvc repro -s`` ran a stage (its command executed) or not (up to date, or restored from the run-cache)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tasks import dvc_ops

ROOT = Path(__file__).resolve().parents[1]

STEP = '''\
import json, sys
import yaml
from tasks.dvc_ops import mark_stage_started

mark_stage_started()
name, params = sys.argv[1], yaml.safe_load(open("params.yaml"))
if name == "fetch":
    open("src.txt", "w").write("source\\n")
elif name == "make":
    open("data.txt", "w").write(open("src.txt").read() * params["make"]["n"])
else:
    open("model.txt", "w").write(f"{params['train']['lr']} {len(open('data.txt').read())}\\n")
    json.dump({"lr": params["train"]["lr"]}, open("metrics.json", "w"))
'''

# File order is not dependency order: `train` needs `make`'s output, `make` needs `fetch`'s.
DVC_YAML = {"stages": {
    "train": {"cmd": "python step.py train", "deps": ["data.txt", "step.py"], "params": ["train.lr", "seed"],
              "outs": ["model.txt"], "metrics": [{"metrics.json": {"cache": False}}]},
    "make": {"cmd": "python step.py make", "deps": ["src.txt", "step.py"], "params": ["make"], "outs": ["data.txt"]},
    "fetch": {"cmd": "python step.py fetch", "always_changed": True, "outs": ["src.txt"]},
}}


def _set_lr(repo: Path, lr: float) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "make": {"n": 2}, "train": {"lr": lr, "unused": 1}}))


@pytest.fixture
def repo(tmp_path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    (repo / "step.py").write_text(STEP)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    _set_lr(repo, 0.1)
    return repo


def _repro(repo: Path, stage: str, **kwargs) -> bool:
    return dvc_ops.repro_stage(repo, stage, env={"PYTHONPATH": str(ROOT)}, echo=lambda line: None, **kwargs).ran


def test_the_pipeline_as_dvc_reads_it(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo: DVC's API must not depend on the working directory
    assert dvc_ops.stage_order(repo) == ["fetch", "make", "train"]
    assert dvc_ops.always_changed_stages(repo) == {"fetch"}
    assert dvc_ops.stage_params(repo, "train") == {"train": {"lr": 0.1}, "seed": 0}
    assert dvc_ops.stage_params(repo, "make") == {"make": {"n": 2}}
    assert dvc_ops.stage_outputs(repo, "train") == [repo / "model.txt"]  # metrics are not outputs to hash


def test_ran_means_dvc_executed_the_command_not_skipped_nor_restored_from_the_run_cache(repo):
    assert [_repro(repo, s) for s in ("fetch", "make", "train")] == [True, True, True]
    assert [_repro(repo, s) for s in ("fetch", "make", "train")] == [True, False, False]  # fetch: always_changed

    _set_lr(repo, 0.2)
    assert _repro(repo, "train")
    assert (repo / "model.txt").read_text() == "0.2 14\n"
    _set_lr(repo, 0.1)  # back to a run the run-cache holds: DVC restores its outputs instead of running
    assert not _repro(repo, "train")
    assert (repo / "model.txt").read_text() == "0.1 14\n"
    assert _repro(repo, "train", force=True)

    (repo / "params.yaml").write_text((repo / "params.yaml").read_text().replace("unused: 1", "unused: 2"))
    assert not _repro(repo, "train")  # a key the stage does not list


def test_a_failing_stage_raises_with_its_output(repo):
    (repo / "step.py").write_text("raise SystemExit('broken step')\n")
    with pytest.raises(dvc_ops.StageFailed, match="broken step") as info:
        _repro(repo, "fetch")
    assert info.value.stage == "fetch" and info.value.returncode != 0
    assert "dvc checkout" not in str(info.value)  # nothing to restore: the stage never ran before


FAILING_TRAIN = '''\
import sys
from tasks.dvc_ops import mark_stage_started

mark_stage_started()
print("[rlhf] stage 'train' failed: lr too high for this model", file=sys.stderr)
sys.exit(1)
'''


def test_dvc_hints_to_do_what_the_pipeline_does_are_left_out_and_a_failure_says_how_to_restore(tmp_path):
    repo = tmp_path / "git-repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):  # with git, DVC adds "git add" hints to its output
        subprocess.run(cmd, cwd=repo, check=True)
    (repo / "step.py").write_text(STEP)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    _set_lr(repo, 0.1)
    lines: list[str] = []
    for stage in ("fetch", "make", "train"):
        dvc_ops.repro_stage(repo, stage, env={"PYTHONPATH": str(ROOT)}, echo=lines.append)
    assert any(line.startswith("Running stage 'train'") for line in lines)  # DVC's own account stays
    assert not [line for line in lines if "git add" in line or "autostage" in line or "dvc push" in line]

    (repo / "step.py").write_text(FAILING_TRAIN)
    _set_lr(repo, 0.3)
    with pytest.raises(dvc_ops.StageFailed) as info:
        _repro(repo, "train")
    message = str(info.value)
    assert message.startswith("stage 'train' failed: lr too high for this model\n")  # the stage's own reason, once
    assert "`dvc checkout train` restores them" in message
    assert not (repo / "model.txt").exists()  # what the message says: DVC removed it before running the stage...
    subprocess.run(["dvc", "checkout", "train"], cwd=repo, check=True, capture_output=True)
    assert (repo / "model.txt").read_text() == "0.1 14\n"  # ...and `dvc checkout train` brings it back
