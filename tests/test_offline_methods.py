"""SimPO, ORPO and KTO through the DPO trainer (``dpo.method``): batch terms, KTO's mismatched pairs, learning."""

from __future__ import annotations

import random

import datasets
import pytest
import torch
import torch.nn.functional as F

from rlhf_core.data.collate import PreferenceCollator
from rlhf_core.data.tokenize import TruncationConfig, tokenize_preference
from rlhf_core.logprobs import sequence_logprobs
from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, load_causal_lm, train_tokenizer
from rlhf_core.trainers.dpo import DPOConfig, train_dpo
from rlhf_core.trainers.offline_methods import PairLogps, kto_terms, orpo_terms, simpo_terms, with_mismatched_completions

WORDS = ["apple", "pear", "plum", "fig", "grape", "dog", "cat", "cow", "owl", "red", "blue", "green"]
TINY = TinyModelConfig(hidden_size=32, n_layer=1, n_head=2, max_positions=32)


@pytest.fixture(scope="module")
def toy():
    rng = random.Random(1)
    rows = []
    for _ in range(64):
        prompt = f"Name {rng.randint(2, 4)} things."
        rows.append({"prompt": prompt, "prompt_messages": [{"role": "user", "content": prompt}],
                     "chosen": " ".join(rng.sample(WORDS[:5], 2)) + ".", "rejected": " ".join(rng.sample(WORDS[5:], 2)) + "."})
    pref = datasets.Dataset.from_list(rows)
    tokenizer = train_tokenizer([r["prompt"] for r in rows] + [r["chosen"] + " " + r["rejected"] for r in rows], vocab_size=300)
    return pref, tokenizer


def _logps() -> PairLogps:
    return PairLogps(chosen=torch.tensor([-4.0, -9.0]), rejected=torch.tensor([-6.0, -3.0]),
                     chosen_tokens=torch.tensor([2.0, 3.0]), rejected_tokens=torch.tensor([3.0, 1.0]))


def test_simpo_terms_use_length_averaged_logps_and_report_their_implicit_reward():
    losses, stats = simpo_terms(_logps(), beta=2.0, gamma=1.0, label_smoothing=0.0)
    # chosen means -2, -3; rejected means -2, -3 -> z = 0 - 1/2 for both; loss = -log σ(2·(-0.5)) = -log σ(-1)
    assert torch.allclose(losses, torch.full((2,), -F.logsigmoid(torch.tensor(-1.0)).item()))
    assert torch.allclose(stats["rewards/chosen"], torch.tensor([-4.0, -6.0]))
    assert stats["rewards/accuracies"].tolist() == [0.0, 0.0]  # ties are not wins


def test_orpo_terms_add_the_batch_token_mean_nll_of_the_chosen():
    logps = _logps()
    losses, stats = orpo_terms(logps, beta=0.5)
    nll = (4.0 + 9.0) / (2.0 + 3.0)  # summed NLL over every chosen token ÷ their number, as TRL's CE loss
    assert stats["nll_loss"].item() == pytest.approx(nll)
    c, r = torch.tensor([-2.0, -3.0]), torch.tensor([-2.0, -3.0])
    log_odds = (c - r) - (torch.log1p(-c.exp()) - torch.log1p(-r.exp()))
    assert torch.allclose(losses, -0.5 * F.logsigmoid(log_odds) + nll)


