"""Over-optimisation curves (Gao et al. 2022): the R(d) = d(α − β·log d) fit, peaks, the stage summary, and the
best-evaluation output of the online trainers (``best_metric``)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_core import metrics as M
from rlhf_core.overoptimization import (
    CurvePoint,
    curve_metrics,
    fit_rl_curve,
    fitted_peak,
    peak,
    rl_curve,
    sqrt_kl,
    summarize,
)

# --- the functional form and its fit --------------------------------------------------------


def naive_fit(d: list[float], r: list[float]) -> tuple[float, float]:
    """The 2×2 normal equations solved by hand: x₁ = d, x₂ = −d·log d (0 at d = 0)."""
    x1 = d
    x2 = [-v * math.log(v) if v > 0 else 0.0 for v in d]
    s11 = sum(a * a for a in x1)
    s12 = sum(a * b for a, b in zip(x1, x2))
    s22 = sum(b * b for b in x2)
    t1 = sum(a * y for a, y in zip(x1, r))
    t2 = sum(b * y for b, y in zip(x2, r))
    det = s11 * s22 - s12 * s12
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def test_rl_curve_hand_values():
    d = torch.tensor([0.0, 1.0, math.e, 2.0])
    r = rl_curve(d, alpha=1.5, beta=0.5)
    assert r[0] == 0.0  # R(0) = 0: the limit of d·log d, not nan
    assert r[1] == pytest.approx(1.5)  # log 1 = 0
    assert r[2] == pytest.approx(math.e * (1.5 - 0.5))  # log e = 1
    assert r[3] == pytest.approx(2.0 * (1.5 - 0.5 * math.log(2.0)))


def test_fit_recovers_known_alpha_beta_exactly():
    d = torch.linspace(0.0, 4.0, 9)
    fit = fit_rl_curve(d, rl_curve(d, alpha=1.2, beta=0.7))
    assert fit.alpha == pytest.approx(1.2, abs=1e-9) and fit.beta == pytest.approx(0.7, abs=1e-9)
    assert fit.rmse == pytest.approx(0.0, abs=1e-9) and fit.n_points == 9


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.4), (0.3, -0.1), (2.0, 1.5)])
def test_fit_recovers_alpha_beta_under_small_noise(alpha, beta):
    gen = torch.Generator().manual_seed(0)
    d = torch.linspace(0.1, 5.0, 60, dtype=torch.float64)
    noisy = rl_curve(d, alpha, beta) + 0.01 * torch.randn(60, generator=gen, dtype=torch.float64)
    fit = fit_rl_curve(d, noisy)
    assert fit.alpha == pytest.approx(alpha, abs=0.02) and fit.beta == pytest.approx(beta, abs=0.02)
    assert 0.005 < fit.rmse < 0.015  # about the noise's standard deviation


def test_fit_matches_the_hand_solved_normal_equations():
    d, r = [0.5, 1.0, 2.0, 3.0], [0.3, 0.9, 1.1, 0.8]
    fit = fit_rl_curve(torch.tensor(d, dtype=torch.float64), torch.tensor(r, dtype=torch.float64))
    alpha, beta = naive_fit(d, r)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9) and fit.beta == pytest.approx(beta, rel=1e-9)
    # Hand case: points (1, 1) and (e, 0): at d = 1, R = α = 1; at d = e, e(α − β) = 0, so β = 1.
    exact = fit_rl_curve(torch.tensor([1.0, math.e]), torch.tensor([1.0, 0.0]))
    assert (exact.alpha, exact.beta) == (pytest.approx(1.0), pytest.approx(1.0))


def test_points_at_d_zero_do_not_move_the_fit():
    d, r = torch.tensor([0.5, 1.0, 2.0]), torch.tensor([0.4, 0.8, 0.9])
    with_origin = fit_rl_curve(torch.cat([torch.zeros(2), d]), torch.cat([torch.zeros(2), r]))
    without = fit_rl_curve(d, r)
    assert (with_origin.alpha, with_origin.beta) == (pytest.approx(without.alpha), pytest.approx(without.beta))
    assert with_origin.n_points == 5


@pytest.mark.parametrize("d, r, match", [
    ([1.0], [0.5], "at least 2 distinct points with d > 0"),
    ([0.0, 0.0, 2.0], [0.0, 0.0, 1.0], r"at least 2 distinct points with d > 0 .*, got 1"),
    ([1.5, 1.5, 1.5], [0.1, 0.2, 0.3], "got 1"),  # one distinct d: α and β cannot be told apart
    ([], [], "got 0"),
    ([1.0, -0.5], [0.1, 0.2], "must be >= 0"),
    ([1.0, 2.0], [0.1, float("nan")], "finite"),
    ([1.0, 2.0], [0.1], "two \\(N,\\) tensors"),
])
def test_fit_rejects_degenerate_inputs_clearly(d, r, match):
    with pytest.raises(ValueError, match=match):
        fit_rl_curve(torch.tensor(d, dtype=torch.float64), torch.tensor(r, dtype=torch.float64))


def test_fitted_peak_is_where_the_derivative_vanishes():
    from rlhf_core.overoptimization import RLCurveFit

    fit = RLCurveFit(alpha=1.0, beta=0.5, rmse=0.0, n_points=3)
    d_star, r_star = fitted_peak(fit)
    assert d_star == pytest.approx(math.exp(1.0))  # exp(α/β − 1) = e
    assert r_star == pytest.approx(float(rl_curve(torch.tensor([d_star]), 1.0, 0.5)[0]))
    grid = torch.linspace(0.01, 10, 2000, dtype=torch.float64)
    assert float(grid[rl_curve(grid, 1.0, 0.5).argmax()]) == pytest.approx(d_star, abs=0.01)
    assert fitted_peak(RLCurveFit(alpha=1.0, beta=0.0, rmse=0.0, n_points=3)) is None  # still rising
    assert fitted_peak(RLCurveFit(alpha=1.0, beta=-0.2, rmse=0.0, n_points=3)) is None


def test_peak_picks_the_highest_and_the_earliest_on_ties():
    assert peak([0, 10, 20, 30], [0.1, 0.5, 0.3, 0.5]) == (10, 0.5)
    assert peak([5], [-1.0]) == (5, -1.0)
    with pytest.raises(ValueError, match="non-empty"):
        peak([], [])
    with pytest.raises(ValueError, match="equal"):
        peak([0, 1], [0.2])


def test_sqrt_kl_counts_a_slightly_negative_estimate_as_zero():
    assert sqrt_kl(torch.tensor([-1e-4, 0.0, 4.0])).tolist() == [0.0, 0.0, 2.0]


def test_curve_metrics_of_one_checkpoint_by_hand():
    got = curve_metrics([1.0, 2.0, 3.0], [0.5, 1.5, 2.0], [0.0, 1.0, 0.5])
    assert got == {"eval/overopt/proxy_reward": 2.0, "eval/overopt/kl": pytest.approx(4.0 / 3),
                   "eval/overopt/sqrt_kl": pytest.approx(math.sqrt(4.0 / 3)), "eval/overopt/gold_reward": 0.5}
    assert curve_metrics([1.0], [-0.2])["eval/overopt/sqrt_kl"] == 0.0 and "eval/overopt/gold_reward" not in curve_metrics([1.0], [0.1])
    with pytest.raises(ValueError, match="equal, non-empty"):
        curve_metrics([1.0, 2.0], [0.1])


# --- the stage's summary ------------------------------------------------------------------------


def test_summary_reports_peak_gold_last_point_and_fits_relative_to_the_initial_policy():
    alpha_p, beta_p, alpha_g, beta_g = 1.0, 0.1, 1.0, 0.9
    kls = [0.0, 0.25, 1.0, 2.25, 4.0, 6.25, 9.0]  # d = 0, 0.5, ..., 3
    points = []
    for step, kl in zip(range(0, 70, 10), kls):
        d = torch.tensor([math.sqrt(kl)])
        points.append(CurvePoint(step=step, kl=kl, proxy=-0.5 + float(rl_curve(d, alpha_p, beta_p)[0]),
                                 gold=1.3 + float(rl_curve(d, alpha_g, beta_g)[0])))
    out, fits = summarize(list(reversed(points)))  # order does not matter
    assert out[M.OVEROPT_N_POINTS] == 7
    assert fits["proxy"].alpha == pytest.approx(alpha_p) and fits["proxy"].beta == pytest.approx(beta_p)
    assert out["overopt/gold_fit/alpha"] == pytest.approx(alpha_g) and out["overopt/gold_fit/beta"] == pytest.approx(beta_g)
    assert out["overopt/gold_fit/peak_sqrt_kl"] == pytest.approx(math.exp(alpha_g / beta_g - 1))  # ≈ 1.12
    # Gold peaks at d = 1 (step 20) among the points, then falls while the proxy keeps rising.
    gold = {p.step: p.gold for p in points}
    assert out[M.OVEROPT_PEAK_GOLD_STEP] == 20 and out[M.OVEROPT_PEAK_GOLD] == pytest.approx(gold[20])
    assert out[M.OVEROPT_PEAK_GOLD_SQRT_KL] == pytest.approx(1.0)
    assert out[M.OVEROPT_LAST_STEP] == 60 and out[M.OVEROPT_LAST_GOLD] < out[M.OVEROPT_PEAK_GOLD]
    assert out[M.OVEROPT_LAST_PROXY] > out[M.OVEROPT_PEAK_GOLD_PROXY]


def test_summary_without_an_initial_point_or_gold_gives_no_fit_but_the_rest():
    no_origin, fits = summarize([CurvePoint(10, proxy=0.2, kl=1.0, gold=1.0), CurvePoint(20, proxy=0.4, kl=2.0, gold=0.9),
                                 CurvePoint(30, proxy=0.5, kl=3.0, gold=0.8)])
    assert fits == {} and not any("_fit/" in k for k in no_origin)
    assert no_origin[M.OVEROPT_PEAK_GOLD_STEP] == 10 and no_origin[M.OVEROPT_N_POINTS] == 3
    no_gold, fits = summarize([CurvePoint(0, proxy=0.0, kl=0.0), CurvePoint(5, proxy=0.3, kl=1.0),
                               CurvePoint(10, proxy=0.4, kl=4.0)])
    assert set(fits) == {"proxy"} and M.OVEROPT_PEAK_GOLD_STEP not in no_gold
    too_few, fits = summarize([CurvePoint(0, proxy=0.0, kl=0.0, gold=1.0), CurvePoint(5, proxy=0.3, kl=1.0, gold=1.1)])
    assert fits == {} and too_few[M.OVEROPT_PEAK_GOLD_STEP] == 5  # one d > 0: nothing to fit, still a peak
    assert summarize([]) == ({M.OVEROPT_N_POINTS: 0.0}, {})


# --- best evaluation as the output of the online trainers (best_metric) ------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup():
    import datasets

    from rlhf_core.models import TinyModelConfig, train_tokenizer
    from rlhf_core.synthetic import all_prompts

    torch.set_num_threads(1)
    tokenizer = train_tokenizer(all_prompts() + ["apple pear fig.", "red blue green.", "cat dog."] * 20, vocab_size=300)

    def records(prompts: list[str]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"prompt": prompts, "prompt_messages": [[{"role": "user", "content": p}] for p in prompts]})

    everything = all_prompts()
    return tokenizer, records(everything[:40]), records(everything[100:104]), TinyModelConfig(n_layer=1, hidden_size=32, n_head=2)


def scripted_evaluations(values: dict[int, float], weights_seen: dict[int, dict[str, torch.Tensor]]):
    """An ``evaluate`` whose metric is ``values[update]``; it keeps a copy of the weights evaluated at each update."""

    def evaluate(self) -> dict[str, float]:
        model = self.accelerator.unwrap_model(self.model)
        weights_seen[self.update] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        metrics = {M.key(M.EVAL, M.OBJECTIVE_SCORES): values[self.update], M.key(M.EVAL, M.OBJECTIVE_KL): 0.1 * self.update}
        self.eval_metrics = metrics
        self.log(metrics, self.update)
        return metrics

    return evaluate


def run_online(kind: str, tiny_setup, out, log_fn=None, **overrides):
    """A tiny PPO or GRPO run (length reward) with eval and checkpoint every update; returns (result, output weights)."""
    from rlhf_core.models import build_tiny_causal_lm
    from rlhf_core.reward_registry import build_reward

    tokenizer, train, evaluation, tiny = tiny_setup
    length = build_reward("length", {"target": 3})
    common = dict(output_dir=str(out), max_updates=4, max_new_tokens=6, max_length=32, eval_steps=1, save_steps=1,
                  learning_rate=1e-2, progress=False, eval_on_start=True, best_metric="objective/scores")
    policy = build_tiny_causal_lm(tokenizer, tiny, seed=0)
    if kind == "ppo":
        from rlhf_core.trainers.ppo import PPOConfig, train_ppo

        cfg = PPOConfig(**(common | dict(rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, forward_batch_size=8,
                                         normalize_reward=False, missing_eos_penalty=None) | overrides))
        result = train_ppo(policy, None, None, tokenizer, train, evaluation, cfg, reward_fn=length, log_fn=log_fn)
        weights = {**{f"policy.{k}": v for k, v in result.policy.state_dict().items()},
                   **{f"value.{k}": v for k, v in result.value_model.state_dict().items()}}
        return result, weights
    from rlhf_core.trainers.grpo import GRPOConfig, train_grpo

    cfg = GRPOConfig(**(common | dict(prompts_per_update=4, num_generations=2, mini_batch_size=8, forward_batch_size=8)
                        | overrides))
    result = train_grpo(policy, None, None, tokenizer, train, evaluation, cfg, reward_fns={"length": length}, log_fn=log_fn)
    return result, result.policy.state_dict()


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
@pytest.mark.parametrize("greater, expected", [(True, 2), (False, 0)])
def test_online_trainer_outputs_the_best_evaluation_by_the_chosen_metric(kind, greater, expected, tiny_setup, tmp_path,
                                                                         monkeypatch):
    from rlhf_core.trainers.grpo import GRPOTrainer
    from rlhf_core.trainers.online import best_weights_files
    from rlhf_core.trainers.ppo import PPOTrainer

    values = {0: 0.1, 1: 0.3, 2: 0.8, 3: 0.5, 4: 0.2}  # highest at 2, lowest at 0 (the initial policy): not the last
    seen: dict[int, dict] = {}
    monkeypatch.setattr(PPOTrainer if kind == "ppo" else GRPOTrainer, "evaluate", scripted_evaluations(values, seen))
    result, weights = run_online(kind, tiny_setup, tmp_path / kind, greater_is_better=greater, save_total_limit=1)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert_same_weights(weights, seen[expected])
    assert any(not torch.equal(weights[k], seen[4][k]) for k in weights)  # the last policy differs: a real choice
    assert result.metrics[M.BEST_STEP] == expected and result.metrics[M.BEST_VALUE] == values[expected]
    assert result.metrics[M.key(M.EVAL, M.OBJECTIVE_SCORES)] == values[expected]  # that evaluation is reported
    assert result.metrics[M.key(M.EVAL, M.OBJECTIVE_KL)] == pytest.approx(0.1 * expected)
    assert list(best_weights_files(tmp_path / kind)) == [expected]  # rotation kept one checkpoint; the best is kept aside


def test_best_weights_survive_a_crash_and_resume(tiny_setup, tmp_path, monkeypatch):
    """The best (update 2) was found and saved before checkpoint_3; the run dies at update 4 and resumes from
    checkpoint_3 (the only one kept): the output is still update 2's weights, those of the uninterrupted run."""
    from rlhf_core.trainers.grpo import GRPOTrainer
    from rlhf_core.trainers.online import best_weights_files, saved_checkpoints

    values = {0: 0.1, 1: 0.3, 2: 0.8, 3: 0.5, 4: 0.9, 5: 0.2, 6: 0.1}  # 4 is best, but only after the crash point
    straight_seen: dict[int, dict] = {}
    monkeypatch.setattr(GRPOTrainer, "evaluate", scripted_evaluations(values, straight_seen))
    straight, straight_weights = run_online("grpo", tiny_setup, tmp_path / "straight", max_updates=6, save_steps=3,
                                            save_total_limit=1)
    assert straight.metrics[M.BEST_STEP] == 4

    class Crash(RuntimeError):
        pass

    def crash_at_5(metrics, step):
        if step == 5:
            raise Crash  # after the evaluation at 4 wrote its weights, before checkpoint_6
    crashed_seen: dict[int, dict] = {}
    monkeypatch.setattr(GRPOTrainer, "evaluate", scripted_evaluations(values, crashed_seen))
    with pytest.raises(Crash):
        run_online("grpo", tiny_setup, tmp_path / "resumed", log_fn=crash_at_5, max_updates=6, save_steps=3, save_total_limit=1)
    assert [p.name for p in saved_checkpoints(tmp_path / "resumed")] == ["checkpoint_3"]
    assert sorted(best_weights_files(tmp_path / "resumed")) == [2, 4]  # 2: checkpoint_3's best; 4: found after it
    resumed_seen: dict[int, dict] = {}
    monkeypatch.setattr(GRPOTrainer, "evaluate", scripted_evaluations(values, resumed_seen))
    resumed, resumed_weights = run_online("grpo", tiny_setup, tmp_path / "resumed", max_updates=6, save_steps=3,
                                          save_total_limit=1)
    assert sorted(resumed_seen) == [4, 5, 6]  # resumed at 3: update 4 is trained and evaluated again
    assert resumed.metrics[M.BEST_STEP] == 4 and resumed.metrics[M.BEST_VALUE] == 0.9
    assert_same_weights(resumed_weights, straight_weights)
    assert_same_weights(resumed_weights, straight_seen[4])


