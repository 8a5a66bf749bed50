"""PPO trainer: config checks, combined reward, dropout, rollout log-probs, smoke run, missing-EOS penalty, exact resume, learning."""

from __future__ import annotations

import math

import datasets
import pytest
import torch

from rlhf_core import metrics as M
from rlhf_core.generation import generate
from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, train_tokenizer
from rlhf_core.models.scalar_head import token_scores
from rlhf_core.reward_sources import CombinedReward
from rlhf_core.rollout import response_logprobs
from rlhf_core.synthetic import GoldReward, all_prompts
from rlhf_core.trainers.ppo import (
    PolicyAndValue,
    PPOConfig,
    disable_dropout,
    saved_checkpoints,
    train_ppo,
    value_model_from_policy,
)

TINY = TinyModelConfig(n_layer=1, hidden_size=32, n_head=2, max_positions=64)
TRAIN_NAMES = [M.OBJECTIVE_KL, M.OBJECTIVE_SCORES, M.OBJECTIVE_RLHF_REWARD, M.OBJECTIVE_ENTROPY, M.POLICY_APPROXKL,
               M.POLICY_CLIPFRAC, M.VAL_VPRED, M.VAL_CLIPFRAC, M.LOSS_POLICY, M.LOSS_VALUE, M.LEARNING_RATE, M.OBJECTIVE_GOLD,
               M.KL_COEF, M.GRAD_NORM, M.NO_EOS_FRACTION, M.RESPONSE_LENGTH]
EVAL_NAMES = [M.OBJECTIVE_SCORES, M.OBJECTIVE_KL, M.OBJECTIVE_GOLD]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and much faster when other processes share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    texts = all_prompts() + ["apple pear fig.", "red blue green.", "cat dog.", "car bus train van."] * 20
    return train_tokenizer(texts, vocab_size=300)


def prompt_records(prompts: list[str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": prompts, "prompt_messages": [[{"role": "user", "content": p}] for p in prompts]})


@pytest.fixture(scope="module")
def prompts() -> tuple[datasets.Dataset, datasets.Dataset]:
    everything = all_prompts()
    return prompt_records(everything[:40]), prompt_records(everything[100:106])


def models(tokenizer, seed: int = 0):
    """A fresh tiny policy and a random reward model (same every call)."""
    policy = build_tiny_causal_lm(tokenizer, TINY, seed=seed)
    reward_model = value_model_from_policy(build_tiny_causal_lm(tokenizer, TINY, seed=seed + 1), tokenizer.pad_token_id, seed=seed + 2)
    return policy, reward_model


def config(tmp_path, **overrides) -> PPOConfig:
    values = dict(output_dir=str(tmp_path / "ppo"), max_updates=2, rollout_batch_size=8, mini_batch_size=4, ppo_epochs=2,
                  forward_batch_size=8, learning_rate=1e-3, max_new_tokens=6, max_length=32, eval_steps=2, save_steps=2,
                  missing_eos_penalty=None, progress=False, eval_on_start=False)
    return PPOConfig(**(values | overrides))


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(len(r)) / 10 for r in responses]


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, match", [
    (dict(rollout_batch_size=10, mini_batch_size=4, gradient_accumulation_steps=2), r"rollout_batch_size \(10\).*4 × 2 = 8"),
    (dict(max_new_tokens=32, max_length=32), r"max_new_tokens \(32\) must be < max_length \(32\)"),
    (dict(lam=1.5), "lam=1.5"),
    (dict(kl_estimator="k9"), "k9"),
    (dict(kl_control="adaptive", kl_coef=0.0), "kl_coef"),
    (dict(ppo_epochs=0), "ppo_epochs must be > 0, got 0"),
    (dict(temperature=0.0), "temperature"),
    (dict(missing_eos_penalty=math.inf), "missing_eos_penalty"),
    (dict(save_total_limit=0), "save_total_limit"),
])
def test_config_rejects_bad_values(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)


