"""GRPO/RLOO trainer: config checks, TRL metric names, exact resume, learning with the gold reward as a verifiable reward."""

from __future__ import annotations

import datasets
import pytest
import torch

from rlhf_core import metrics as M
from rlhf_core.data.tokenize import TruncationConfig, tokenize_prompts
from rlhf_core.generation import generate
from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, load_causal_lm, train_tokenizer
from rlhf_core.reward_registry import build_reward
from rlhf_core.synthetic import GoldReward, all_prompts
from rlhf_core.trainers.grpo import GRPOConfig, train_grpo
from rlhf_core.trainers.ppo import saved_checkpoints

TINY = TinyModelConfig(n_layer=1, hidden_size=32, n_head=2, max_positions=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(all_prompts() + ["apple pear fig.", "red blue green.", "cat dog."] * 20, vocab_size=300)


def records(prompts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": prompts, "prompt_messages": [[{"role": "user", "content": p}] for p in prompts]})


@pytest.fixture(scope="module")
def prompts():
    everything = all_prompts()
    return records(everything[:40]), records(everything[100:106])


def config(tmp_path, **overrides) -> GRPOConfig:
    values = dict(output_dir=str(tmp_path / "grpo"), max_updates=2, prompts_per_update=4, num_generations=4, mini_batch_size=8,
                  forward_batch_size=16, learning_rate=1e-3, max_new_tokens=6, max_length=32, eval_steps=2, save_steps=2,
                  progress=False, eval_on_start=False)
    return GRPOConfig(**(values | overrides))


@pytest.mark.parametrize("overrides, match", [
    (dict(num_generations=1), "num_generations must be >= 2"),
    (dict(prompts_per_update=3, num_generations=3, mini_batch_size=4), r"3 × 3\) must be divisible"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(advantage="gae"), "advantage"),
    (dict(scale_rewards="prompt"), "scale_rewards"),
    (dict(beta=-0.1), "beta"),
])
def test_config_rejects_bad_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)


def test_needs_a_reward(tmp_path, tokenizer, prompts):
    with pytest.raises(ValueError, match="reward functions, a reward model, or both"):
        train_grpo(build_tiny_causal_lm(tokenizer, TINY), None, None, tokenizer, *prompts, config(tmp_path))


@pytest.mark.parametrize("advantage,beta,iterations", [("grpo", 0.0, 1), ("rloo", 0.04, 2)])
def test_logs_trl_metric_names_and_each_reward_part(tmp_path, tokenizer, prompts, advantage, beta, iterations):
    logs: dict[int, dict] = {}
    fns = {"length": build_reward("length", {"target": 3}), "format": build_reward("format", {"pattern": r"[a-z ]+\."})}
    cfg = config(tmp_path, advantage=advantage, beta=beta, num_iterations=iterations)
    result = train_grpo(build_tiny_causal_lm(tokenizer, TINY), None, None, tokenizer, *prompts, cfg, reward_fns=fns,
                        reward_weights={"format": 0.5}, monitor_fn=GoldReward(),
                        log_fn=lambda m, s: logs.setdefault(s, {}).update(m))
    seen = set(logs[1])
    expected = [M.GROUP_REWARD, M.GROUP_REWARD_STD, M.GROUP_ZERO_STD, M.COMPLETION_LENGTH, M.COMPLETION_CLIPPED,
                M.CLIP_RATIO_REGION, M.LOSS, M.GRAD_NORM, M.LEARNING_RATE, M.OBJECTIVE_GOLD,
                M.reward_part("length"), M.reward_part("format")] + ([M.KL] if beta else [])
    for name in expected:
        assert M.key(M.TRAIN, name) in seen, name
    assert (M.key(M.TRAIN, M.KL) in seen) == bool(beta)
    assert logs[1][M.key(M.TRAIN, M.GROUP_REWARD)] == pytest.approx(
        logs[1][M.key(M.TRAIN, M.reward_part("length"))] + 0.5 * logs[1][M.key(M.TRAIN, M.reward_part("format"))], abs=1e-5)
    for name in (M.OBJECTIVE_SCORES, M.OBJECTIVE_KL, M.OBJECTIVE_GOLD, M.reward_part("length")):
        assert M.key(M.EVAL, name) in result.metrics, name
    assert result.updates == 2 and [p.name for p in saved_checkpoints(tmp_path / "grpo")] == ["checkpoint_2"]


def test_evaluations_log_the_curve_point_with_the_reward_model_as_proxy_at_weight_zero(tmp_path, tokenizer, prompts):
    """Over-optimisation curve: at each evaluation (the initial policy's too) the proxy is the reward model's score of
    the held-out samples (given at reward_model_weight 0: scored, never optimised), with gold and KL."""
    from rlhf_core.models.scalar_head import sequence_scores
    from rlhf_core.rollout import sample_batch, tokenize_prompt_records
    from rlhf_core.trainers.ppo import value_model_from_policy

    reward_model = value_model_from_policy(build_tiny_causal_lm(tokenizer, TINY, seed=1), tokenizer.pad_token_id, seed=2)
    logs: dict[int, dict] = {}
    cfg = config(tmp_path, eval_on_start=True)
    result = train_grpo(build_tiny_causal_lm(tokenizer, TINY), None, reward_model, tokenizer, *prompts, cfg,
                        reward_fns={"length": build_reward("length", {"target": 3})}, monitor_fn=GoldReward(),
                        log_fn=lambda m, s: logs.setdefault(s, {}).update(m))
    curve = {s: m for s, m in logs.items() if M.key(M.EVAL, M.OVEROPT_KL) in m}
    assert sorted(curve) == [0, 2]
    for m in curve.values():
        for name in (M.OVEROPT_PROXY, M.OVEROPT_GOLD, M.OVEROPT_KL, M.OVEROPT_SQRT_KL):
            assert M.key(M.EVAL, name) in m, name
        assert m[M.key(M.EVAL, M.OVEROPT_GOLD)] == m[M.key(M.EVAL, M.OBJECTIVE_GOLD)]
    assert curve[0][M.key(M.EVAL, M.OVEROPT_KL)] == pytest.approx(0.0, abs=1e-6)
    assert M.key(M.TRAIN, M.reward_part("reward_model")) not in logs[1]  # not optimised
    # The final proxy, recomputed: the reward model's mean score of the trained policy's held-out samples (same seed).
    held_out = tokenize_prompt_records(prompts[1], tokenizer, max_length=cfg.max_length, max_new_tokens=cfg.max_new_tokens,
                                       what="eval")
    batch = sample_batch(result.policy, tokenizer, [list(p) for p in held_out["prompt_input_ids"]],
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, batch_size=cfg.forward_batch_size,
                         seed=cfg.seed)
    with torch.no_grad():
        expected = sequence_scores(reward_model, batch.query_response, batch.attention_mask).float().mean().item()
    assert curve[2][M.key(M.EVAL, M.OVEROPT_PROXY)] == pytest.approx(expected, abs=1e-5)
    assert curve[2][M.key(M.EVAL, M.OVEROPT_PROXY)] != pytest.approx(curve[2][M.key(M.EVAL, M.OBJECTIVE_SCORES)])


def test_resume_gives_identical_weights(tmp_path, tokenizer, prompts):
    length = build_reward("length", {"target": 4})

    def run(out: str, log_fn=None):
        cfg = config(tmp_path, output_dir=str(tmp_path / out), max_updates=4, gradient_accumulation_steps=2, mini_batch_size=4,
                     num_iterations=2, beta=0.04)
        return train_grpo(build_tiny_causal_lm(tokenizer, TINY), None, None, tokenizer, *prompts, cfg,
                          reward_fns={"length": length}, log_fn=log_fn)

    straight = run("straight")

    class Crash(RuntimeError):
        pass

    crashed: list[tuple[int, dict]] = []

    def crash_at_3(metrics, step):
        if step == 3:
            raise Crash
        crashed.append((step, metrics))

    with pytest.raises(Crash):
        run("resumed", crash_at_3)
    assert [p.name for p in saved_checkpoints(tmp_path / "resumed")] == ["checkpoint_2"]
    logs: list[tuple[int, dict]] = []
    resumed = run("resumed", lambda m, s: logs.append((s, m)))
    assert [s for s, _ in logs] == [1, 2, 2, 3, 4, 4]  # logs and evaluations at 2 and 4
    assert logs[:3] == crashed  # up to the checkpoint: replayed from it (wall-clock timings too), not recomputed
    start = build_tiny_causal_lm(tokenizer, TINY).state_dict()
    a, b = straight.policy.state_dict(), resumed.policy.state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a), "training changed nothing"
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- learning ----------------------------------------------------------------------------------