def test_kto_terms_split_each_pair_into_a_desirable_and_an_undesirable_example():
    logps = _logps()
    ref = (torch.tensor([-5.0, -9.0]), torch.tensor([-5.0, -4.0]))
    losses, stats = kto_terms(logps, ref, torch.tensor(0.3), beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert losses.shape == (4,)
    r = torch.tensor([1.0, 0.0, -1.0, 1.0])  # policy − reference: chosen rows, then rejected rows
    expected = torch.cat([1 - torch.sigmoid(0.1 * (r[:2] - 0.3)), 2.0 * (1 - torch.sigmoid(0.1 * (0.3 - r[2:])))])
    assert torch.allclose(losses, expected)
    assert stats["rewards/accuracies"].tolist() == [1.0, 0.0]
    assert stats["kl"].item() == pytest.approx(0.3)


def test_mismatched_completions_pair_each_prompt_with_the_previous_chosen_and_fit_max_length(toy):
    pref, tokenizer = toy
    tok, _ = tokenize_preference(pref, tokenizer, TruncationConfig(max_length=32))
    out = with_mismatched_completions(tok, max_length=12)
    assert out["kl_input_ids"][1] == tok["chosen_input_ids"][0][: 12 - len(tok["prompt_input_ids"][1])]
    assert out["kl_input_ids"][0] == tok["chosen_input_ids"][-1][: 12 - len(tok["prompt_input_ids"][0])]
    batch = PreferenceCollator(tokenizer.pad_token_id)([out[i] for i in range(4)])
    assert batch["kl_input_ids"].shape == batch["chosen_input_ids"].shape
    # The collated KL rows are prompt i + the shifted completion, scored on the completion only.
    row = batch["kl_input_ids"][1][batch["kl_attention_mask"][1].bool()].tolist()
    assert row == list(out["prompt_input_ids"][1]) + list(out["kl_input_ids"][1])
    assert int(batch["kl_completion_mask"][1].sum()) == len(out["kl_input_ids"][1])


@pytest.mark.parametrize("method", ["simpo", "orpo", "kto"])
def test_each_method_trains_logs_trl_names_and_moves_the_policy(method, toy, tmp_path):
    pref, tokenizer = toy
    policy = build_tiny_causal_lm(tokenizer, TINY, seed=0)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    logs: list[dict] = []
    cfg = DPOConfig(output_dir=str(tmp_path), method=method, max_steps=4, save_steps=100, eval_steps=2, logging_steps=2,
                    per_device_train_batch_size=8, max_length=32, progress=False, learning_rate=1e-2, rpo_alpha=0.0)
    result = train_dpo(policy, tokenizer, pref, pref.select(range(16)), cfg, log_fn=lambda m, s: logs.append(m))
    seen = {k for m in logs for k in m}
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert f"train/{name}" in seen and f"eval/{name}" in seen, name
    assert all(torch.isfinite(torch.tensor(v)) for m in logs for v in m.values())
    changed = [k for k, v in result.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, f"{method} did not change any weight"
    if method == "kto":
        assert "eval/kl" in result.metrics and result.metrics["eval/kl"] >= 0.0


def test_kto_live_reference_computes_what_precomputed_reference_computes(toy, tmp_path):
    pref, tokenizer = toy
    results = {}
    for reference in ("precomputed", "live"):
        policy = build_tiny_causal_lm(tokenizer, TINY, seed=0)
        cfg = DPOConfig(output_dir=str(tmp_path / reference), method="kto", max_steps=3, save_steps=100, eval_steps=100,
                        logging_steps=1, per_device_train_batch_size=8, max_length=32, progress=False, learning_rate=1e-2,
                        reference=reference)
        results[reference] = train_dpo(policy, tokenizer, pref, pref.select(range(16)), cfg).metrics
    assert results["live"]["eval/rewards/margins"] != 0.0
    for key, value in results["precomputed"].items():
        assert results["live"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_method_is_checked_with_the_choices():
    with pytest.raises(ValueError, match="simpo"):
        DPOConfig(method="cpo")


def _length_averaged_accuracy(model, tokenizer, pref: datasets.Dataset) -> float:
    """Share of held-out pairs whose chosen completion has the higher mean per-token log-prob."""
    tok, _ = tokenize_preference(pref, tokenizer, TruncationConfig(max_length=64))
    batch = PreferenceCollator(tokenizer.pad_token_id)([tok[i] for i in range(len(tok))])
    with torch.no_grad():
        sides = [sequence_logprobs(model.eval(), batch[f"{s}_input_ids"], batch[f"{s}_attention_mask"],
                                   batch[f"{s}_completion_mask"], average=True) for s in ("chosen", "rejected")]
    return float((sides[0] > sides[1]).float().mean())


@pytest.mark.slow
@pytest.mark.parametrize("method,beta", [("simpo", 2.0), ("orpo", 0.5), ("kto", 0.1)])
def test_method_lifts_held_out_preference_accuracy_above_sft(method, beta, sft_result, synthetic_task, synthetic_tokenizer, tmp_path):
    """From the shared SFT model, 120 steps lift held-out preference accuracy above 0.6 (the method's own implicit reward)."""
    pref_test = synthetic_task["pref_test"]
    before = _length_averaged_accuracy(load_causal_lm(str(sft_result["dir"])), synthetic_tokenizer, pref_test)
    cfg = DPOConfig(output_dir=str(tmp_path), method=method, beta=beta, max_steps=120, learning_rate=2e-4,
                    per_device_train_batch_size=32, eval_steps=120, save_steps=10_000, logging_steps=40, max_length=64,
                    progress=False, rpo_alpha=0.0, eval_on_start=False)  # the test evaluates SFT itself
    result = train_dpo(load_causal_lm(str(sft_result["dir"])), synthetic_tokenizer, synthetic_task["pref_train"], pref_test, cfg)
    accuracy = result.metrics["eval/rewards/accuracies"]
    assert accuracy > 0.6, (method, accuracy, result.metrics)
    if method != "kto":  # KTO's implicit reward is relative to the reference: 0 (no wins) before training
        assert accuracy > before, (method, before, accuracy)  # the SFT model already ranks ~0.75 of pairs right
