"""Divergence guard: a NaN stops training at its step with no NaN reaching the weights, or is skipped a bounded number of times."""

from __future__ import annotations

import random

import datasets
import pytest
import torch
from transformers import TrainerCallback

from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, train_tokenizer
from rlhf_core.trainers.divergence import DivergenceError, DivergenceGuard, nonfinite_gradients
from rlhf_core.trainers.sft import SFTConfig, train_sft

WORDS = ["apple", "pear", "plum", "fig", "dog", "cat"]


@pytest.fixture(scope="module")
def toy():
    rng = random.Random(0)
    rows = [{"prompt": "List words.", "prompt_messages": [{"role": "user", "content": "List words."}],
             "completion": " ".join(rng.sample(WORDS, 3)) + "."} for _ in range(64)]
    sft = datasets.Dataset.from_list(rows)
    tokenizer = train_tokenizer([r["prompt"] for r in rows] + [r["completion"] for r in rows], vocab_size=300)
    return sft, tokenizer


class PoisonAt(TrainerCallback):
    """Makes the model's logits NaN during the given optimizer steps (1-based), as a diverged model would."""

    def __init__(self, model: torch.nn.Module, steps: set[int]) -> None:
        self.steps, self.active = steps, False
        model.lm_head.register_forward_hook(lambda mod, inp, out: out * float("nan") if self.active else out)

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 in self.steps


def _train(toy, tmp_path, poison: set[int], max_skipped_steps: int = 0):
    """SFT through ``train_sft``, whose ``run_training`` attaches the guard with ``max_skipped_steps``."""
    sft, tokenizer = toy
    model = build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2, max_positions=32), seed=0)
    cfg = SFTConfig(output_dir=str(tmp_path / "ckpt"), max_steps=8, save_steps=2, eval_steps=100, logging_steps=1,
                    per_device_train_batch_size=8, max_length=32, progress=False, learning_rate=1e-3,
                    max_skipped_steps=max_skipped_steps)
    result = train_sft(model, tokenizer, sft, sft.select(range(8)), cfg, callbacks=[PoisonAt(model, poison)])
    return model, result


def test_a_nan_stops_training_at_its_step_keeps_earlier_checkpoints_and_finite_weights(toy, tmp_path):
    with pytest.raises(DivergenceError, match="optimizer step 5") as err:
        _train(toy, tmp_path, {5})
    assert "learning rate" in str(err.value)
    checkpoints = sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint-*"))
    assert checkpoints and checkpoints[-1] == "checkpoint-4", checkpoints  # written before the bad step, kept


def test_bad_steps_are_skipped_up_to_the_limit_and_leave_weights_finite(toy, tmp_path, capsys):
    model, result = _train(toy, tmp_path, {3, 6}, max_skipped_steps=2)
    assert "step 3: non-finite gradient" in capsys.readouterr().out
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(torch.tensor(result.metrics["eval/loss"]))
    with pytest.raises(DivergenceError, match="already skipped steps \\[3\\]"):
        _train(toy, tmp_path / "again", {3, 6}, max_skipped_steps=1)


def test_what_the_guard_prevents_a_plain_optimizer_step_on_a_nan_gradient_poisons_the_weights():
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    (layer(torch.ones(1, 2)) * float("nan")).sum().backward()
    assert DivergenceGuard(max_skipped_steps=1).check(layer, 1, 1e-3) is True  # skipped: gradients dropped
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in layer.parameters())
    (layer(torch.ones(1, 2)) * float("nan")).sum().backward()
    optimizer.step()  # no guard
    assert not all(torch.isfinite(p).all() for p in layer.parameters())


def test_nonfinite_gradients_names_the_parameters():
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.tensor([[1.0, float("inf")], [0.0, 0.0]])
    layer.bias.grad = torch.zeros(2)
    assert nonfinite_gradients(layer) == ["weight"]
    with pytest.raises(ValueError):
        DivergenceGuard(max_skipped_steps=-1)


def test_ppo_and_grpo_loops_stop_on_a_nan_gradient(tmp_path):
    """The online trainers' own loops run the same guard before each optimizer step."""
    from rlhf_core.synthetic import all_prompts
    from rlhf_core.trainers.grpo import GRPOConfig, train_grpo
    from rlhf_core.trainers.ppo import PPOConfig, train_ppo

    tokenizer = train_tokenizer(all_prompts(), vocab_size=300)
    prompts = all_prompts()[:16]
    records = datasets.Dataset.from_dict({"prompt": prompts, "prompt_messages": [[{"role": "user", "content": p}] for p in prompts]})
    nan_reward = {"nan": lambda p, r: [float("nan")] * len(p)}  # NaN advantages -> NaN loss -> NaN gradients
    small = dict(max_new_tokens=4, max_length=32, progress=False, learning_rate=1e-3)
    grpo = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_updates=2, prompts_per_update=4, num_generations=2, mini_batch_size=8,
                      **small)
    with pytest.raises(DivergenceError, match="optimizer step 1"):
        train_grpo(build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2)), None, None, tokenizer,
                   records, records, grpo, reward_fns=nan_reward)
    ppo = PPOConfig(output_dir=str(tmp_path / "ppo"), max_updates=2, rollout_batch_size=8, mini_batch_size=4, normalize_reward=False,
                    missing_eos_penalty=None, **small)
    with pytest.raises(DivergenceError, match="optimizer step 1"):
        train_ppo(build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2)), None, None, tokenizer,
                  records, records, ppo, reward_fn=nan_reward["nan"])
