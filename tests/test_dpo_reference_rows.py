"""Precomputed reference log-probs only for the training rows the Trainer will read.

``rlhf_core.trainers.common.train_batches_read`` predicts, from the Trainer's own train dataloader, the row batches
its ``max_steps`` steps read; ``train_dpo`` scores those (and the whole eval set) and leaves the others NaN.
"""

from __future__ import annotations

import math
import random

import datasets
import pytest
import torch
from transformers import Trainer, TrainerCallback

from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, train_tokenizer
from rlhf_core.models.lora import LoraSettings
from rlhf_core.trainers import dpo as dpo_module
from rlhf_core.trainers.common import TrainConfig, train_batches_read, training_arguments
from rlhf_core.trainers.dpo import DPOConfig, train_dpo

WORDS = ["apple", "pear", "plum", "fig", "grape", "dog", "cat", "cow", "owl", "red", "blue", "green"]
N_ROWS, STEPS, BATCH = 96, 4, 8  # 4 steps of 8 read 32 of the 96 rows


@pytest.fixture(scope="module")
def toy():
    rng = random.Random(1)
    rows = []
    for _ in range(N_ROWS):
        prompt = f"List {rng.randint(2, 4)} words."
        rows.append({"prompt": prompt, "prompt_messages": [{"role": "user", "content": prompt}],
                     "chosen": " ".join(rng.sample(WORDS[:6], rng.randint(1, 3))) + ".",
                     "rejected": " ".join(rng.sample(WORDS[6:], rng.randint(1, 3))) + "."})
    pref = datasets.Dataset.from_list(rows)
    tokenizer = train_tokenizer([r["prompt"] for r in rows] + [r["chosen"] + r["rejected"] for r in rows], vocab_size=300)
    return pref, tokenizer


class Recorder:
    """Spies on ``train_dpo``: the reference-scored train set, the global RNG around the new pre-training work."""

    def __init__(self, monkeypatch, change_batches=None) -> None:
        self.scored: list[datasets.Dataset] = []
        self.rng_kept: list[bool] = []
        real_read, real_score = dpo_module.train_batches_read, dpo_module.precompute_reference_logps

        def read(trainer):
            before = torch.get_rng_state()
            batches = real_read(trainer)
            self.rng_kept.append(torch.equal(before, torch.get_rng_state()))
            return change_batches(batches) if change_batches else batches

        def score(*args, **kwargs):
            before = torch.get_rng_state()
            out = real_score(*args, **kwargs)
            self.rng_kept.append(torch.equal(before, torch.get_rng_state()))
            self.scored.append(out)
            return out

        monkeypatch.setattr(dpo_module, "train_batches_read", read)
        monkeypatch.setattr(dpo_module, "precompute_reference_logps", score)


def _run(toy, tmp_path, name, callbacks=None, **overrides):
    pref, tokenizer = toy
    policy = build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2, max_positions=32), seed=0)
    cfg = DPOConfig(**{**dict(output_dir=str(tmp_path / name), max_steps=STEPS, save_steps=100, eval_steps=100,
                              logging_steps=1, per_device_train_batch_size=BATCH, max_length=32, progress=False,
                              learning_rate=1e-2, seed=5, eval_on_start=False), **overrides})
    logs: list[tuple[int, dict]] = []
    result = train_dpo(policy, tokenizer, pref, pref.select(range(16)), cfg, log_fn=lambda m, s: logs.append((s, m)),
                       callbacks=callbacks)
    losses = [(step, m["train/loss"]) for step, m in logs if "train/loss" in m and "train/total_flos" not in m]
    assert len(losses) == cfg.max_steps
    return losses, result.model


