"""``train_grpo``: checks the inputs, tokenises the prompts, builds the models, optimizer and Accelerator, runs the loop."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from rlhf_core.reward_sources import CombinedReward, RewardFn
from rlhf_core.trainers.common import LogFn
from rlhf_core.trainers.grpo.config import GRPOConfig
from rlhf_core.trainers.grpo.trainer import GRPOTrainer
from rlhf_core.trainers.online import SamplesFn, prepare_prompts_and_accelerator
from rlhf_core.trainers.ppo.models import disable_dropout


@dataclass
class GRPOResult:
    policy: PreTrainedModel
    metrics: dict[str, float]
    """Final held-out metrics (``eval/...``)."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    updates: int = 0


def train_grpo(
    policy: PreTrainedModel,
    ref_policy: PreTrainedModel | None,
    reward_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    train_prompts: datasets.Dataset,
    eval_prompts: datasets.Dataset,
    cfg: GRPOConfig,
    *,
    reward_fns: Mapping[str, RewardFn] | None = None,
    reward_weights: Mapping[str, float] | None = None,
    monitor_fn: RewardFn | None = None,
    log_fn: LogFn | None = None,
    samples_fn: SamplesFn | None = None,
) -> GRPOResult:
    """GRPO/RLOO-train ``policy`` on prompt records (``prompt``, ``prompt_messages``).

    Args:
        policy: the SFT model; trained in place.
        ref_policy: frozen reference for the KL term and the reported KL; ``None``: a frozen copy of ``policy``.
        reward_model: frozen scalar-head model (weight ``cfg.reward_model_weight``), or ``None``. At weight 0 it is only
            the proxy of the over-optimisation curve (scored at evaluations, never optimised).
        tokenizer: the policy's tokenizer (pad and eos tokens set).
        train_prompts / eval_prompts: prompt records.
        cfg: :class:`GRPOConfig`; checkpoints in ``<output_dir>/checkpoints/checkpoint_<update>``, the newest
            restored first when ``cfg.resume``.
        reward_fns: named reward functions (each one's mean is logged as ``rewards/<name>/mean``).
        reward_weights: weight per reward function name (default 1).
        monitor_fn: reported only (``objective/gold_reward``), never optimised.
        log_fn: ``log_fn(metrics, update)``; samples_fn: ``samples_fn(rows, update)`` with decoded evaluation samples.

    With ``cfg.best_metric`` the returned policy is the best evaluation's (``rlhf_core.trainers.online``).
    """
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("train_grpo: the tokenizer needs pad and eos tokens")
    if ref_policy is policy or reward_model is policy:
        raise ValueError("train_grpo: ref_policy and reward_model must be separate models from the trained policy")
    if reward_model is None and not reward_fns:
        raise ValueError("train_grpo needs reward functions, a reward model, or both")
    reward = CombinedReward(reward_fns, reward_weights, rm_weight=cfg.reward_model_weight if reward_model is not None else 0.0)
    accelerator, train_tok, eval_tok, eval_offset = prepare_prompts_and_accelerator(
        cfg, tokenizer, train_prompts, eval_prompts, batch_prompts=cfg.prompts_per_update, batch_setting="prompts_per_update")

    if ref_policy is None:
        ref_policy = copy.deepcopy(policy)
    for frozen in (ref_policy, reward_model):
        if frozen is not None:
            disable_dropout(frozen).eval().requires_grad_(False).to(accelerator.device)
    disable_dropout(policy)  # old and new log-probs of the first pass agree exactly (ratio 1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_updates),
                              num_training_steps=cfg.max_updates)
    model, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    trainer = GRPOTrainer(cfg, accelerator, model, optimizer, scheduler, ref_policy, reward_model, reward, tokenizer,
                          train_tok, eval_tok, monitor_fn, log_fn, samples_fn, eval_offset)
    trainer.train()
    return GRPOResult(policy=trainer.policy.eval(), metrics=trainer.eval_metrics, samples=trainer.samples,
                      updates=trainer.update)
