"""The one place for metric names.

Trainers emit these through ``log_fn(metrics, step)``; ``tasks/`` logs them to MLflow and
writes the final ones to ``metrics/<stage>.json``. Names follow TRL's where TRL has the same
quantity (so users recognise them), under a split prefix: ``train/…`` during training,
``eval/…`` on the held-out split. The parent run of a pipeline run gets ``<stage>/<name>``.
"""

from __future__ import annotations

TRAIN = "train"
EVAL = "eval"

# Shared by every trainer.
LOSS = "loss"
LEARNING_RATE = "lr"
GRAD_NORM = "grad_norm"
EPOCH = "epoch"

# SFT.
PERPLEXITY = "perplexity"
TOKEN_ACCURACY = "token_accuracy"

# Reward model (Bradley-Terry).
ACCURACY = "accuracy"
MARGIN = "margin"
REWARD_MEAN = "reward_mean"
REWARD_STD = "reward_std"
# + the held-out accuracy's 95% bootstrap interval (pairs resampled): ci_low(ACCURACY), ci_high(ACCURACY).

# The reward model against the synthetic task's label-noise ceiling (``eval/...`` of the reward stage).
BAYES_ACCURACY = "bayes_accuracy"
ACCURACY_OVER_BAYES = "accuracy_over_bayes"

# DPO (TRL's names).
REWARDS_CHOSEN = "rewards/chosen"
REWARDS_REJECTED = "rewards/rejected"
REWARDS_ACCURACIES = "rewards/accuracies"
REWARDS_MARGINS = "rewards/margins"
LOGPS_CHOSEN = "logps/chosen"
LOGPS_REJECTED = "logps/rejected"

COMPUTE_SECONDS = "compute_seconds"
"""In ``metrics/<stage>.json``: seconds the stage spent in training, generation and scoring loops
(``rlhf_core.compute_clock``); the rest of its time is overhead."""
PIPELINE_WALL_SECONDS = "pipeline/wall_seconds"
PIPELINE_COMPUTE_SECONDS = "pipeline/compute_seconds"
"""The compute seconds of the stages that ran in this pipeline run (not those DVC skipped)."""
PIPELINE_COMPUTE_SHARE = "pipeline/compute_share"
"""Compute seconds ÷ wall seconds of the run (``rlhf run``: from the command's start)."""

BEST_STEP = "checkpoint/best_step"
"""The step of the checkpoint a stage output when it keeps its best evaluation checkpoint (``best_metric``)."""
BEST_VALUE = "checkpoint/best_value"
"""That checkpoint's value of ``best_metric`` (online trainers; the Trainer-based ones report its whole evaluation)."""

# PPO (names of the N implementation details / TRL's former PPOTrainer).
OBJECTIVE_KL = "objective/kl"
OBJECTIVE_SCORES = "objective/scores"
OBJECTIVE_RLHF_REWARD = "objective/rlhf_reward"
OBJECTIVE_ENTROPY = "objective/entropy"
OBJECTIVE_GOLD = "objective/gold_reward"
POLICY_APPROXKL = "policy/approxkl"
POLICY_CLIPFRAC = "policy/clipfrac"
VAL_VPRED = "val/vpred"
VAL_CLIPFRAC = "val/clipfrac"
LOSS_POLICY = "loss/policy"
LOSS_VALUE = "loss/value"
KL_COEF = "objective/kl_coef"
NO_EOS_FRACTION = "objective/no_eos_fraction"
RESPONSE_LENGTH = "objective/response_length"

# GRPO/RLOO (TRL's GRPOTrainer names) and KTO's reference point.
GROUP_REWARD = "reward"
GROUP_REWARD_STD = "reward_std"
GROUP_ZERO_STD = "frac_reward_zero_std"
COMPLETION_LENGTH = "completions/mean_length"
COMPLETION_CLIPPED = "completions/clipped_ratio"
CLIP_RATIO_REGION = "clip_ratio/region_mean"
CLIP_RATIO_LOW = "clip_ratio/low_mean"
CLIP_RATIO_HIGH = "clip_ratio/high_mean"
KL = "kl"


def reward_part(name: str) -> str:
    """``rewards/<name>/mean``: the mean of one reward function (or ``reward_model``) of a combined reward."""
    return f"rewards/{name}/mean"

# Over-optimisation curves (``rlhf_core.overoptimization``; Gao et al. 2022): logged under ``eval/`` at every evaluation
# of a policy-training stage, on the same held-out prompts and sampling seed each time.
OVEROPT = "overopt"
OVEROPT_PROXY = "overopt/proxy_reward"
"""Mean raw reward-model score (no normalisation, shaping or penalty); without a reward model, the optimised reward."""
OVEROPT_GOLD = "overopt/gold_reward"
"""Mean gold reward (tasks that have one)."""
OVEROPT_KL = "overopt/kl"
"""Mean k1 KL to the reference per sequence, Σ_t (log π − log π_ref) over the sampled response (nats)."""
OVEROPT_SQRT_KL = "overopt/sqrt_kl"
"""d = sqrt(max(mean KL, 0)), the x-axis of the curves."""
# The stage's summary of its curve (``metrics/<stage>.json``, not logged per step).
OVEROPT_PROXY_SERIES = "proxy"
OVEROPT_GOLD_SERIES = "gold"
OVEROPT_N_POINTS = "overopt/points"
OVEROPT_PEAK_GOLD_STEP = "overopt/peak_gold/step"
OVEROPT_PEAK_GOLD = "overopt/peak_gold/gold_reward"
OVEROPT_PEAK_GOLD_PROXY = "overopt/peak_gold/proxy_reward"
OVEROPT_PEAK_GOLD_SQRT_KL = "overopt/peak_gold/sqrt_kl"
OVEROPT_LAST_STEP = "overopt/last/step"
OVEROPT_LAST_PROXY = "overopt/last/proxy_reward"
OVEROPT_LAST_GOLD = "overopt/last/gold_reward"
OVEROPT_LAST_SQRT_KL = "overopt/last/sqrt_kl"