def test_train_ppo_rejects_missing_reward_and_too_few_prompts(tmp_path, tokenizer, prompts):
    train, evaluation = prompts
    policy, reward_model = models(tokenizer)
    with pytest.raises(ValueError, match="reward_model, a reward_fn"):
        train_ppo(policy, None, None, tokenizer, train, evaluation, config(tmp_path))
    with pytest.raises(ValueError, match="fewer than rollout_batch_size=64"):
        train_ppo(policy, None, reward_model, tokenizer, train, evaluation, config(tmp_path, rollout_batch_size=64, mini_batch_size=8))


# --- reward functions ----------------------------------------------------------------------


def test_combined_reward_weighs_reward_model_and_functions():
    def first_word_is_apple(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(r.split()[:1] == ["apple"]) for r in responses]

    combined = CombinedReward({"apple": first_word_is_apple, "len": length_reward}, {"apple": 2.0}, rm_weight=0.5)
    total, parts = combined.parts(["p1", "p2"], ["apple pear", "fig"], rm_scores=[3.0, -1.0])
    assert parts == {"reward_model": [3.0, -1.0], "apple": [1.0, 0.0], "len": [1.0, pytest.approx(0.3)]}
    assert total == [pytest.approx(0.5 * 3.0 + 2.0 * 1.0 + 1.0), pytest.approx(0.5 * -1.0 + 0.0 + 0.3)]
    with pytest.raises(ValueError, match="reward-model scores"):
        combined(["p1"], ["apple"])
    with pytest.raises(ValueError, match="unknown reward functions"):
        CombinedReward({"a": length_reward}, {"b": 1.0})
    only_fns = CombinedReward({"len": length_reward})
    assert not only_fns.uses_reward_model and only_fns(["p"], ["abcde"]) == [pytest.approx(0.5)]


# --- models --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_disable_dropout_makes_train_mode_deterministic(tokenizer, arch):
    model = build_tiny_causal_lm(tokenizer, TinyModelConfig(arch=arch, n_layer=1, hidden_size=32, n_head=2, dropout=0.5), seed=0)
    ids = torch.tensor([tokenizer.encode("List 3 fruit words. apple pear fig.")])
    with torch.no_grad():
        reference = model.eval()(ids).logits
        assert not torch.allclose(model.train()(ids).logits, reference)  # dropout is active before
        disable_dropout(model)
        assert torch.equal(model.train()(ids).logits, reference)
    assert all(v == 0.0 for k, v in model.config.to_dict().items() if ("dropout" in k or "pdrop" in k) and isinstance(v, float))


def test_value_model_from_policy_copies_the_backbone(tokenizer):
    policy = build_tiny_causal_lm(tokenizer, TINY, seed=0)
    value = value_model_from_policy(policy, tokenizer.pad_token_id)
    backbone = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head")}
    for name, tensor in value.state_dict().items():
        if not name.startswith("score."):
            assert torch.equal(tensor, backbone[name]), name
    assert value.score.out_features == 1


def test_rollout_logprobs_and_values_match_unpadded_prefixes(tokenizer):
    """Detail 4 and 12: log softmax(z/τ) of each sampled token and V(prefix), left padding and slicing included."""
    policy, value = models(tokenizer)
    prompt_ids = [tokenizer.encode(p) for p in ("List 3 fruit words.", "Name 2 words about color.", "Give me 4 tool words.")]
    tau = 0.7
    out = generate(policy, tokenizer, prompt_ids, max_new_tokens=5, temperature=tau, seed=0)
    query_response = torch.cat([out.query_ids, out.response_ids], 1)  # (B, Q+R)
    attention_mask = torch.cat([out.query_mask, out.response_mask], 1)
    completion_mask = torch.cat([torch.zeros_like(out.query_mask), out.response_mask], 1)
    n_query = out.query_ids.shape[1]
    with torch.no_grad():
        logits, values = PolicyAndValue(policy, value)(query_response, attention_mask)
        logprobs = response_logprobs(logits, query_response, completion_mask, n_query, tau)  # (B, R)
        values = values[:, n_query - 1 : -1]
        for row, prompt in enumerate(prompt_ids):
            for t in range(int(out.response_mask[row].sum())):
                prefix = torch.tensor([prompt + out.response_ids[row, :t].tolist()])  # unpadded
                z = policy(prefix).logits[0, -1] / tau
                token = int(out.response_ids[row, t])
                assert logprobs[row, t] == pytest.approx(float(z.log_softmax(-1)[token]), abs=1e-4)
                v = token_scores(value, prefix, torch.ones_like(prefix))[0, -1]
                assert values[row, t] == pytest.approx(float(v), abs=1e-4)
        assert (logprobs[~out.response_mask.bool()] == 0).all()


