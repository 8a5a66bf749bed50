"""A training stage may output its best evaluation checkpoint by a chosen metric instead of its last one."""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, train_tokenizer
from rlhf_core.trainers.dpo import DPOConfig, train_dpo

WORDS = ["apple", "pear", "plum", "fig", "grape", "dog", "cat", "cow", "owl", "red"]


@pytest.fixture(scope="module")
def toy():
    rng = random.Random(2)
    rows = [{"prompt": "Pick.", "prompt_messages": [{"role": "user", "content": "Pick."}],
             "chosen": " ".join(rng.sample(WORDS[:5], 2)) + ".", "rejected": " ".join(rng.sample(WORDS[5:], 2)) + "."}
            for _ in range(64)]
    pref = datasets.Dataset.from_list(rows)
    return pref, train_tokenizer([r["chosen"] + " " + r["rejected"] for r in rows] + ["Pick."], vocab_size=300)


def _train(toy, tmp_path, **cfg):
    pref, tokenizer = toy
    logs: list[tuple[int, dict]] = []
    model = build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2, max_positions=32), seed=0)
    config = DPOConfig(output_dir=str(tmp_path / "ckpt"), max_steps=8, eval_steps=2, save_steps=2, logging_steps=2,
                       per_device_train_batch_size=8, max_length=32, progress=False, learning_rate=1e-2, rpo_alpha=0.0,
                       save_total_limit=None, **cfg)
    result = train_dpo(model, tokenizer, pref, pref.select(range(16)), config, log_fn=lambda m, s: logs.append((s, m)))
    # Step 0 is the starting policy's evaluation (eval_on_start: the over-optimisation curve's origin), not a checkpoint.
    assert any(s == 0 and "eval/loss" in m for s, m in logs)
    evals = {s: m for s, m in logs if "eval/loss" in m and s > 0}
    return result, evals


def test_the_best_checkpoint_by_the_chosen_metric_is_the_output_and_recorded(toy, tmp_path):
    # Highest held-out loss: a choice the last checkpoint (lowest loss after training) would not make.
    result, evals = _train(toy, tmp_path / "best", best_metric="loss", greater_is_better=True)
    expected = max(evals, key=lambda s: evals[s]["eval/loss"])
    assert expected != max(evals), evals  # the test is only meaningful when best != last
    assert result.metrics["checkpoint/best_step"] == expected
    assert result.metrics["eval/loss"] == pytest.approx(evals[expected]["eval/loss"])
    last, _ = _train(toy, tmp_path / "last")
    differs = [k for k, v in result.model.state_dict().items() if not torch.equal(v, last.model.state_dict()[k])]
    assert differs and "checkpoint/best_step" not in last.metrics  # the output is that checkpoint's weights, not the last


def test_best_metric_needs_evaluated_checkpoints():
    with pytest.raises(ValueError, match="multiple of eval_steps"):
        DPOConfig(best_metric="rewards/accuracies", eval_steps=3, save_steps=4)
