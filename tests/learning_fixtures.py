"""Session fixtures for learning tests: the synthetic task, a tokenizer, a trained SFT model and reward model.

Trained once per test run and shared by the SFT, reward-model, DPO, PPO and evaluation tests (each of
which copies what it modifies). Under pytest-xdist the first worker that needs one builds it into a folder
all workers share, under a file lock; the others wait for it and load the files (what the pytest-xdist docs
recommend for session fixtures): each worker training its own copy cost about a minute of the suite's two
cores. Sizes are the smallest at which the learning assertions hold with margin on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

TASK_SIZES = dict(n_sft=2000, n_pref_train=16000, n_pref_test=400, n_prompts=128, temperature=0.2)
SFT_STEPS = 300
RM_STEPS = 250


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder ``name`` that ``build`` fills once for the whole test run, whichever xdist worker asks first.

    A build that fails leaves no completion marker, so the next worker to ask builds again (and fails alike).
    """
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # workers' base temps are popen-gw<N>/ folders of one run folder
        root = root.parent
    folder, done = root / "built-once" / name, root / "built-once" / f"{name}.done"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory) -> dict:
    from rlhf_core.data.formats import normalize
    from rlhf_core.data.loading import load_records
    from rlhf_core.synthetic import generate_task

    out = built_once(tmp_path_factory, "synthetic", lambda d: (d / "info.json").write_text(
        json.dumps(generate_task(d, seed=0, **TASK_SIZES))))
    info = json.loads((out / "info.json").read_text())
    sft = normalize(load_records(out / "sft.jsonl"), kind="sft", format="prompt_completion")
    parts = sft.train_test_split(test_size=0.1, seed=0)
    return {
        "dir": out,
        "info": info,
        "sft_train": parts["train"],
        "sft_test": parts["test"],
        "pref_train": normalize(load_records(out / "preferences_train.jsonl"), kind="preference"),
        "pref_test": normalize(load_records(out / "preferences_test.jsonl"), kind="preference"),
        "prompts": normalize(load_records(out / "prompts.jsonl"), kind="prompt"),
    }


@pytest.fixture(scope="session")
def synthetic_tokenizer(synthetic_task, tmp_path_factory):
    from rlhf_core.models import load_tokenizer, train_tokenizer
    from rlhf_core.models.tokenizer import save_tokenizer

    def build(folder: Path) -> None:
        texts = [r["prompt"] for r in synthetic_task["sft_train"]] + [r["completion"] for r in synthetic_task["sft_train"]]
        save_tokenizer(train_tokenizer(texts, vocab_size=512), folder)

    return load_tokenizer(str(built_once(tmp_path_factory, "tokenizer", build)))


@pytest.fixture(scope="session")
def sft_result(synthetic_task, synthetic_tokenizer, tmp_path_factory):
    """A tiny GPT-2 trained from scratch with ``train_sft``: its model in ``dir``, final ``metrics``, the ``logs``."""
    from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, save_model
    from rlhf_core.trainers.sft import SFTConfig, train_sft

    cfg = SFTConfig(output_dir="", max_steps=SFT_STEPS, learning_rate=2e-3, per_device_train_batch_size=32,
                    eval_steps=SFT_STEPS, save_steps=10_000, logging_steps=25, max_length=64, progress=False)

    def build(work: Path) -> None:
        model = build_tiny_causal_lm(synthetic_tokenizer, TinyModelConfig(hidden_size=128, n_layer=2, max_positions=64), seed=0)
        logs: list[tuple[int, dict]] = []
        result = train_sft(model, synthetic_tokenizer, synthetic_task["sft_train"], synthetic_task["sft_test"],
                           dataclasses.replace(cfg, output_dir=str(work / "ckpt")),
                           log_fn=lambda m, s: logs.append((s, m)))
        save_model(result.model, synthetic_tokenizer, work / "model")
        (work / "result.json").write_text(json.dumps({"metrics": result.metrics, "logs": logs}))

    work = built_once(tmp_path_factory, "sft", build)
    return {"dir": work / "model", **json.loads((work / "result.json").read_text()), "cfg": cfg}


@pytest.fixture(scope="session")
def reward_model_result(sft_result, synthetic_task, synthetic_tokenizer, tmp_path_factory):
    """A reward model trained with ``train_reward_model`` from the SFT model (as the ``reward`` stage does): its model in
    ``dir``, final ``metrics``."""
    from rlhf_core.models import load_reward_model, save_model
    from rlhf_core.trainers.reward_model import RewardConfig, train_reward_model

    def build(work: Path) -> None:
        model = load_reward_model(str(sft_result["dir"]))
        cfg = RewardConfig(output_dir=str(work / "ckpt"), max_steps=RM_STEPS, learning_rate=1e-3, per_device_train_batch_size=64,
                           eval_steps=RM_STEPS, save_steps=10_000, logging_steps=50, max_length=64, progress=False)
        result = train_reward_model(model, synthetic_tokenizer, synthetic_task["pref_train"], synthetic_task["pref_test"], cfg)
        save_model(result.model, synthetic_tokenizer, work / "model")
        (work / "metrics.json").write_text(json.dumps(result.metrics))

    work = built_once(tmp_path_factory, "reward", build)
    return {"dir": work / "model", "metrics": json.loads((work / "metrics.json").read_text())}