# --- training ------------------------------------------------------------------------------


def test_smoke_logs_every_metric_and_checkpoints(tmp_path, tokenizer, prompts):
    train, evaluation = prompts
    policy, reward_model = models(tokenizer)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    logs: list[tuple[int, dict[str, float]]] = []
    sample_calls: list[tuple[int, list[dict]]] = []
    cfg = config(tmp_path, max_updates=3, missing_eos_penalty=1.0, kl_control="adaptive", kl_target=0.01, kl_horizon=100,
                 eval_on_start=True, n_eval_samples=100)
    result = train_ppo(policy, None, reward_model, tokenizer, train, evaluation, cfg,
                       reward_fn=length_reward, monitor_fn=GoldReward(), log_fn=lambda m, s: logs.append((s, m)),
                       samples_fn=lambda rows, s: sample_calls.append((s, rows)))
    train_logs = [(s, m) for s, m in logs if M.key(M.TRAIN, M.OBJECTIVE_KL) in m]
    assert [s for s, _ in train_logs] == [1, 2, 3]
    for _, m in train_logs:
        for name in TRAIN_NAMES:
            assert math.isfinite(m[M.key(M.TRAIN, name)]), (name, m)
    eval_logs = [(s, m) for s, m in logs if M.key(M.EVAL, M.OBJECTIVE_SCORES) in m]
    assert [s for s, _ in eval_logs] == [0, 2, 3]  # the initial policy (eval_on_start), every eval_steps, the end
    for name in EVAL_NAMES:
        assert math.isfinite(result.metrics[M.key(M.EVAL, name)])
    assert result.metrics == eval_logs[-1][1]
    # The over-optimisation curve: a point at each evaluation, on every held-out prompt: the reward model's own score
    # (not normalised, not the combined reward: raw score minus the length reward), the gold reward and the k1 KL.
    for step, m in eval_logs:
        rows = [r for r in result.samples if r["step"] == step]
        assert len(rows) == len(evaluation)
        for row in rows:
            assert row["proxy_score"] == pytest.approx(row["raw_score"] - len(row["response"]) / 10, abs=1e-5)
        assert m[M.key(M.EVAL, M.OVEROPT_PROXY)] == pytest.approx(sum(r["proxy_score"] for r in rows) / len(rows))
        assert m[M.key(M.EVAL, M.OVEROPT_GOLD)] == pytest.approx(sum(r["gold_reward"] for r in rows) / len(rows))
        assert m[M.key(M.EVAL, M.OVEROPT_KL)] == pytest.approx(sum(r["kl"] for r in rows) / len(rows))
        assert m[M.key(M.EVAL, M.OVEROPT_SQRT_KL)] == pytest.approx(math.sqrt(max(m[M.key(M.EVAL, M.OVEROPT_KL)], 0.0)))
    assert eval_logs[0][1][M.key(M.EVAL, M.OVEROPT_KL)] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
    assert eval_logs[-1][1][M.key(M.EVAL, M.OVEROPT_KL)] != eval_logs[0][1][M.key(M.EVAL, M.OVEROPT_KL)]
    # Samples: a few decoded rows per evaluation, passed on and returned.
    assert [s for s, _ in sample_calls] == [0, 2, 3]
    assert result.samples == [row for _, rows in sample_calls for row in rows]
    assert {"prompt", "response", "score", "kl", "gold_reward"} <= set(result.samples[0])
    assert all(row["prompt"] in list(evaluation["prompt"]) for row in result.samples)
    # The adaptive β moved (the KL target is tiny), the policy learned, the checkpoints are complete.
    betas = [m[M.key(M.TRAIN, M.KL_COEF)] for _, m in train_logs]
    assert betas[0] == cfg.kl_coef and betas[-1] != betas[0]
    assert any(not torch.equal(start[k], v) for k, v in result.policy.state_dict().items())
    assert [p.name for p in saved_checkpoints(cfg.output_dir)] == ["checkpoint_2", "checkpoint_3"]
    state = ppo_state(tmp_path / "ppo" / "checkpoints" / "checkpoint_3")
    assert state["update"] == 3 and state["reward_norm"] == result.reward_norm
    assert result.reward_norm["std"] > 0


