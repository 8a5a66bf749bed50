"""SFT, reward-model and DPO trainers: resume identity, metrics, and learning on the synthetic task."""

from __future__ import annotations

import random

import datasets
import pytest
import torch
from transformers import TrainerCallback

from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, load_causal_lm, load_reward_model, save_model, train_tokenizer
from rlhf_core.trainers.dpo import DPOConfig, train_dpo
from rlhf_core.trainers.reward_model import RewardConfig, train_reward_model
from rlhf_core.trainers.sft import SFTConfig, train_sft

WORDS = ["apple", "pear", "plum", "fig", "grape", "dog", "cat", "cow", "owl", "red", "blue", "green"]


@pytest.fixture(scope="module")
def toy():
    """Small hand-built SFT and preference records, a tokenizer and a saved tiny model."""
    rng = random.Random(0)
    rows = []
    for _ in range(96):
        prompt = f"List {rng.randint(2, 4)} words."
        rows.append({"prompt": prompt, "prompt_messages": [{"role": "user", "content": prompt}],
                     "completion": " ".join(rng.sample(WORDS, 3)) + ".", "chosen": " ".join(rng.sample(WORDS[:5], 2)) + ".",
                     "rejected": " ".join(rng.sample(WORDS[5:], 2)) + "."})
    sft = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "prompt_messages", "completion")} for r in rows])
    pref = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "prompt_messages", "chosen", "rejected")} for r in rows])
    tokenizer = train_tokenizer([r["prompt"] for r in rows] + [r["completion"] for r in rows], vocab_size=300)
    return sft, pref, tokenizer