def test_best_from_before_the_checkpoint_is_the_output_after_a_resume(tiny_setup, tmp_path, monkeypatch):
    """The best evaluation (update 1) precedes the checkpoint the run resumes from: its saved weights are the output."""
    from rlhf_core.trainers.grpo import GRPOTrainer
    from rlhf_core.trainers.online import best_weights_files

    values = {0: 0.1, 1: 0.9, 2: 0.3, 3: 0.2, 4: 0.5}
    first: dict[int, dict] = {}
    monkeypatch.setattr(GRPOTrainer, "evaluate", scripted_evaluations(values, first))

    class Crash(RuntimeError):
        pass

    def crash_at_3(metrics, step):
        if step == 3:
            raise Crash
    with pytest.raises(Crash):
        run_online("grpo", tiny_setup, tmp_path / "run", log_fn=crash_at_3, save_steps=2, save_total_limit=1)
    assert list(best_weights_files(tmp_path / "run")) == [1]
    again: dict[int, dict] = {}
    monkeypatch.setattr(GRPOTrainer, "evaluate", scripted_evaluations(values, again))
    result, weights = run_online("grpo", tiny_setup, tmp_path / "run", save_steps=2, save_total_limit=1)
    assert sorted(again) == [3, 4] and result.metrics[M.BEST_STEP] == 1
    assert_same_weights(weights, first[1])