def overopt_fit(series: str, param: str) -> str:
    """``overopt/<series>_fit/<param>``: a parameter (alpha, beta, rmse, peak_sqrt_kl) of the fitted R(d) of ``proxy`` or ``gold``."""
    return f"{OVEROPT}/{series}_fit/{param}"


# A policy on held-out prompts (``rlhf_core.evaluation``); the evaluate stage writes ``<policy>/<name>``.
GOLD_REWARD = "gold_reward"
RM_SCORE = "rm_score"
KL_PER_SEQUENCE = "kl_per_sequence"
KL_PER_TOKEN = "kl_per_token"
MEAN_RESPONSE_LENGTH = "response_length"
DISTINCT_1 = "distinct_1"
DISTINCT_2 = "distinct_2"
WIN_RATE_VS_SFT_GOLD = "win_rate_vs_sft/gold"
WIN_RATE_VS_SFT_RM = "win_rate_vs_sft/rm"
POLICY_HEADLINE = (GOLD_REWARD, RM_SCORE, KL_PER_TOKEN, WIN_RATE_VS_SFT_GOLD, WIN_RATE_VS_SFT_RM, DISTINCT_2)
N_PROMPTS = "n_prompts"
"""Held-out prompts every policy answered (top level of ``metrics/evaluate.json``)."""
SAMPLES_PER_PROMPT = "samples_per_prompt"
"""Responses sampled per prompt and policy; means and intervals are over prompts × samples."""


def ci_low(name: str) -> str:
    """``<name>_ci_low``: the lower end of the 95% bootstrap interval of metric ``name``."""
    return f"{name}_ci_low"


def ci_high(name: str) -> str:
    """``<name>_ci_high``: the upper end of the 95% bootstrap interval of metric ``name``."""
    return f"{name}_ci_high"
"""The per-policy numbers a run's summary table shows (``rlhf run``)."""

# Trainer's own log keys -> ours.
_HF_RENAMES = {"loss": LOSS, "learning_rate": LEARNING_RATE, "grad_norm": GRAD_NORM, "epoch": EPOCH}


def key(split: str, name: str) -> str:
    """``key("eval", "rewards/margins") == "eval/rewards/margins"``."""
    return f"{split}/{name}"


def from_trainer_logs(logs: dict[str, float]) -> dict[str, float]:
    """Map a transformers ``Trainer`` log dict to our names.

    ``eval_loss`` -> ``eval/loss``; ``loss`` -> ``train/loss``; ``learning_rate`` -> ``train/lr``;
    metrics a trainer stored itself (``rewards/chosen``) -> ``train/rewards/chosen``.
    Speed and bookkeeping entries (``train_runtime``, ``*_per_second``, ``total_flos``) keep
    their own ``train/`` or ``eval/`` prefix.
    """
    out: dict[str, float] = {}
    for name, value in logs.items():
        if not isinstance(value, (int, float)):
            continue
        if name.startswith("eval_"):
            out[key(EVAL, name[len("eval_"):])] = float(value)
        elif name.startswith("train_"):
            out[key(TRAIN, name[len("train_"):])] = float(value)
        else:
            out[key(TRAIN, _HF_RENAMES.get(name, name))] = float(value)
    return out


# The pipeline's parent run in the MLflow UI. The UI puts a run's charts in sections named by the part of each
# metric name before its last "/" and orders the sections by name, "Model metrics" (names without "/") last
# (RunsChartsCardConfig.extractChartSectionName / getBaseChartAndSectionConfigs in mlflow/server/js). The parent
# run logs every stage's numbers as "<stage>/<key>"; it logs the held-out reward, KL and win rates of each policy
# once more as "<n>_<metric>/<policy>", so these sections come first (a digit sorts before a letter) and in this order.
PARENT_HEADLINE = {
    GOLD_REWARD: "1_gold_reward",
    RM_SCORE: "2_rm_score",
    KL_PER_TOKEN: "3_kl_per_token",
    WIN_RATE_VS_SFT_GOLD: "4_win_rate_vs_sft_gold",
    WIN_RATE_VS_SFT_RM: "5_win_rate_vs_sft_rm",
}
"""Evaluation metric (``<policy>/<name>`` in ``metrics/evaluate.json``) -> its chart section on the parent run."""


def parent_headline(name: str, policy: str) -> str:
    """``parent_headline("gold_reward", "dpo") == "1_gold_reward/dpo"``: a policy's headline metric on the parent run."""
    return f"{PARENT_HEADLINE[name]}/{policy}"
