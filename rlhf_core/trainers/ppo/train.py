"""``train_ppo``: checks the inputs, tokenises the prompts, builds the models, optimizer and Accelerator, runs the loop."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from rlhf_core.reward_sources import CombinedReward, RewardFn
from rlhf_core.trainers.common import LogFn
from rlhf_core.trainers.online import prepare_prompts_and_accelerator
from rlhf_core.trainers.ppo.config import PPOConfig
from rlhf_core.trainers.ppo.models import PolicyAndValue, disable_dropout, value_model_from_policy
from rlhf_core.trainers.ppo.rollout import RolloutCollector
from rlhf_core.trainers.ppo.trainer import PPOTrainer, SamplesFn


@dataclass
class PPOResult:
    policy: PreTrainedModel
    value_model: PreTrainedModel
    metrics: dict[str, float]
    """Final held-out metrics (``eval/...``)."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Decoded evaluation samples of every evaluation (``step``, ``prompt``, ``response``, ``score``, ``kl``, ...)."""
    reward_norm: dict[str, float] = field(default_factory=dict)
    """The reward normalisation: ``gain``, ``bias`` and the raw ``mean``/``std`` they came from."""
    updates: int = 0


def _build_reward(reward_model: PreTrainedModel | None, reward_fn: RewardFn | None, cfg: PPOConfig) -> CombinedReward:
    if reward_model is None and reward_fn is None:
        raise ValueError("train_ppo needs a reward_model, a reward_fn, or both")
    fns = {"reward_fn": reward_fn} if reward_fn is not None else {}
    combined = CombinedReward(fns, {"reward_fn": cfg.reward_fn_weight} if fns else None,
                              rm_weight=cfg.reward_model_weight if reward_model is not None else 0.0)
    if reward_model is not None and not combined.uses_reward_model and not fns:
        raise ValueError("reward_model_weight is 0 and there is no reward_fn: nothing to optimise")
    return combined


def train_ppo(
    policy: PreTrainedModel,
    ref_policy: PreTrainedModel | None,
    reward_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    train_prompts: datasets.Dataset,
    eval_prompts: datasets.Dataset,
    cfg: PPOConfig,
    *,
    value_model: PreTrainedModel | None = None,
    reward_fn: RewardFn | None = None,
    monitor_fn: RewardFn | None = None,
    log_fn: LogFn | None = None,
    samples_fn: SamplesFn | None = None,
) -> PPOResult:
    """PPO-train ``policy`` on normalised prompt records (``prompt``, ``prompt_messages``).

    Args:
        policy: the SFT model; trained in place.
        ref_policy: frozen reference (the SFT model); ``None``: a frozen copy of ``policy`` as given.
        reward_model: frozen scalar-head model scoring (prompt + response) at its last token, or ``None``
            when ``reward_fn`` alone gives the reward. It must share ``tokenizer``.
        tokenizer: the policy's tokenizer (pad and eos tokens set).
        train_prompts / eval_prompts: prompt records; rollouts draw from the first, evaluation uses all of the second.
        cfg: :class:`PPOConfig`. Checkpoints go to ``<cfg.output_dir>/checkpoints/checkpoint_<update>``; with
            ``cfg.resume`` the newest is restored first.
        value_model: initial value model; default: a trainable copy of ``reward_model`` (detail 7),
            else the policy's backbone with a new scalar head.
        reward_fn: Python reward ``fn(prompts, responses) -> list[float]`` used instead of or beside the
            reward model: ``s = reward_model_weight · r_φ + reward_fn_weight · reward_fn``.
        monitor_fn: a reward that is only reported (``objective/gold_reward``), never optimised.
        log_fn: ``log_fn(metrics, update)`` receives ``train/...`` and ``eval/...`` metrics.
        samples_fn: ``samples_fn(rows, update)`` receives a few decoded evaluation samples.

    Returns:
        :class:`PPOResult` with the trained policy and value model, the final ``eval/...`` metrics and
        the evaluation samples.
    """
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("train_ppo: the tokenizer needs pad and eos tokens")
    if ref_policy is policy or reward_model is policy:
        raise ValueError("train_ppo: ref_policy and reward_model must be separate models from the trained policy")
    reward = _build_reward(reward_model, reward_fn, cfg)
    accelerator, train_tok, eval_tok, eval_offset = prepare_prompts_and_accelerator(
        cfg, tokenizer, train_prompts, eval_prompts, batch_prompts=cfg.rollout_batch_size, batch_setting="rollout_batch_size")

    if ref_policy is None:
        ref_policy = copy.deepcopy(policy)
    if value_model is None:  # detail 7; a copy of a frozen reward model must be made trainable
        if reward_model is not None:
            value_model = copy.deepcopy(reward_model)
        else:
            value_model = value_model_from_policy(policy, tokenizer.pad_token_id, cfg.seed)
        value_model.requires_grad_(True)
    for frozen in (ref_policy, reward_model):
        if frozen is not None:
            disable_dropout(frozen).eval().requires_grad_(False).to(accelerator.device)
    for trained in (policy, value_model):
        disable_dropout(trained)

    model = PolicyAndValue(policy, value_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_updates),
                              num_training_steps=cfg.max_updates)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    collector = RolloutCollector(cfg, ref_policy, reward_model, reward, tokenizer)
    trainer = PPOTrainer(cfg, accelerator, model, optimizer, scheduler, collector, train_tok, eval_tok, monitor_fn, log_fn,
                         samples_fn, eval_offset)
    trainer.train()
    unwrapped = trainer.unwrapped.eval()
    return PPOResult(policy=unwrapped.policy, value_model=unwrapped.value, metrics=trainer.eval_metrics,
                     samples=trainer.samples, reward_norm=asdict(trainer.state.reward_norm), updates=trainer.update)