def _scored_rows(train: datasets.Dataset, field: str = "ref_chosen_logps") -> set[int]:
    return {i for i, v in enumerate(train[field]) if not math.isnan(v)}


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_scoring_only_the_rows_read_trains_as_scoring_every_row(method, toy, tmp_path, monkeypatch):
    only = Recorder(monkeypatch)
    losses, model = _run(toy, tmp_path, "only", method=method)
    train = only.scored[0]
    fields = ["ref_chosen_logps", "ref_rejected_logps"] + (["ref_kl_logps"] if method == "kto" else [])
    # Exactly the rows read: none without a reference reached a loss (it would raise), and 4 steps of 8 read 32
    # distinct rows (one epoch: a permutation).
    assert len(_scored_rows(train)) == STEPS * BATCH < N_ROWS
    assert all(_scored_rows(train, f) == _scored_rows(train) for f in fields)
    assert not any(math.isnan(v) for f in fields for v in only.scored[1][f])  # the whole eval set
    assert all(only.rng_kept), "the row prediction or the scoring drew from the global RNG"

    monkeypatch.undo()
    every = Recorder(monkeypatch, change_batches=lambda b: b + [[i] for i in range(N_ROWS)])  # the rest as well
    every_losses, every_model = _run(toy, tmp_path, "every", method=method)
    assert len(_scored_rows(every.scored[0])) == N_ROWS
    assert losses == every_losses
    for (name, a), (_, b) in zip(model.named_parameters(), every_model.named_parameters()):
        assert torch.equal(a, b), name
    if method == "dpo":  # batched as the Trainer reads them, the reference is what a frozen copy computes on the batch
        live_losses, _ = _run(toy, tmp_path, "live", method=method, reference="live")
        assert live_losses == losses


def test_a_row_read_without_a_reference_stops_training(toy, tmp_path, monkeypatch):
    Recorder(monkeypatch, change_batches=lambda b: b[:-1])  # the last batch read is not scored
    with pytest.raises(RuntimeError, match="without a precomputed reference log-prob"):
        _run(toy, tmp_path, "short")


def test_a_resumed_run_reads_only_scored_rows_and_ends_as_the_straight_run(toy, tmp_path):
    _, straight = _run(toy, tmp_path, "straight", save_steps=2)
    with pytest.raises(KeyboardInterrupt):
        _run(toy, tmp_path, "resumed", save_steps=2, callbacks=[StopAt(3)])
    _, resumed = _run(toy, tmp_path, "resumed", save_steps=2)  # from checkpoint-2: steps 3 and 4 (the NaN guard is on)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_lora_reference_is_the_base_model(toy, tmp_path, monkeypatch):
    plain = Recorder(monkeypatch)
    _run(toy, tmp_path, "plain", max_steps=1)
    monkeypatch.undo()
    lora = Recorder(monkeypatch)
    _run(toy, tmp_path, "lora", max_steps=1, lora=LoraSettings(r=4, alpha=8))
    for a, b in zip(plain.scored, lora.scored):  # train (8 rows scored) and eval
        for field in ("ref_chosen_logps", "ref_rejected_logps"):
            torch.testing.assert_close(torch.tensor(a[field]), torch.tensor(b[field]), rtol=0, atol=0, equal_nan=True)


class RowTrainer(Trainer):
    """A Trainer over a dataset of row indices that records the rows each loss reads."""

    read: list[list[int]]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.read.append(inputs["row"].tolist())
        return (model.weight * inputs["row"].float().mean()).sum()


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def _row_trainer(tmp_path, n, **cfg) -> RowTrainer:
    data = datasets.Dataset.from_dict({"row": list(range(n))})
    args = training_arguments(TrainConfig(output_dir=str(tmp_path), progress=False, eval_steps=10_000, **cfg),
                              eval_strategy="no", use_cpu=True)
    trainer = RowTrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=data,
                         data_collator=lambda rows: {"row": torch.tensor([r["row"] for r in rows])})
    trainer.read = []
    return trainer


@pytest.mark.parametrize("n, batch, accumulation, steps", [(10, 3, 2, 4), (10, 3, 1, 5), (23, 4, 3, 7), (50, 8, 1, 3)])
def test_predicted_batches_are_the_batches_the_trainer_reads(tmp_path, n, batch, accumulation, steps):
    """Partial last batches, partial last updates, several epochs; and a run resumed from a checkpoint reads the
    rest of them (from its own prediction, which is the uninterrupted run's)."""
    cfg = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=steps,
               save_steps=2, seed=7)
    trainer = _row_trainer(tmp_path / "straight", n, **cfg)
    rng = torch.get_rng_state()
    predicted = train_batches_read(trainer)
    assert torch.equal(rng, torch.get_rng_state())
    trainer.train()
    assert trainer.read == predicted

    stopped = _row_trainer(tmp_path / "resumed", n, **cfg)
    stopped.add_callback(StopAt(3))
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    resumed = _row_trainer(tmp_path / "resumed", n, **cfg)
    assert train_batches_read(resumed) == predicted
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert resumed.read == predicted[len(predicted) - len(resumed.read):]
