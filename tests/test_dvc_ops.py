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
