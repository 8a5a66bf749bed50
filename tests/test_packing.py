"""Padding-free (packed) batches: the layout, and the SFT, reward-model and DPO numbers equal the padded ones.

Each check builds the same examples into a padded batch and a packed one and compares what the trainers
compute from them (SFT loss and accuracy, reward scores and Bradley–Terry loss, DPO/KTO log-probs and
losses) on a tiny GPT-2 (learned absolute positions) and a tiny Llama (RoPE), to 1e-5.
"""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from rlhf_core.data.collate import PreferenceCollator, SFTCollator
from rlhf_core.data.packing import PackedGroup, PackedPreferenceCollator, PackedSFTCollator, best_fit_rows, pack_sequences
from rlhf_core.data.tokenize import IGNORE_INDEX, TruncationConfig, tokenize_preference, tokenize_sft
from rlhf_core.losses import dpo_loss, reward_loss
from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, load_reward_model, save_model, train_tokenizer
from rlhf_core.trainers.dpo import DPOConfig, kl_logps, pair_logps, pair_token_counts, train_dpo
from rlhf_core.trainers.offline_methods import with_mismatched_completions
from rlhf_core.trainers.padding_free import packing_error, padding_free_is_exact
from rlhf_core.trainers.reward_model import RewardConfig, pair_scores, train_reward_model
from rlhf_core.trainers.sft import SFTConfig, sft_terms, train_sft

WORDS = ["apple", "pear", "plum", "fig", "grape", "dog", "cat", "cow", "owl", "red", "blue", "green"]
ARCHS = ["gpt2", "llama"]


def test_best_fit_rows_and_layout() -> None:
    assert best_fit_rows([6, 3, 2, 4], 6) == [[0], [3, 2], [1]]  # longest first, into the fullest row it fits
    packed = pack_sequences([[11] * 6, [12] * 3, [13] * 2, [14] * 4], 0, {"labels": ([[1] * 6, [2] * 3, [3] * 2, [4] * 4], -1)})
    assert packed["input_ids"].tolist() == [[11] * 6, [14] * 4 + [13] * 2, [12] * 3 + [0] * 3]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert packed["sequence_ids"].tolist() == [[0] * 6, [3] * 4 + [2] * 2, [1] * 3 + [-1] * 3]
    assert packed["labels"].tolist() == [[1] * 6, [4] * 4 + [3] * 2, [2] * 3 + [-1] * 3]
    assert packed["last_index"].tolist() == [5, 14, 11, 9]  # flat row · 6 + column of each last token
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([[1], []], 0)


def test_packed_collators_hide_boundaries() -> None:
    sft = PackedSFTCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}])
    assert set(sft) == {"input_ids", "position_ids", "labels"}  # no attention_mask: the batch is packed
    assert sft["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert sft["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 9, IGNORE_INDEX]]  # first tokens: nobody's target
    pairs = PackedPreferenceCollator(0)([
        {"prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5, 6], "kl_input_ids": [7]},
        {"prompt_input_ids": [1], "chosen_input_ids": [8, 9], "rejected_input_ids": [2], "kl_input_ids": [3, 4]},
    ])
    group = PackedGroup.from_batch(pairs, "pairs")
    assert group is not None and group.n_sequences == 4  # chosen 0, 1 then rejected 2, 3
    flat_ids, flat_mask = group.input_ids.flatten(), group.completion_mask.flatten()
    ends = group.last_index.tolist()
    assert flat_ids[ends].tolist() == [3, 9, 6, 2]  # each sequence's last token
    assert flat_mask[group.sequence_ids.flatten() == 2].tolist() == [0, 0, 1, 1, 1]  # pair 0's rejected: prompt, completion
    assert PackedGroup.from_batch(pairs, "kl").n_sequences == 2
    assert PackedGroup.from_batch(PreferenceCollator(0)([{"prompt_input_ids": [1], "chosen_input_ids": [2],
                                                           "rejected_input_ids": [3]}]), "pairs") is None


@pytest.fixture(scope="module")
def toy():
    """Records of different lengths (so padding and packing differ), a tokenizer."""
    rng = random.Random(0)
    rows = []
    for _ in range(12):
        prompt = "List " + " ".join(rng.sample(WORDS, rng.randint(1, 5))) + "."
        rows.append({"prompt": prompt, "prompt_messages": [{"role": "user", "content": prompt}],
                     "completion": " ".join(rng.choices(WORDS, k=rng.randint(1, 14))) + ".",
                     "chosen": " ".join(rng.sample(WORDS[:5], rng.randint(1, 4))) + ".",
                     "rejected": " ".join(rng.sample(WORDS[5:], rng.randint(1, 6))) + "."})
    tokenizer = train_tokenizer([r["prompt"] for r in rows] + [r["completion"] for r in rows], vocab_size=300)
    trunc = TruncationConfig(max_length=48)
    sft, _ = tokenize_sft(datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "prompt_messages", "completion")} for r in rows]),
                          tokenizer, trunc)
    pref_records = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "prompt_messages", "chosen", "rejected")} for r in rows])
    pref, _ = tokenize_preference(pref_records, tokenizer, trunc)
    return tokenizer, [sft[i] for i in range(len(sft))], [p for p in with_mismatched_completions(pref, 48)], pref_records