@pytest.mark.parametrize("mode", ["subtract", "replace"])
def test_missing_eos_penalty_applied(tmp_path, tokenizer, prompts, mode):
    train, evaluation = prompts
    policy = build_tiny_causal_lm(tokenizer, TINY, seed=0)
    eos = tokenizer.eos_token_id
    # Raise the EOS logit so that some responses (not all) end within max_new_tokens.
    policy.lm_head.register_forward_hook(lambda _m, _i, out: out.index_add(
        -1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 4.0)))
    cfg = config(tmp_path, max_updates=1, normalize_reward=False, missing_eos_penalty=2.0, missing_eos_mode=mode,
                 n_eval_samples=100, max_new_tokens=4)
    result = train_ppo(policy, None, None, tokenizer, train, evaluation, cfg, reward_fn=lambda p, r: [0.5] * len(p))
    rows = result.samples
    assert any(r["has_eos"] for r in rows) and not all(r["has_eos"] for r in rows)
    penalised = 0.5 - 2.0 if mode == "subtract" else -2.0
    for row in rows:
        assert row["score"] == pytest.approx(0.5 if row["has_eos"] else penalised), row
    no_eos = sum(not r["has_eos"] for r in rows) / len(rows)
    assert result.metrics[M.key(M.EVAL, M.NO_EOS_FRACTION)] == pytest.approx(no_eos)