def test_an_unknown_best_metric_stops_at_the_first_evaluation(tiny_setup, tmp_path):
    from rlhf_core.errors import UserFacingError

    with pytest.raises(UserFacingError, match=r"grpo.best_metric 'objective/gold' is not one of grpo's evaluation "
                                              r"metrics \[.*'objective/scores'"):
        run_online("grpo", tiny_setup, tmp_path / "grpo", best_metric="objective/gold")
    from rlhf_core.trainers.online import saved_checkpoints

    assert saved_checkpoints(tmp_path / "grpo") == []  # stopped at the initial policy's evaluation, before any update


def test_best_metric_direction_defaults_to_lower_for_a_loss():
    from rlhf_core.trainers.grpo import GRPOConfig

    assert GRPOConfig(best_metric="objective/scores").best_is_greater()
    assert not GRPOConfig(best_metric="loss").best_is_greater()
    assert not GRPOConfig(best_metric="objective/scores", greater_is_better=False).best_is_greater()


# --- DPO (a Trainer-based stage): the curve probe at each evaluation ------------------------------------------------


def _dpo_run(tiny_setup, out, *, reward_model=None, log_fn=None, **overrides):
    import random

    import datasets

    from rlhf_core.models import build_tiny_causal_lm
    from rlhf_core.synthetic import GoldReward
    from rlhf_core.trainers.dpo import DPOConfig, train_dpo

    tokenizer, _, _, tiny = tiny_setup
    rng = random.Random(0)
    words = ["apple", "pear", "fig", "red", "blue", "cat", "dog"]
    prompts = ["List 3 fruit words.", "Name 2 words about color.", "Give me 2 animal words.", "List 3 fruit words."]
    rows = [{"prompt": p, "prompt_messages": [{"role": "user", "content": p}],
             "chosen": " ".join(rng.sample(words[:3], 2)) + ".", "rejected": " ".join(rng.sample(words[3:], 2))}
            for p in prompts * 8]
    pref = datasets.Dataset.from_list(rows)
    cfg = DPOConfig(**(dict(output_dir=str(out), max_steps=4, eval_steps=2, save_steps=2, logging_steps=2,
                            per_device_train_batch_size=8, per_device_eval_batch_size=8, max_length=32, progress=False,
                            learning_rate=1e-2, overopt_max_new_tokens=6, save_total_limit=None) | overrides))
    return train_dpo(build_tiny_causal_lm(tokenizer, tiny, seed=0), tokenizer, pref, pref.select(range(12)), cfg,
                     log_fn=log_fn, reward_model=reward_model, monitor_fn=GoldReward())


