"""Build a throw-away pipeline workspace: a git + DVC repo holding this project's pipeline files.

Tests run the real ``dvc`` CLI (and the Prefect flow) in it, with a tiny ``params.yaml``.
``stage_workspace`` is the light kind: a folder with ``params.yaml`` and ``dvc.yaml`` only, for
running stages in the test process through their ``run(params, ws)``.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tasks.params import apply_overrides, load_params
from tasks.workspace import Workspace

PROJECT = Path(__file__).resolve().parents[1]
PIPELINE = ("prepare", "validate", "sft", "reward", "ppo", "dpo", "evaluate", "promote")
"""The stages after ``ingest``, in order (``grpo`` is off by default)."""
COPIED = ("rlhf_core", "tasks", "flows", "dvc.yaml", "params.yaml", "prefect.yaml", ".dvcignore")

# Small enough for CI (the whole pipeline in about a minute on 2 cores), large enough to be real.
TINY = [
    "model.tiny.hidden_size=32", "model.tiny.n_layer=1", "model.tiny.n_head=2", "model.tokenizer_vocab_size=300",
    "prepare.synthetic.n_sft=240", "prepare.synthetic.n_pref_train=160", "prepare.synthetic.n_pref_test=48",
    "prepare.synthetic.n_prompts=24", "validate.min_rows=16",
    "sft.max_steps=12", "sft.eval_steps=6", "sft.save_steps=6", "sft.logging_steps=3", "sft.per_device_train_batch_size=16",
    "reward.max_steps=8", "reward.eval_steps=4", "reward.save_steps=4", "reward.logging_steps=2", "reward.per_device_train_batch_size=16",
    "dpo.max_steps=8", "dpo.eval_steps=4", "dpo.save_steps=4", "dpo.logging_steps=2", "dpo.per_device_train_batch_size=16",
    "evaluate.max_prompts=24", "evaluate.batch_size=24", "evaluate.max_new_tokens=8", "evaluate.n_samples_logged=4",
    "evaluate.samples_per_prompt=1",  # the default 4 narrows intervals; tests check mechanics (test_pipeline_dvc uses 2)
    # Models this small barely move from SFT: the tests check promotion's mechanics, not the criteria's strictness.
    "promote.min_win_rate=0", "promote.confidence=0", "promote.max_kl=null",
]
TINY_PPO = ["ppo.max_updates=2", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.ppo_epochs=1",
            "ppo.eval_steps=2", "ppo.save_steps=1", "ppo.max_new_tokens=8", "ppo.reward_norm_batches=1"]
ALL_AUTO = ["validate.max_prompt_tokens=auto", "sft.max_length=auto", "reward.max_length=auto", "dpo.max_length=auto",
            "ppo.max_new_tokens=auto", "ppo.max_length=auto", "evaluate.max_new_tokens=auto"]
"""Every length setting from the data (``tasks/lengths.py``)."""
TINY_GRPO = ["grpo.max_updates=2", "grpo.prompts_per_update=4", "grpo.num_generations=4", "grpo.mini_batch_size=8",
             "grpo.eval_steps=2", "grpo.save_steps=1", "grpo.max_new_tokens=8"]


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, check=True, text=True, capture_output=True, **kwargs)


def make_workspace(dest: Path, overrides: list[str] | None = None, remote: Path | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = PROJECT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(src, dest / name)
    shutil.copy(PROJECT / ".gitignore", dest / ".gitignore")
    apply_overrides(dest / "params.yaml", TINY + TINY_PPO + TINY_GRPO + list(overrides or []))
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "config", "user.email", "ci@example.invalid"], dest)
    run(["git", "config", "user.name", "ci"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "config", "core.autostage", "false"], dest)
    run(["dvc", "remote", "add", "-d", "local", str(remote or dest.parent / f"{dest.name}-remote")], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "workspace"], dest)
    return dest


def stage_workspace(dest: Path, overrides: list[str]) -> tuple[Workspace, dict[str, Any]]:
    """A folder with this project's ``params.yaml`` (TINY sizes, then ``overrides``) and ``dvc.yaml``, and its params.

    No git, no DVC: stages run in the test process through ``run(params, ws)`` (what ``python -m
    tasks.<stage>`` runs), which is faster than their entry points.
    """
    ws = Workspace(dest)
    ws.root.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        (ws.root / name).write_text((PROJECT / name).read_text())
    apply_overrides(ws.params_file, [*TINY, *TINY_PPO, *overrides])
    return ws, load_params(ws.params_file)


def run_in_process(params: dict[str, Any], ws: Workspace, stages: tuple[str, ...] | list[str] = PIPELINE) -> None:
    """Run ``stages`` in order through their ``run(params, ws)``, untracked."""
    for stage in stages:
        importlib.import_module(f"tasks.{stage}").run(params, ws, None)


def stage_metrics(ws: Workspace, stage: str) -> dict[str, Any]:
    """``metrics/<stage>.json`` of ``ws``."""
    return json.loads(ws.metrics(stage).read_text())
