"""Session fixtures for learning tests: the synthetic task, a tokenizer, a trained SFT model and reward model.

Trained once per test session and shared by the SFT, reward-model, DPO, PPO and evaluation
tests (each of which copies what it modifies). Sizes are the smallest at which the learning
assertions hold with margin on 2 CPU cores.
"""

from __future__ import annotations

import pytest

TASK_SIZES = dict(n_sft=2000, n_pref_train=16000, n_pref_test=400, n_prompts=128, temperature=0.2)
SFT_STEPS = 300
RM_STEPS = 250


@pytest.fixture(scope="session")
def synthetic_task(tmp_path_factory) -> dict:
    from rlhf_core.data.formats import normalize
    from rlhf_core.data.loading import load_records
    from rlhf_core.synthetic import generate_task

    out = tmp_path_factory.mktemp("synthetic")
    info = generate_task(out, seed=0, **TASK_SIZES)
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
def synthetic_tokenizer(synthetic_task):
    from rlhf_core.models import train_tokenizer

    texts = [r["prompt"] for r in synthetic_task["sft_train"]] + [r["completion"] for r in synthetic_task["sft_train"]]
    return train_tokenizer(texts, vocab_size=512)


@pytest.fixture(scope="session")
def sft_result(synthetic_task, synthetic_tokenizer, tmp_path_factory):
    """A tiny GPT-2 trained from scratch with ``train_sft``; its model saved to ``dir``."""
    from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, save_model
    from rlhf_core.trainers.sft import SFTConfig, train_sft

    work = tmp_path_factory.mktemp("sft")
    model = build_tiny_causal_lm(synthetic_tokenizer, TinyModelConfig(hidden_size=128, n_layer=2, max_positions=64), seed=0)
    cfg = SFTConfig(output_dir=str(work / "ckpt"), max_steps=SFT_STEPS, learning_rate=2e-3, per_device_train_batch_size=32,
                    eval_steps=SFT_STEPS, save_steps=10_000, logging_steps=25, max_length=64, progress=False)
    logs: list[tuple[int, dict]] = []
    result = train_sft(model, synthetic_tokenizer, synthetic_task["sft_train"], synthetic_task["sft_test"], cfg,
                       log_fn=lambda m, s: logs.append((s, m)))
    save_model(result.model, synthetic_tokenizer, work / "model")
    return {"dir": work / "model", "result": result, "logs": logs, "cfg": cfg}


@pytest.fixture(scope="session")
def reward_model_result(sft_result, synthetic_task, synthetic_tokenizer, tmp_path_factory):
    """A reward model trained with ``train_reward_model`` from the SFT model (as the ``reward`` stage does); saved to ``dir``."""
    from rlhf_core.models import load_reward_model, save_model
    from rlhf_core.trainers.reward_model import RewardConfig, train_reward_model

    work = tmp_path_factory.mktemp("reward")
    model = load_reward_model(str(sft_result["dir"]))
    cfg = RewardConfig(output_dir=str(work / "ckpt"), max_steps=RM_STEPS, learning_rate=1e-3, per_device_train_batch_size=64,
                       eval_steps=RM_STEPS, save_steps=10_000, logging_steps=50, max_length=64, progress=False)
    result = train_reward_model(model, synthetic_tokenizer, synthetic_task["pref_train"], synthetic_task["pref_test"], cfg)
    save_model(result.model, synthetic_tokenizer, work / "model")
    return {"dir": work / "model", "result": result, "cfg": cfg}