def ppo_state(checkpoint) -> dict:
    """The state PPO registers with Accelerate (the first custom object of the checkpoint)."""
    return torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_gives_identical_weights_optimizer_and_state(tmp_path, tokenizer, prompts):
    train, evaluation = prompts
    common = dict(max_updates=4, save_steps=2, eval_steps=2, gradient_accumulation_steps=2, mini_batch_size=2,
                  kl_control="adaptive", kl_target=0.01, kl_horizon=100, missing_eos_penalty=1.0, eval_on_start=True)

    def run(out: str, log_fn):
        policy, reward_model = models(tokenizer)
        cfg = config(tmp_path, output_dir=str(tmp_path / out), **common)
        return train_ppo(policy, None, reward_model, tokenizer, train, evaluation, cfg, reward_fn=length_reward, log_fn=log_fn)

    straight_logs: dict[int, dict] = {}
    straight = run("straight", lambda m, s: straight_logs.setdefault(s, {}).update(m))

    class Crash(RuntimeError):
        pass

    crashed_logs: dict[int, dict] = {}

    def crash_at_3(metrics, step):
        if step == 3:
            raise Crash  # after checkpoint_2, before checkpoint_4
        crashed_logs.setdefault(step, {}).update(metrics)
    with pytest.raises(Crash):
        run("resumed", crash_at_3)
    assert [p.name for p in saved_checkpoints(tmp_path / "resumed")] == ["checkpoint_2"]
    partial = tmp_path / "resumed" / "checkpoints" / "checkpoint_4"  # a save that a crash cut short
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"cut short")
    resumed_logs: dict[int, dict] = {}
    resumed = run("resumed", lambda m, s: resumed_logs.setdefault(s, {}).update(m))

    # The curve before the checkpoint is replayed from it (the logs of the crashed process, timings included),
    # the rest is trained: every update is there, as in the uninterrupted run, and the over-optimisation curve has
    # its points at 0 (the initial policy), 2 and 4.
    assert sorted(resumed_logs) == [0, 1, 2, 3, 4]
    assert all(resumed_logs[s] == crashed_logs[s] for s in (0, 1, 2))
    assert [s for s in sorted(resumed_logs) if M.key(M.EVAL, M.OVEROPT_KL) in resumed_logs[s]] == [0, 2, 4]
    assert [p.name for p in saved_checkpoints(tmp_path / "resumed")] == ["checkpoint_2", "checkpoint_4"]
    for name, tensor in _weights(straight.policy).items():
        assert torch.equal(tensor, _weights(resumed.policy)[name]), name
    for name, tensor in _weights(straight.value_model).items():
        assert torch.equal(tensor, _weights(resumed.value_model)[name]), name
    def deterministic(logs: dict) -> dict:  # wall-clock timings (timing/*) differ between any two runs
        return {k: v for k, v in logs.items() if not k.startswith("timing/")}

    for step in (0, 1, 2, 3, 4):
        assert deterministic(resumed_logs[step]) == deterministic(straight_logs[step]), step
    assert "timing/generation" in resumed_logs[4]
    # Optimizer moments and our own state (adaptive β, reward normalisation, counter) match too.
    last_a, last_b = (tmp_path / run_dir / "checkpoints" / "checkpoint_4" for run_dir in ("straight", "resumed"))
    opt_a = torch.load(last_a / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(last_b / "optimizer.bin", weights_only=True)["state"]
    assert opt_a.keys() == opt_b.keys()
    for key in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a[key][name], opt_b[key][name])
    state_a, state_b = ppo_state(last_a), ppo_state(last_b)
    for state in (state_a, state_b):  # the kept curves hold wall-clock timings, which differ between any two runs
        state["history"] = [(step, deterministic(metrics)) for step, metrics in state["history"]]
    assert state_a == state_b and state_a["update"] == 4 and state_a["kl_controller"]["value"] != PPOConfig.kl_coef
    assert [step for step, _ in state_a["history"]] == [0, 1, 2, 2, 3, 4, 4]  # train logs and the evaluations at 0, 2, 4
    assert len(state_b["samples"]) == len(straight.samples) > 0


# --- learning ------------------------------------------------------------------------------


def mean_gold(model, tokenizer, records: datasets.Dataset, seeds=(0, 1)) -> float:
    from rlhf_core.data.tokenize import TruncationConfig, tokenize_prompts

    tokenized, _ = tokenize_prompts(records.add_column("text", list(records["prompt"])), tokenizer, TruncationConfig(max_length=48))
    ids = [list(x) for x in tokenized["prompt_input_ids"]]
    scores: list[float] = []
    for seed in seeds:
        out = generate(model.eval(), tokenizer, ids, max_new_tokens=12, batch_size=128, seed=seed)
        scores += GoldReward()(list(tokenized["text"]), out.texts)
    return sum(scores) / len(scores)


@pytest.mark.slow
def test_ppo_raises_gold_reward_above_sft(tmp_path, sft_result, synthetic_task, synthetic_tokenizer):
    from rlhf_core.models import load_causal_lm

    tokenizer = synthetic_tokenizer
    sft = load_causal_lm(str(sft_result["dir"]))
    train = synthetic_task["pref_train"].select_columns(["prompt", "prompt_messages"])
    held_out = synthetic_task["prompts"]
    cfg = PPOConfig(output_dir=str(tmp_path / "ppo"), seed=0, max_updates=20, rollout_batch_size=64, mini_batch_size=16,
                    ppo_epochs=4, learning_rate=1e-4, lr_scheduler_type="constant", max_new_tokens=12, max_length=48,
                    temperature=1.0, kl_coef=0.05, missing_eos_penalty=1.0, eval_steps=20, save_steps=20,
                    forward_batch_size=64, progress=False)
    result = train_ppo(load_causal_lm(str(sft_result["dir"])), sft, None, tokenizer, train, held_out, cfg,
                       reward_fn=GoldReward(), monitor_fn=GoldReward())
    sft_gold = mean_gold(sft, tokenizer, held_out)
    ppo_gold = mean_gold(result.policy, tokenizer, held_out)
    assert ppo_gold > sft_gold + 0.1, (sft_gold, ppo_gold)  # SFT ≈ 1.32; PPO +0.17..0.21 over seeds 0-2
    kl = result.metrics[M.key(M.EVAL, M.OBJECTIVE_KL)]
    assert math.isfinite(kl) and kl > 0, result.metrics