def gold_scores(model, tokenizer, held_out: datasets.Dataset, seed: int = 0) -> list[float]:
    tokenized, _ = tokenize_prompts(held_out, tokenizer, TruncationConfig(max_length=48))
    out = generate(model.eval(), tokenizer, [list(x) for x in tokenized["prompt_input_ids"]], max_new_tokens=12, batch_size=128,
                   seed=seed)
    return GoldReward()(list(held_out["prompt"]), out.texts)


@pytest.mark.slow
@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_group_methods_lift_held_out_gold_reward_over_sft(advantage, tmp_path, sft_result, synthetic_task, synthetic_tokenizer):
    """The gold reward as a verifiable reward: held-out gold above SFT's, paired win rate >= 0.75 over the same prompts."""
    tokenizer = synthetic_tokenizer
    sft = load_causal_lm(str(sft_result["dir"]))
    train = synthetic_task["pref_train"].select_columns(["prompt", "prompt_messages"])
    held_out = synthetic_task["prompts"]
    cfg = GRPOConfig(output_dir=str(tmp_path / "grpo"), advantage=advantage, max_updates=30, prompts_per_update=16,
                     num_generations=8, mini_batch_size=32, learning_rate=3e-4, max_new_tokens=12, max_length=48, eval_steps=30,
                     save_steps=30, progress=False)
    result = train_grpo(load_causal_lm(str(sft_result["dir"])), sft, None, tokenizer, train, held_out, cfg,
                        reward_fns={"gold": build_reward("gold")})
    before, after = gold_scores(sft, tokenizer, held_out), gold_scores(result.policy, tokenizer, held_out)
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(after, before)) / len(before)
    assert sum(after) / len(after) > sum(before) / len(before), (advantage, sum(before) / len(before), sum(after) / len(after))
    assert wins >= 0.75, (advantage, wins)