class CrashAt(TrainerCallback):
    """Simulates a crash (e.g. a preempted worker) right after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def _train(kind: str, toy, out_dir, callbacks=None, log_fn=None):
    sft, pref, tokenizer = toy
    torch.manual_seed(0)
    common = dict(output_dir=str(out_dir), max_steps=12, save_steps=5, eval_steps=100, logging_steps=2,
                  per_device_train_batch_size=8, max_length=32, progress=False, seed=3)
    policy = build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2, max_positions=32), seed=0)
    if kind == "sft":
        return train_sft(policy, tokenizer, sft, sft.select(range(16)), SFTConfig(**common), callbacks=callbacks, log_fn=log_fn)
    if kind == "reward":
        save_model(policy, tokenizer, out_dir.parent / f"{out_dir.name}-base")
        rm = load_reward_model(str(out_dir.parent / f"{out_dir.name}-base"))
        return train_reward_model(rm, tokenizer, pref, pref.select(range(16)), RewardConfig(**common), callbacks=callbacks, log_fn=log_fn)
    return train_dpo(policy, tokenizer, pref, pref.select(range(16)), DPOConfig(**common, learning_rate=1e-3), callbacks=callbacks, log_fn=log_fn)


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo"])
def test_resume_after_crash_gives_the_same_weights(kind, toy, tmp_path):
    straight_logs: list[tuple[int, dict]] = []
    uninterrupted = _train(kind, toy, tmp_path / "a", log_fn=lambda m, s: straight_logs.append((s, m))).model
    with pytest.raises(KeyboardInterrupt):
        _train(kind, toy, tmp_path / "b", callbacks=[CrashAt(7)])  # dies after the step-5 checkpoint
    assert (tmp_path / "b" / "checkpoint-5").is_dir()
    resumed_logs: list[tuple[int, dict]] = []
    resumed = _train(kind, toy, tmp_path / "b", log_fn=lambda m, s: resumed_logs.append((s, m))).model  # from checkpoint-5
    # The curve holds every step, the ones before the checkpoint replayed from it (runtime figures differ).
    def curve(logs):  # the end-of-training summary (total_flos, mean loss of this call) is not a point of the curve
        return [(step, {k: round(v, 5) for k, v in m.items() if "runtime" not in k and "per_second" not in k})
                for step, m in logs if "train/total_flos" not in m]

    assert [s for s, _ in resumed_logs] == [s for s, _ in straight_logs]
    # The first train log after the resume (step 6) averages the batches since the resume only (as transformers
    # does); every other point, replayed or trained, is the uninterrupted run's.
    first_after = [i for i, (step, m) in enumerate(curve(straight_logs)) if step > 5 and "train/loss" in m][0]
    assert [x for i, x in enumerate(curve(resumed_logs)) if i != first_after] == \
        [x for i, x in enumerate(curve(straight_logs)) if i != first_after]
    changed = 0
    start = build_tiny_causal_lm(toy[2], TinyModelConfig(hidden_size=32, n_layer=1, n_head=2, max_positions=32), seed=0)
    start_params = dict(start.named_parameters())
    for (name, a), (_, b) in zip(uninterrupted.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), f"{kind}: parameter {name} differs after resume"
        if name in start_params and start_params[name].shape == a.shape and not torch.equal(a, start_params[name]):
            changed += 1
    assert changed > 0, "training did not change the weights at all"


def test_trainers_report_trl_metric_names(toy, tmp_path):
    logs: list[dict] = []
    sft, pref, tokenizer = toy
    policy = build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2, max_positions=32), seed=0)
    cfg = DPOConfig(output_dir=str(tmp_path), max_steps=4, save_steps=100, eval_steps=2, logging_steps=2,
                    per_device_train_batch_size=8, max_length=32, progress=False)
    result = train_dpo(policy, tokenizer, pref, pref.select(range(16)), cfg, log_fn=lambda m, s: logs.append(m))
    seen = {k for m in logs for k in m}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert f"train/{name}" in seen and f"eval/{name}" in seen, name
        assert f"eval/{name}" in result.metrics
    assert "train/loss" in seen and "train/lr" in seen


def test_dpo_config_rejects_bad_values():
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="nope")
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(label_smoothing=0.5)


# --- learning on the synthetic task -------------------------------------------------------------


def _initial_eval_loss(sft_fixture, task, tokenizer) -> float:
    from rlhf_core.data.collate import SFTCollator
    from rlhf_core.data.tokenize import TruncationConfig, tokenize_sft
    from rlhf_core.losses import sft_loss

    cfg = sft_fixture["cfg"]
    model = build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=128, n_layer=2, max_positions=64), seed=0).eval()
    tokenized, _ = tokenize_sft(task["sft_test"], tokenizer, TruncationConfig(max_length=cfg.max_length))
    batch = SFTCollator(tokenizer.pad_token_id)([tokenized[i] for i in range(len(tokenized))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return float(sft_loss(logits[:, :-1], labels, labels != -100))


@pytest.mark.slow
def test_sft_held_out_loss_falls_by_30_percent(sft_result, synthetic_task, synthetic_tokenizer):
    before = _initial_eval_loss(sft_result, synthetic_task, synthetic_tokenizer)
    after = sft_result["metrics"]["eval/loss"]
    assert after <= 0.7 * before, (before, after)
    assert sft_result["metrics"]["eval/token_accuracy"] > 0.3
    assert {"eval/perplexity", "eval/token_accuracy"} <= set(sft_result["metrics"])
    assert any("train/loss" in m for _, m in sft_result["logs"])


@pytest.mark.slow
def test_reward_model_reaches_90_percent_of_bayes_accuracy(reward_model_result, synthetic_task):
    bayes = synthetic_task["info"]["bayes_accuracy_test"]
    metrics = reward_model_result["metrics"]
    assert metrics["eval/accuracy"] >= 0.9 * bayes, (metrics, bayes)


def mean_gold_reward(model, tokenizer, prompts_ds, seed: int = 0) -> float:
    from rlhf_core.data.tokenize import TruncationConfig, tokenize_prompts
    from rlhf_core.generation import generate
    from rlhf_core.synthetic import GoldReward

    tokenized, _ = tokenize_prompts(prompts_ds, tokenizer, TruncationConfig(max_length=48))
    out = generate(model.eval(), tokenizer, [list(x) for x in tokenized["prompt_input_ids"]], max_new_tokens=16,
                   temperature=1.0, do_sample=True, batch_size=64, seed=seed)
    scores = GoldReward()(list(prompts_ds["prompt"]), out.texts)
    return sum(scores) / len(scores)


@pytest.mark.slow
def test_dpo_beats_sft_on_held_out_preferences_and_gold_reward(sft_result, synthetic_task, synthetic_tokenizer, tmp_path):
    policy = load_causal_lm(str(sft_result["dir"]))
    # rpo_alpha: plain DPO (0) raises the preference accuracy but lets this tiny byte-level model's
    # chosen likelihood collapse into junk tokens, which lowers the gold reward (see README).
    cfg = DPOConfig(output_dir=str(tmp_path), max_steps=250, learning_rate=2e-4, beta=0.1, rpo_alpha=1.0,
                    per_device_train_batch_size=32, eval_steps=250, save_steps=10_000, logging_steps=50, max_length=64,
                    progress=False, eval_on_start=False)  # the test evaluates SFT itself
    result = train_dpo(policy, synthetic_tokenizer, synthetic_task["pref_train"], synthetic_task["pref_test"], cfg)
    assert result.metrics["eval/rewards/accuracies"] > 0.6, result.metrics
    sft_gold = mean_gold_reward(load_causal_lm(str(sft_result["dir"])), synthetic_tokenizer, synthetic_task["prompts"])
    dpo_gold = mean_gold_reward(result.model, synthetic_tokenizer, synthetic_task["prompts"])
    assert dpo_gold > sft_gold, (sft_gold, dpo_gold)


def test_lora_sft_trains_adapters_only_and_saves_a_plain_merged_model(toy, tmp_path):
    from rlhf_core.config import config_from_dict

    sft, _, tokenizer = toy
    base = build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2, max_positions=32), seed=0)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = config_from_dict(SFTConfig, {"output_dir": str(tmp_path / "ckpt"), "max_steps": 6, "save_steps": 100, "eval_steps": 100,
                                       "per_device_train_batch_size": 8, "max_length": 32, "progress": False,
                                       "learning_rate": 1e-2, "lora": {"r": 4, "alpha": 8}}, section="sft")
    result = train_sft(base, tokenizer, sft, sft.select(range(8)), cfg)
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in result.model.parameters())
    assert 0 < trainable < total / 5
    save_model(result.model, tokenizer, tmp_path / "merged")
    merged = load_causal_lm(str(tmp_path / "merged"))
    assert not hasattr(merged, "peft_config")
    changed = [k for k, v in merged.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "merging the trained adapters changed no weight"


def test_dpo_live_reference_computes_what_precomputed_reference_computes(toy, tmp_path):
    sft, pref, tokenizer = toy
    results = {}
    for reference in ("precomputed", "live"):
        policy = build_tiny_causal_lm(tokenizer, TinyModelConfig(hidden_size=32, n_layer=1, n_head=2, max_positions=32), seed=0)
        cfg = DPOConfig(output_dir=str(tmp_path / reference), max_steps=3, save_steps=100, eval_steps=100, logging_steps=1,
                        per_device_train_batch_size=8, max_length=32, progress=False, learning_rate=1e-2, reference=reference)
        results[reference] = train_dpo(policy, tokenizer, pref, pref.select(range(16)), cfg).metrics
    assert results["live"]["eval/rewards/margins"] != 0.0  # the policy moved away from its reference
    for key, value in results["precomputed"].items():
        assert results["live"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