def _policy(tokenizer, arch: str) -> torch.nn.Module:
    return build_tiny_causal_lm(tokenizer, TinyModelConfig(arch=arch, hidden_size=32, n_layer=2, n_head=2, max_positions=48), seed=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_loss_and_accuracy_equal_padded(toy, arch: str) -> None:
    tokenizer, sft, _, _ = toy
    model = _policy(tokenizer, arch)
    padded = sft_terms(model, SFTCollator(tokenizer.pad_token_id)(sft))
    packed_batch = PackedSFTCollator(tokenizer.pad_token_id)(sft)
    assert packed_batch["input_ids"].numel() < SFTCollator(tokenizer.pad_token_id)(sft)["input_ids"].numel()  # it packed
    packed = sft_terms(model, packed_batch)
    torch.testing.assert_close(packed[0], padded[0], atol=1e-5, rtol=0)
    assert int(packed[1]) == int(padded[1]) and int(packed[2]) == int(padded[2])  # same tokens scored, same guesses
    packed[0].backward()  # gradients flow through the packed path
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ARCHS)
def test_dpo_and_kto_logps_and_loss_equal_padded(toy, arch: str) -> None:
    tokenizer, _, pairs, _ = toy
    model = _policy(tokenizer, arch)
    reference = _policy(tokenizer, "gpt2" if arch == "llama" else "llama")  # any other model as reference
    padded_batch = PreferenceCollator(tokenizer.pad_token_id)(pairs)
    packed_batch = PackedPreferenceCollator(tokenizer.pad_token_id)(pairs)
    for average in (False, True):
        padded = pair_logps(model, padded_batch, average=average)
        packed = pair_logps(model, packed_batch, average=average)
        for a, b in zip(packed, padded):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
    for a, b in zip(pair_token_counts(packed_batch), pair_token_counts(padded_batch)):
        assert torch.equal(a, b)
    torch.testing.assert_close(kl_logps(model, packed_batch), kl_logps(model, padded_batch), atol=1e-5, rtol=1e-6)
    with torch.no_grad():
        refs = {name: pair_logps(reference, batch, average=False) for name, batch in (("padded", padded_batch), ("packed", packed_batch))}
    losses = {name: dpo_loss(*pair_logps(model, batch, average=False), *refs[name], beta=0.1)[0].mean()
              for name, batch in (("padded", padded_batch), ("packed", packed_batch))}
    assert abs(losses["padded"].item() - 0.6931) > 1e-3  # two different models: not the trivial ln 2
    torch.testing.assert_close(losses["packed"], losses["padded"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_scores_and_bradley_terry_loss_equal_padded(toy, arch: str, tmp_path) -> None:
    tokenizer, _, pairs, _ = toy
    save_model(_policy(tokenizer, arch), tokenizer, tmp_path / "base")
    model = load_reward_model(str(tmp_path / "base"), seed=2)
    padded = pair_scores(model, PreferenceCollator(tokenizer.pad_token_id)(pairs))
    packed = pair_scores(model, PackedPreferenceCollator(tokenizer.pad_token_id)(pairs))
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward_loss(*packed).mean(), reward_loss(*padded).mean(), atol=1e-5, rtol=0)
    assert padded[0].detach().std().item() > 1e-3  # the scores differ between pairs: a real comparison


def test_probe_accepts_gpt2_and_llama_and_rejects_models_that_ignore_position_ids(toy, capsys, tmp_path) -> None:
    from transformers import BloomConfig, BloomForCausalLM, GPT2LMHeadModel

    tokenizer = toy[0]
    for arch in ARCHS:
        assert packing_error(_policy(tokenizer, arch))[0] < 1e-5
    save_model(_policy(tokenizer, "gpt2"), tokenizer, tmp_path / "base")
    assert packing_error(load_reward_model(str(tmp_path / "base")), scalar_head=True)[0] < 1e-5

    class CountsPositionsAlongTheRow(GPT2LMHeadModel):  # absolute positions 0..W-1, whatever position_ids say
        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    ignoring = CountsPositionsAlongTheRow(_policy(tokenizer, "gpt2").config)
    assert packing_error(ignoring)[0] > 1e-2
    assert not padding_free_is_exact(ignoring)
    assert "does not keep packed sequences apart" in capsys.readouterr().out
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=2))  # ALiBi from the mask
    assert not padding_free_is_exact(bloom)
    assert "training on padded batches" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["sft", "reward", "dpo"])
def test_trainers_log_the_same_losses_packed_and_padded(toy, kind: str, tmp_path) -> None:
    """The trainers' wiring: 3 steps and an evaluation, packed by default and padded on request, agree to 1e-5."""
    tokenizer, _, _, records = toy
    sft_records = records.map(lambda r: {"completion": r["chosen"]}).remove_columns(["chosen", "rejected"])
    runs = {}
    for padding_free in (True, False):
        logs: list[dict] = []

        def log_fn(metrics, step, logs=logs):
            logs.append(metrics)

        common = dict(output_dir=str(tmp_path / f"{kind}-{padding_free}"), max_steps=3, logging_steps=1, eval_steps=3,
                      save_steps=100, per_device_train_batch_size=6, max_length=48, progress=False, padding_free=padding_free)
        policy = _policy(tokenizer, "llama")
        if kind == "sft":
            result = train_sft(policy, tokenizer, sft_records, sft_records, SFTConfig(**common), log_fn=log_fn)
        elif kind == "reward":
            save_model(policy, tokenizer, tmp_path / "rm-base")
            rm = load_reward_model(str(tmp_path / "rm-base"))
            result = train_reward_model(rm, tokenizer, records, records, RewardConfig(**common), log_fn=log_fn)
        else:
            result = train_dpo(policy, tokenizer, records, records, DPOConfig(**common, overopt_prompts=0), log_fn=log_fn)
        steps = [m["train/loss"] for m in logs if "train/loss" in m and "train/total_flos" not in m]  # not the summary
        runs[padding_free] = (steps, result.metrics["eval/loss"])
    (packed_losses, packed_eval), (padded_losses, padded_eval) = runs[True], runs[False]
    assert len(packed_losses) == 3
    assert packed_losses == pytest.approx(padded_losses, abs=1e-5) and packed_eval == pytest.approx(padded_eval, abs=1e-5)