def mean_rm_score(policy, reference, reward_model, tokenizer, records: datasets.Dataset, seeds=(0, 1)) -> float:
    """The reward model's mean raw score of ``policy``'s sampled responses to ``records`` (``evaluation.evaluate_policy``)."""
    from rlhf_core.data.tokenize import TruncationConfig, tokenize_prompts
    from rlhf_core.evaluation import evaluate_policy

    tokenized, _ = tokenize_prompts(records, tokenizer, TruncationConfig(max_length=48))
    ids = [list(x) for x in tokenized["prompt_input_ids"]]
    scores = [evaluate_policy(policy.eval(), reference, reward_model, tokenizer, list(records["prompt"]), ids, max_new_tokens=12,
                              temperature=1.0, batch_size=128, seed=seed).metrics["rm_score"] for seed in seeds]
    return sum(scores) / len(scores)


@pytest.mark.slow
def test_ppo_raises_the_reward_model_score_above_sft(tmp_path, sft_result, reward_model_result, synthetic_task, synthetic_tokenizer):
    """The path ``params.yaml`` runs: the trained reward model alone is optimised, the value model starts from it."""
    from rlhf_core.models import load_causal_lm, load_reward_model

    tokenizer, sft_dir, rm_dir = synthetic_tokenizer, str(sft_result["dir"]), str(reward_model_result["dir"])
    sft, reward_model = load_causal_lm(sft_dir), load_reward_model(rm_dir)
    train = synthetic_task["pref_train"].select_columns(["prompt", "prompt_messages"])
    held_out = synthetic_task["prompts"]
    # params.yaml's ppo group, with 6 updates instead of 20.
    cfg = PPOConfig(output_dir=str(tmp_path / "ppo"), seed=0, max_updates=6, rollout_batch_size=64, mini_batch_size=16,
                    ppo_epochs=4, learning_rate=1e-4, lr_scheduler_type="constant", max_new_tokens=12, max_length=48,
                    temperature=1.0, kl_control="fixed", kl_coef=0.05, missing_eos_penalty=1.0, eval_steps=10, save_steps=10,
                    progress=False)
    logs: dict[int, dict[str, float]] = {}
    result = train_ppo(load_causal_lm(sft_dir), sft, reward_model, tokenizer, train, held_out, cfg,
                       value_model=load_reward_model(rm_dir), monitor_fn=GoldReward(),
                       log_fn=lambda m, s: logs.setdefault(s, {}).update(m))
    sft_score = mean_rm_score(sft, sft, reward_model, tokenizer, held_out)
    ppo_score = mean_rm_score(result.policy, sft, reward_model, tokenizer, held_out)
    # SFT ≈ −0.44, PPO ≈ +0.31 after these 6 updates (+0.6 after 10; the reward model's scores have std ≈ 1.5).
    assert ppo_score > sft_score + 0.3, (sft_score, ppo_score)
    score_key = M.key(M.TRAIN, M.OBJECTIVE_SCORES)  # step 0 holds only the initial policy's evaluation (eval_on_start)
    train_scores = [logs[s][score_key] for s in sorted(logs) if score_key in logs[s]]
    assert len(train_scores) == cfg.max_updates, sorted(logs)
    assert train_scores[-1] > train_scores[0], train_scores  # the normalised score of the rollouts rose too
    kl = result.metrics[M.key(M.EVAL, M.OBJECTIVE_KL)]
    assert math.isfinite(kl) and kl > 0, result.metrics