def test_dpo_logs_the_curve_point_at_every_evaluation_without_touching_training(tiny_setup, tmp_path):
    from rlhf_core.models import build_tiny_causal_lm
    from rlhf_core.trainers.ppo import value_model_from_policy

    tokenizer, _, _, tiny = tiny_setup
    reward_model = value_model_from_policy(build_tiny_causal_lm(tokenizer, tiny, seed=1), tokenizer.pad_token_id, seed=2)
    logs: dict[int, dict] = {}
    with_curve = _dpo_run(tiny_setup, tmp_path / "curve", reward_model=reward_model,
                          log_fn=lambda m, s: logs.setdefault(s, {}).update(m))
    curve = {s: m for s, m in logs.items() if M.key(M.EVAL, M.OVEROPT_KL) in m}
    assert sorted(curve) == [0, 2, 4]  # the starting policy (eval_on_start) and every evaluation
    for m in curve.values():
        for name in (M.OVEROPT_PROXY, M.OVEROPT_GOLD, M.OVEROPT_KL, M.OVEROPT_SQRT_KL):
            assert math.isfinite(m[M.key(M.EVAL, name)]), name
        assert M.key(M.EVAL, M.LOSS) in m  # beside DPO's own held-out metrics
    assert curve[0][M.key(M.EVAL, M.OVEROPT_KL)] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    assert curve[4][M.key(M.EVAL, M.OVEROPT_KL)] > 0.01  # lr 1e-2 moved it
    assert with_curve.metrics[M.key(M.EVAL, M.OVEROPT_PROXY)] == curve[4][M.key(M.EVAL, M.OVEROPT_PROXY)]
    # Sampling at evaluations leaves the training RNG alone: the same weights as a run without the curve.
    without = _dpo_run(tiny_setup, tmp_path / "plain")
    assert_same_weights(with_curve.model.state_dict(), without.model.state_dict())


def test_dpo_curve_points_are_kept_through_a_resume(tiny_setup, tmp_path):
    from rlhf_core.models import build_tiny_causal_lm
    from rlhf_core.trainers.ppo import value_model_from_policy

    tokenizer, _, _, tiny = tiny_setup
    reward_model = value_model_from_policy(build_tiny_causal_lm(tokenizer, tiny, seed=1), tokenizer.pad_token_id, seed=2)

    class Crash(RuntimeError):
        pass

    def crash_at_4(metrics, step):
        if step == 4:
            raise Crash  # after checkpoint-2
    with pytest.raises(Crash):
        _dpo_run(tiny_setup, tmp_path / "run", reward_model=reward_model, log_fn=crash_at_4)
    logs: list[tuple[int, dict]] = []
    _dpo_run(tiny_setup, tmp_path / "run", reward_model=reward_model, log_fn=lambda m, s: logs.append((s, m)))
    curve_steps = [s for s, m in logs if M.key(M.EVAL, M.OVEROPT_KL) in m]
    assert curve_steps == [0, 2, 4]  # 0 and 2 replayed from the checkpoint's log history, 4 evaluated after the resume
