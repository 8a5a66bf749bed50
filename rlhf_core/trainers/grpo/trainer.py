"""The GRPO/RLOO loop: k samples per prompt, rewards, group advantages, clipped updates, evaluation, checkpoints.

Sampling and log-prob recomputation are ``rlhf_core.rollout``'s (PPO's too); the advantages and
the loss are ``rlhf_core.rl.group``'s; checkpoints are Accelerate's (``rlhf_core.trainers.ppo.checkpoint``,
the loop and its checkpoints are ``rlhf_core.trainers.online``'s (shared with PPO), so a killed and
resumed run ends with the same weights on CPU: prompt batches are a pure function of (seed, update)
and each ``generate`` call of a rollout draws from a seed of (seed, update, row), which also makes N
processes sample what one does given their prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core import metrics as M
from rlhf_core.logprobs import causal_lm_logits
from rlhf_core.models.scalar_head import sequence_scores
from rlhf_core.overoptimization import curve_metrics
from rlhf_core.reward_sources import RM_PART, CombinedReward, RewardFn
from rlhf_core.rl import group_advantages, grpo_loss, rloo_advantages
from rlhf_core.rollout import (
    PROMPT_TEXT,
    SampledBatch,
    batch_response_logprobs,
    chunks,
    response_logprobs,
    sample_rows,
)
from rlhf_core.trainers.common import LogFn
from rlhf_core.trainers.divergence import DivergenceGuard
from rlhf_core.trainers.grpo.config import GRPOConfig
from rlhf_core.trainers.online import ROLLOUT, OnlineLoop, OnlineState, SamplesFn, unit_seed

BATCH_STD_EPS = 1e-4
"""``rlhf_core.rl.group_advantages``' eps, added to the batch's reward std (``scale_rewards="batch"``)."""


class GRPOTrainer(OnlineLoop):
    """The GRPO/RLOO update and evaluation; the loop is :class:`OnlineLoop`'s. Build it through :func:`train_grpo`."""

    name = "grpo"

    def __init__(self, cfg: GRPOConfig, accelerator: Accelerator, model: nn.Module, optimizer: Any, scheduler: Any,
                 ref_policy: PreTrainedModel, reward_model: PreTrainedModel | None, reward: CombinedReward,
                 tokenizer: PreTrainedTokenizerBase, train: datasets.Dataset, evaluation: datasets.Dataset,
                 monitor_fn: RewardFn | None, log_fn: LogFn | None, samples_fn: SamplesFn | None, eval_offset: int = 0) -> None:
        self.cfg, self.accelerator, self.model, self.optimizer, self.scheduler = cfg, accelerator, model, optimizer, scheduler
        self.ref_policy, self.reward_model, self.reward, self.tokenizer = ref_policy, reward_model, reward, tokenizer
        self.train_prompts, self.eval_prompts, self.eval_offset = train, evaluation, eval_offset
        self.monitor_fn, self.log_fn, self.samples_fn = monitor_fn, log_fn, samples_fn
        self.state = OnlineState()
        accelerator.register_for_checkpointing(self.state)
        self.eval_metrics: dict[str, float] = {}
        self.guard = DivergenceGuard(cfg.max_skipped_steps)

    @property
    def policy(self) -> PreTrainedModel:
        return self.accelerator.unwrap_model(self.model)

    # --- sampling and rewards -------------------------------------------------------------

    def sample(self, dataset: datasets.Dataset, rows: list[int], group_size: int, *, seed: int | None = None,
               do_sample: bool = True, seed_of_row: Callable[[int], int] | None = None) -> tuple[SampledBatch, list[str]]:
        """``group_size`` responses per prompt row (consecutive rows per prompt) and the prompt text of every row;
        ``seed_of_row``: each ``generate`` call seeded by its first (response) row (``rollout.sample_rows``)."""
        part = dataset.select(rows)
        prompt_ids = [list(p) for p in part["prompt_input_ids"] for _ in range(group_size)]
        batch = sample_rows(self.policy.eval(), self.tokenizer, prompt_ids, max_new_tokens=self.cfg.max_new_tokens,
                            temperature=self.cfg.temperature, batch_size=self.cfg.forward_batch_size, do_sample=do_sample,
                            seed=seed, seed_of_row=seed_of_row)
        prompts = [p for p in part[PROMPT_TEXT] for _ in range(group_size)]
        return batch, prompts

    @torch.no_grad()
    def rm_scores(self, batch: SampledBatch) -> list[float]:
        """(B,) the reward model's score of every response."""
        return torch.cat([
            sequence_scores(self.reward_model, batch.query_response[rows], batch.attention_mask[rows]).float()
            for rows in chunks(len(batch), self.cfg.forward_batch_size)
        ]).tolist()

    @torch.no_grad()
    def rewards(self, batch: SampledBatch, prompts: list[str]) -> tuple[Tensor, dict[str, list[float]]]:
        """(B,) combined reward and each unweighted part (``reward_model`` and every reward function)."""
        rm_scores = self.rm_scores(batch) if self.reward.uses_reward_model else None
        total, parts = self.reward.parts(prompts, batch.texts, rm_scores)
        return torch.tensor(total, dtype=torch.float32, device=batch.query_response.device), parts

    def proxy_scores(self, batch: SampledBatch, rewards: Tensor, parts: dict[str, list[float]]) -> list[float]:
        """(B,) the over-optimisation curve's proxy: the reward model's score (also at ``reward_model_weight`` 0, when a
        reward model is given), else the combined reward that is optimised."""
        if RM_PART in parts:
            return parts[RM_PART]
        return self.rm_scores(batch) if self.reward_model is not None else rewards.tolist()

    def advantages(self, rewards: Tensor) -> Tensor:
        """(B,) advantages of the rewards within their groups (``advantage`` and ``scale_rewards``; ``batch``: the std of
        every process's rewards, as TRL)."""
        k = self.cfg.num_generations
        if self.cfg.advantage == "rloo":
            return rloo_advantages(rewards, k)
        if self.cfg.scale_rewards == "batch" and self.accelerator.num_processes > 1:
            return group_advantages(rewards, k, scale="none") / (self.accelerator.gather(rewards).std() + BATCH_STD_EPS)
        return group_advantages(rewards, k, scale=self.cfg.scale_rewards)

    # --- one update -----------------------------------------------------------------------

    def optimise(self, batch: SampledBatch, advantages: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None
                 ) -> dict[str, Tensor]:
        """``num_iterations`` passes of the clipped surrogate over shuffled mini-batches; returns the mean stats."""
        cfg, acc = self.cfg, self.accelerator
        completion_mask, mask = batch.completion_mask, batch.response_mask  # (B, Q+R), (B, R)
        stats: dict[str, list[Tensor]] = {}
        self.model.train()
        for _ in range(cfg.num_iterations):
            order = torch.randperm(len(batch), device=batch.query_response.device)  # (B,)
            for start in range(0, len(order), cfg.mini_batch_size):
                idx = order[start : start + cfg.mini_batch_size]  # (b,)
                with acc.accumulate(self.model):
                    ids = batch.query_response[idx]  # (b, Q+R)
                    logits = causal_lm_logits(self.model, ids, batch.attention_mask[idx])  # (b, Q+R, V)
                    logps = response_logprobs(logits, ids, completion_mask[idx], batch.n_query, cfg.temperature).float()  # (b, R)
                    old = old_logps[idx] if old_logps is not None else logps.detach()  # μ = 1: the sampling policy is this one
                    loss, step_stats = grpo_loss(
                        logps, old, advantages[idx], mask[idx], epsilon_low=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                        loss_type=cfg.loss_type, ref_logps=ref_logps[idx] if ref_logps is not None else None, beta=cfg.beta,
                        max_completion_length=cfg.max_new_tokens)
                    if cfg.loss_type == "dapo":  # TRL's num_items_in_batch: the tokens of every process's mini-batch
                        loss = loss * self.token_share(mask[idx])
                    acc.backward(loss)
                    if acc.sync_gradients:
                        norm = None
                        if cfg.max_grad_norm is not None:
                            norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                            stats.setdefault(M.GRAD_NORM, []).append(norm)
                        self.guard.check(self.model, self.update + 1, self.scheduler.get_last_lr()[0], norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                stats.setdefault(M.LOSS, []).append(loss.detach())
                for name, key in ((M.CLIP_RATIO_REGION, "clipfrac"), (M.CLIP_RATIO_LOW, "clipfrac_low"),
                                  (M.CLIP_RATIO_HIGH, "clipfrac_high"), (M.KL, "kl")):
                    stats.setdefault(name, []).append(step_stats[key])
        self.model.eval()
        if cfg.beta == 0:
            stats.pop(M.KL)
        return {name: torch.stack([v.float() for v in values]).mean() for name, values in stats.items()}

    def step(self) -> dict[str, float]:
        """One update; returns its ``train/...`` metrics (averaged over processes), named as TRL's."""
        cfg = self.cfg
        rows, first = self.batch_rows(self.update, cfg.prompts_per_update)
        first_row, update = first * cfg.num_generations, self.update
        started = time.perf_counter()
        batch, prompts = self.sample(self.train_prompts, rows, cfg.num_generations,
                                     seed_of_row=lambda i: unit_seed(cfg.seed, ROLLOUT, update, first_row + i))
        generated = time.perf_counter()
        rewards, parts = self.rewards(batch, prompts)  # (B,)
        advantages = self.advantages(rewards)  # (B,)
        with torch.no_grad():
            old_logps = (batch_response_logprobs(self.policy, batch, cfg.temperature, cfg.forward_batch_size).float()
                         if cfg.num_iterations > 1 else None)
            ref_logps = (batch_response_logprobs(self.ref_policy, batch, cfg.temperature, cfg.forward_batch_size).float()
                         if cfg.beta > 0 else None)
        scored = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        stats = self.optimise(batch, advantages, old_logps, ref_logps)
        self.scheduler.step()
        grouped_std = rewards.view(-1, cfg.num_generations).std(dim=1)  # (G,)
        per_batch: dict[str, Any] = {
            M.GROUP_REWARD: rewards.mean(),
            M.GROUP_REWARD_STD: rewards.std(),
            M.GROUP_ZERO_STD: (grouped_std < 1e-6).float().mean(),
            M.COMPLETION_LENGTH: batch.response_mask.sum(dim=1).float().mean(),
            M.COMPLETION_CLIPPED: (~batch.has_eos).float().mean(),
            **{M.reward_part(name): torch.tensor(values).mean() for name, values in parts.items()},
            **stats,
        }
        if self.monitor_fn is not None:
            per_batch[M.OBJECTIVE_GOLD] = torch.tensor(self.monitor_fn(prompts, batch.texts), dtype=torch.float32).mean()
        metrics = self.reduce_train_metrics(per_batch)
        metrics[M.key(M.TRAIN, M.LEARNING_RATE)] = lr
        metrics.update({M.key("timing", "generation"): generated - started, M.key("timing", "scoring"): scored - generated,
                        M.key("timing", "training"): time.perf_counter() - scored})
        return metrics

    # --- evaluation -----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """One response per held-out prompt (fixed seed): mean reward, each part, KL to the reference, monitor, and the
        over-optimisation curve's point (``eval/overopt/...``)."""
        cfg = self.cfg
        rows_all: list[dict[str, Any]] = []
        for start in range(0, len(self.eval_prompts), cfg.forward_batch_size):
            rows = list(range(start, min(start + cfg.forward_batch_size, len(self.eval_prompts))))
            batch, prompts = self.sample(self.eval_prompts, rows, 1, seed=cfg.seed + self.eval_offset + start,
                                         do_sample=cfg.eval_do_sample)
            rewards, parts = self.rewards(batch, prompts)
            logps = batch_response_logprobs(self.policy, batch, cfg.temperature, cfg.forward_batch_size)
            ref = batch_response_logprobs(self.ref_policy, batch, cfg.temperature, cfg.forward_batch_size)
            kl = torch.where(batch.mask, logps - ref, 0.0).sum(dim=1)  # (B,) k1 KL per response
            gold = self.monitor_fn(prompts, batch.texts) if self.monitor_fn is not None else None
            proxy = self.proxy_scores(batch, rewards, parts)
            for i, (prompt, text) in enumerate(zip(prompts, batch.texts)):
                row = {"step": self.update, "prompt": prompt, "response": text, "score": float(rewards[i]), "kl": float(kl[i]),
                       "proxy_score": float(proxy[i]), "length": int(batch.mask[i].sum()),
                       **{f"reward/{n}": float(v[i]) for n, v in parts.items()}}
                if gold is not None:
                    row["gold_reward"] = float(gold[i])
                rows_all.append(row)
        rows_all = gather_object(rows_all)
        n = len(rows_all)

        def mean(key: str) -> float:
            return sum(r[key] for r in rows_all) / n

        metrics = {M.key(M.EVAL, M.OBJECTIVE_SCORES): mean("score"), M.key(M.EVAL, M.OBJECTIVE_KL): mean("kl"),
                   M.key(M.EVAL, M.RESPONSE_LENGTH): mean("length")}
        metrics.update({M.key(M.EVAL, M.reward_part(k[len("reward/"):])): mean(k) for k in rows_all[0] if k.startswith("reward/")})
        if self.monitor_fn is not None:
            metrics[M.key(M.EVAL, M.OBJECTIVE_GOLD)] = mean("gold_reward")
        metrics.update(curve_metrics([r["proxy_score"] for r in rows_all], [r["kl"] for r in rows_all],
                                     [r["gold_reward"] for r in rows_all] if self.monitor_fn is not None else None))
        self.eval_metrics = metrics
        self.log(metrics, self.update)
        self.add_samples(rows_all[:4], self.update)
        return metrics
