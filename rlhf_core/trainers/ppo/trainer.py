"""The PPO loop: rollout, shaped rewards and advantages, K epochs of clipped updates, evaluation, checkpoints."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn

from rlhf_core import metrics as M
from rlhf_core.overoptimization import curve_metrics
from rlhf_core.reward_sources import RewardFn
from rlhf_core.rl import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    compute_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_core.rl.masked import WHITEN_EPS
from rlhf_core.rollout import PROMPT_TEXT, response_columns, response_logprobs
from rlhf_core.trainers.common import LogFn
from rlhf_core.trainers.divergence import DivergenceGuard
from rlhf_core.trainers.online import REWARD_NORM, ROLLOUT, OnlineLoop, SamplesFn, unit_seed
from rlhf_core.trainers.ppo.checkpoint import PPOState
from rlhf_core.trainers.ppo.config import PPOConfig
from rlhf_core.trainers.ppo.models import PolicyAndValue
from rlhf_core.trainers.ppo.rollout import RewardNorm, Rollout, RolloutCollector


class PPOTrainer(OnlineLoop):
    """The PPO update and evaluation; the loop is :class:`OnlineLoop`'s. Build it through :func:`rlhf_core.trainers.ppo.train_ppo`."""

    name = "ppo"

    def __init__(self, cfg: PPOConfig, accelerator: Accelerator, model: nn.Module, optimizer: Any, scheduler: Any,
                 collector: RolloutCollector, train: datasets.Dataset, evaluation: datasets.Dataset,
                 monitor_fn: RewardFn | None, log_fn: LogFn | None, samples_fn: SamplesFn | None, eval_offset: int = 0) -> None:
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.optimizer, self.scheduler, self.collector = optimizer, scheduler, collector
        self.train_prompts, self.eval_prompts, self.eval_offset = train, evaluation, eval_offset
        self.monitor_fn, self.log_fn, self.samples_fn = monitor_fn, log_fn, samples_fn
        kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_control == "adaptive"
                  else FixedKLController(cfg.kl_coef))
        self.state = PPOState(kl_ctl=kl_ctl, reward_norm=RewardNorm())
        accelerator.register_for_checkpointing(self.state)
        self.eval_metrics: dict[str, float] = {}
        self.guard = DivergenceGuard(cfg.max_skipped_steps)  # a NaN gradient never reaches the weights
        self.timing: dict[str, float] = {}
        """Wall time of the phases of the last rollout (``generation``, ``scoring``) and its token count."""

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    # --- prompts and rollouts -----------------------------------------------------------

    def prompt_batch(self, update: int) -> list[int]:
        """Row indices of this process's prompts for ``update`` (0-based): a pure function of (seed, update)."""
        return self.batch_rows(update, self.cfg.rollout_batch_size)[0]

    def rollout(self, rows: list[int], dataset: datasets.Dataset | None = None, *, seed: int | None = None,
                do_sample: bool = True, seed_of_row: Callable[[int], int] | None = None) -> Rollout:
        """Sample one response per prompt row, then score it with every model (no gradients)."""
        batch = (dataset if dataset is not None else self.train_prompts).select(rows)
        ro, self.timing = self.collector.collect(self.unwrapped.eval(), [list(p) for p in batch["prompt_input_ids"]],
                                                 list(batch[PROMPT_TEXT]), self.state.reward_norm, seed=seed,
                                                 do_sample=do_sample, seed_of_row=seed_of_row)
        return ro

    def training_rollout(self, update: int, stream: int = ROLLOUT) -> Rollout:
        """The rollout of ``update``'s prompts, each ``generate`` call seeded by its place in the update's batch."""
        rows, first = self.batch_rows(update, self.cfg.rollout_batch_size)
        return self.rollout(rows, seed_of_row=lambda i: unit_seed(self.cfg.seed, stream, update, first + i))

    def fit_reward_norm(self) -> None:
        """Detail 1: gain and bias from ``reward_norm_batches`` rollouts of the initial policy."""
        raw: list[float] = []
        for k in range(self.cfg.reward_norm_batches):
            raw += self.training_rollout(k, REWARD_NORM).raw_scores.tolist()
        self.state.reward_norm = RewardNorm.fit(gather_object(raw))

    # --- one update ---------------------------------------------------------------------

    def advantages(self, ro: Rollout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Details 2, 5, 13, 6: shaped rewards, GAE, whitening. Returns (rewards, kl, advantages, returns), each (B, R)."""
        rewards, kl = compute_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, self.state.kl_ctl.value,
                                      self.cfg.kl_estimator)  # (B, R) each
        if self.cfg.whiten_rewards:
            rewards = self.whiten(rewards, ro.mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, ro.values, ro.mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = self.whiten(advantages, ro.mask)
        return rewards, kl, advantages, returns

    def whiten(self, x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
        """``masked_whiten`` of (B, R) ``x`` with the mean and biased variance of the update's whole batch (every
        process's), so N processes whiten as one process given their batches would."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return masked_whiten(x, mask, shift_mean=shift_mean)
        m = mask.bool()
        x = torch.where(m, x, 0.0)
        sums = acc.reduce(torch.stack([x.double().sum(), m.double().sum()]), reduction="sum")  # (2,) Σx, n
        mean = sums[0] / sums[1]
        var = acc.reduce(torch.where(m, x.double() - mean, 0.0).pow(2).sum(), reduction="sum") / sums[1]
        whitened = (x - mean.float()) * torch.rsqrt(var.float() + WHITEN_EPS)
        if not shift_mean:
            whitened = whitened + mean.float()
        return torch.where(m, whitened, 0.0)

    def optimise(self, ro: Rollout, advantages: Tensor, returns: Tensor) -> dict[str, Tensor]:
        """Detail 11: K epochs of clipped PPO over shuffled minibatches; returns the mean stats."""
        cfg, acc = self.cfg, self.accelerator
        completion_mask = ro.completion_mask  # (B, Q+R)
        names = (M.POLICY_APPROXKL, M.POLICY_CLIPFRAC, M.VAL_VPRED, M.VAL_CLIPFRAC, M.LOSS_POLICY, M.LOSS_VALUE)
        stats: dict[str, list[Tensor]] = {name: [] for name in names}
        grad_norms: list[Tensor] = []  # before clipping, one per optimizer step
        self.model.train()  # dropout is 0 (detail 10): same outputs as eval mode
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(len(ro.prompts), device=ro.query_response.device)  # (B,)
            for start in range(0, len(order), cfg.mini_batch_size):
                idx = order[start : start + cfg.mini_batch_size]  # (b,)
                with acc.accumulate(self.model):
                    ids, mask = ro.query_response[idx], ro.mask[idx]  # (b, Q+R), (b, R)
                    logits, values = self.model(ids, ro.attention_mask[idx])  # (b, Q+R, V), (b, Q+R)
                    new_logprobs = response_logprobs(logits, ids, completion_mask[idx], ro.n_query, cfg.temperature)  # (b, R)
                    vpred = response_columns(values, ro.n_query).float()  # (b, R)
                    pg_loss, pg_stats = ppo_policy_loss(new_logprobs.float(), ro.logprobs[idx], advantages[idx], mask, cfg.clip_range)
                    vf_loss, vf_stats = ppo_value_loss(vpred, ro.values[idx], returns[idx], mask, cfg.clip_range_value)
                    acc.backward((pg_loss + cfg.vf_coef * vf_loss) * self.token_share(mask))  # token means over all processes
                    if acc.sync_gradients:
                        norm = None
                        if cfg.max_grad_norm is not None:
                            norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                            grad_norms.append(norm)
                        self.guard.check(self.model, self.update + 1, self.scheduler.get_last_lr()[0], norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                for name, value in ((M.POLICY_APPROXKL, pg_stats["approxkl"]), (M.POLICY_CLIPFRAC, pg_stats["clipfrac"]),
                                    (M.VAL_VPRED, vf_stats["vpred"]), (M.VAL_CLIPFRAC, vf_stats["clipfrac"]),
                                    (M.LOSS_POLICY, pg_loss.detach()), (M.LOSS_VALUE, vf_loss.detach())):
                    stats[name].append(value)
        self.model.eval()
        if grad_norms:
            stats[M.GRAD_NORM] = grad_norms
        return {name: torch.stack([v.float() for v in values]).mean() for name, values in stats.items()}

    def step(self) -> dict[str, float]:
        """One PPO update; returns its ``train/...`` metrics (averaged over processes)."""
        ro = self.training_rollout(self.update)
        _, kl, advantages, returns = self.advantages(ro)
        beta = self.state.kl_ctl.value
        lr = self.scheduler.get_last_lr()[0]
        timing = dict(self.timing)
        started = time.perf_counter()
        stats = self.optimise(ro, advantages, returns)
        timing["training"] = time.perf_counter() - started
        self.scheduler.step()
        kl_sum = kl.sum(dim=1)  # (B,) KL of each response
        per_batch = {
            M.OBJECTIVE_KL: kl_sum.mean(),
            M.OBJECTIVE_SCORES: ro.scores.mean(),
            M.OBJECTIVE_RLHF_REWARD: (ro.scores - beta * kl_sum).mean(),
            M.OBJECTIVE_ENTROPY: ro.entropy.mean(),
            M.NO_EOS_FRACTION: (~ro.has_eos).float().mean(),
            M.RESPONSE_LENGTH: ro.mask.sum(dim=1).float().mean(),
            **stats,
        }
        if self.monitor_fn is not None:
            per_batch[M.OBJECTIVE_GOLD] = torch.tensor(self.monitor_fn(ro.prompts, ro.texts), dtype=torch.float32).mean()
        metrics = self.reduce_train_metrics(per_batch)
        metrics.update({M.key("timing", name): value for name, value in timing.items()})
        metrics[M.key(M.TRAIN, M.KL_COEF)] = beta
        metrics[M.key(M.TRAIN, M.LEARNING_RATE)] = lr
        self.state.kl_ctl.update(metrics[M.key(M.TRAIN, M.OBJECTIVE_KL)],
                                 n_steps=len(ro.prompts) * self.accelerator.num_processes)
        return metrics

    # --- evaluation ---------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Score one response per held-out prompt; log ``eval/...`` metrics (the over-optimisation curve's point among
        them: the raw reward-model score, gold and KL) and a few samples."""
        cfg = self.cfg
        rows_all: list[dict[str, Any]] = []
        for start in range(0, len(self.eval_prompts), cfg.forward_batch_size):
            rows = list(range(start, min(start + cfg.forward_batch_size, len(self.eval_prompts))))
            ro = self.rollout(rows, self.eval_prompts, seed=cfg.seed + self.eval_offset + start, do_sample=cfg.eval_do_sample)
            kl = torch.where(ro.mask, ro.logprobs - ro.ref_logprobs, 0.0).sum(dim=1)  # (B,) k1 KL per response
            gold = self.monitor_fn(ro.prompts, ro.texts) if self.monitor_fn is not None else None
            for i, (prompt, text) in enumerate(zip(ro.prompts, ro.texts)):
                row = {"step": self.update, "prompt": prompt, "response": text, "score": float(ro.scores[i]),
                       "raw_score": float(ro.raw_scores[i]), "proxy_score": float(ro.proxy_scores[i]), "kl": float(kl[i]),
                       "length": int(ro.mask[i].sum()), "has_eos": bool(ro.has_eos[i])}
                if gold is not None:
                    row["gold_reward"] = float(gold[i])
                rows_all.append(row)
        rows_all = gather_object(rows_all)
        n = len(rows_all)
        metrics = {
            M.key(M.EVAL, M.OBJECTIVE_SCORES): sum(r["score"] for r in rows_all) / n,
            M.key(M.EVAL, M.OBJECTIVE_KL): sum(r["kl"] for r in rows_all) / n,
            M.key(M.EVAL, M.RESPONSE_LENGTH): sum(r["length"] for r in rows_all) / n,
            M.key(M.EVAL, M.NO_EOS_FRACTION): sum(not r["has_eos"] for r in rows_all) / n,
        }
        metrics[M.key(M.EVAL, M.OBJECTIVE_RLHF_REWARD)] = (
            metrics[M.key(M.EVAL, M.OBJECTIVE_SCORES)] - self.state.kl_ctl.value * metrics[M.key(M.EVAL, M.OBJECTIVE_KL)])
        if self.monitor_fn is not None:
            metrics[M.key(M.EVAL, M.OBJECTIVE_GOLD)] = sum(r["gold_reward"] for r in rows_all) / n
        metrics.update(curve_metrics([r["proxy_score"] for r in rows_all], [r["kl"] for r in rows_all],
                                     [r["gold_reward"] for r in rows_all] if self.monitor_fn is not None else None))
        self.eval_metrics = metrics
        self.log(metrics, self.update)
        self.add_samples(rows_all[: cfg.n_eval_samples], self.update)
        return metrics

    def start_fresh(self) -> None:
        if self.cfg.normalize_reward:
            self.fit_reward_norm()
