"""PPO for language models (RLHF, Ziegler et al. 2019; Ouyang et al. 2022) on Accelerate.

Each update: sample responses to a batch of prompts from the policy, score them, turn scores
and the KL to the frozen reference into per-token rewards, estimate advantages with GAE, then
run K epochs of clipped PPO over shuffled minibatches. The math is ``rlhf_core.rl``; this module
is the loop, the models and the bookkeeping.

Implementation details followed (numbers as in Huang et al. 2024, "The N+ Implementation Details
of RLHF with PPO: A Case Study on TL;DR Summarization", and the ICLR 2024 blog post "The N
Implementation Details of RLHF with PPO"; OpenAI's lm-human-preferences is the reference code):

1. **Reward normalisation** (Ziegler et al. 2019 §2.2): before training, a gain and a bias are
   fitted so the scores of the INITIAL policy's samples (``reward_norm_batches`` rollout
   batches) have mean 0 and standard deviation 1: ``s' = g·s + b`` with ``g = 1/σ``,
   ``b = −μ/σ``. They are fixed for the run and saved in every checkpoint.
2. **KL penalty per token, score at EOS** (Ziegler et al. 2019 Eq. 2; Ouyang et al. 2022 Eq. 2):
   ``R_t = −β·kl_t`` on every response token plus the score on the last one
   (``rl.compute_rewards``; estimator ``k1`` by default).
3. **EOS truncation and missing-EOS penalty**: a response ends at its first EOS (kept, scored;
   later tokens masked, ``generation.generate``). A response with no EOS within
   ``max_new_tokens`` gets ``missing_eos_penalty`` subtracted from its score (TRL's former
   ``PPOTrainer``) or its score replaced by ``−missing_eos_penalty`` (lm-human-preferences'
   ``penalty_reward_value``; ``missing_eos_mode="replace"``).
4. **Temperature-scaled log-probs**: rollouts sample at temperature τ with top-k 0 and top-p 1;
   the log-probs of the sampled tokens are RECOMPUTED with a forward pass, ``log softmax(z/τ)``,
   for the policy (old and new) and the reference alike; ``generate``'s scores are not used.
5. **Reward whitening** (optional, ``whiten_rewards``): shaped rewards rescaled to unit variance
   over the batch, mean kept (TRL's ``whiten_rewards``).
6. **Advantage whitening** over the batch (``whiten_advantages``, on by default).
7. **Value model initialised from the reward model** (a trainable copy; a
   ``*ForSequenceClassification`` with ``num_labels=1`` whose per-token head output is V(s_t),
   ``models.token_scores``). Without a reward model: the policy's backbone with a new head.
8. **Value clipping** (PPO2): ``½·max((V−R)², (V_clip−R)²)``, ``clip_range_value``.
9. **Adaptive KL controller** (Ziegler et al. 2019 §2.2) or a fixed β (``kl_control``).
10. **Dropout off** in the policy, reference, reward and value models (module ``p`` and config
    probabilities set to 0), so the old log-probs of the rollout and the new log-probs of the
    first PPO epoch agree exactly (ratio 1). Rollouts, scoring and evaluation run in
    ``eval()`` mode; the optimisation passes call ``train()``, which changes nothing once
    dropout is 0 but keeps train-mode-only machinery (e.g. gradient checkpointing) working.
11. **Minibatches × epochs with gradient accumulation**: each update's rollout batch is
    shuffled and split ``ppo_epochs`` times; an optimizer step sees
    ``mini_batch_size × gradient_accumulation_steps`` responses (``Accelerator.accumulate``).
12. **Left-padded queries with position ids from the attention mask**, so a prompt's log-probs
    and values do not depend on its padding (``logprobs.causal_lm_logits``).
13. **GAE with γ = 1, λ = 0.95**, value targets = λ-returns (Schulman et al. 2016).
14. **Adam ε = 1e-5** (lm-human-preferences' value, Huang et al. 2024) and a learning-rate
    schedule stepped once per update.
15. **Checkpoint and resume with Accelerate**: ``save_state``/``load_state`` hold the policy and
    value weights, optimizer, scheduler and RNG states (python, numpy, torch); a small JSON
    holds the update counter, the KL controller and the reward-normalisation statistics. Prompt
    batches are a pure function of ``(seed, update)``, so a resumed run ends with exactly the
    weights of an uninterrupted one.

Evaluation (every ``eval_steps`` updates and at the end) samples one response per held-out
prompt at the rollout temperature from a fixed seed (``eval_do_sample=True``, so evaluations at
different steps see the same random numbers and do not touch the training RNG) or greedily, and
reports the normalised score, the KL to the reference (k1, summed over response tokens) and the
monitor (gold) reward.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_scheduler

from rlhf_core import metrics as M
from rlhf_core.data.tokenize import TruncationConfig, tokenize_prompts
from rlhf_core.generation import generate
from rlhf_core.logprobs import causal_lm_logits, entropy_from_logits, masked_token_logprobs
from rlhf_core.models.scalar_head import sequence_scores, token_scores
from rlhf_core.reward_sources import CombinedReward, RewardFn
from rlhf_core.rl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    KLController,
    compute_gae,
    compute_rewards,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)
from rlhf_core.trainers.common import LogFn, resolve_precision

SamplesFn = Callable[[list[dict[str, Any]], int], None]
STATE_FILE = "ppo_state.json"
"""Our own state in a checkpoint folder, written last: a folder without it is incomplete."""
_PROMPT_TEXT = "_prompt_text"  # the prompt string, carried through tokenisation for reward functions


@dataclass
class PPOConfig:
    """PPO settings (the ``ppo`` group of ``params.yaml``). Symbols as in the module docstring.

    Defaults are those of the embedded default (a tiny model on the synthetic task, where they raise
    the gold reward in 20 updates; see ``tests/test_ppo.py``) and of TRL/Huang et al. otherwise.
    """

    output_dir: str = "outputs/ppo"
    """Checkpoints go to ``checkpoint-<update>/``; the final model is saved by the caller."""
    seed: int = 0
    """Seeds python, numpy and torch at the start, the prompt order and the evaluation samples."""
    max_updates: int = 100
    """PPO updates (one rollout batch + ``ppo_epochs`` epochs of optimisation each)."""
    rollout_batch_size: int = 64
    """Prompts (one response each) per update and process."""
    mini_batch_size: int = 16
    """Responses per forward/backward pass during optimisation."""
    gradient_accumulation_steps: int = 1
    """Passes per optimizer step: a step sees ``mini_batch_size × gradient_accumulation_steps`` responses."""
    ppo_epochs: int = 4
    """K: passes over each rollout batch."""
    forward_batch_size: int = 64
    """Rows per no-grad forward pass and per ``generate`` call (rollouts, scoring, evaluation)."""
    learning_rate: float = 1e-4
    """Adam learning rate for policy and value model (one optimizer). 1e-4 suits the tiny embedded-default
    model; pretrained models of 100M+ parameters usually want 1e-6 to 1e-5."""
    lr_scheduler_type: str = "constant"
    """``transformers.get_scheduler`` name; stepped once per update over ``max_updates``."""
    warmup_ratio: float = 0.0
    """Share of ``max_updates`` with linear warm-up."""
    weight_decay: float = 0.0
    adam_epsilon: float = 1e-5
    """Adam ε (detail 14)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm at each optimizer step; ``None``: no clipping."""
    max_length: int = 64
    """Prompt + response tokens; prompts are left-truncated to ``max_length − max_new_tokens``."""
    max_new_tokens: int = 16
    """Response budget; responses without EOS within it are penalised (``missing_eos_penalty``)."""
    temperature: float = 1.0
    """τ: sampling temperature of rollouts, also dividing the logits of every log-prob (detail 4)."""
    missing_eos_penalty: float | None = None
    """Penalty for a response without EOS (detail 3); ``None``: no penalty."""
    missing_eos_mode: Literal["subtract", "replace"] = "subtract"
    """``subtract``: ``s − penalty`` (TRL); ``replace``: ``s = −penalty`` (lm-human-preferences)."""
    normalize_reward: bool = True
    """Fit gain/bias on the initial policy's samples so their scores have mean 0, std 1 (detail 1)."""
    reward_norm_batches: int = 2
    """Rollout batches of the initial policy used to fit the gain and bias."""
    reward_model_weight: float = 1.0
    """w_RM: weight of the reward model's score in ``s = w_RM·r_φ + w_fn·f`` (ignored without a reward model)."""
    reward_fn_weight: float = 1.0
    """w_fn: weight of the Python reward function (ignored without one)."""
    whiten_rewards: bool = False
    """Rescale the shaped rewards to unit variance per batch, mean kept (detail 5)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, std 1 per batch (detail 6)."""
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    """β fixed at ``kl_coef`` or adapted toward ``kl_target`` (detail 9)."""
    kl_coef: float = 0.05
    """β (initial β when adaptive): weight of the per-token KL penalty."""
    kl_target: float = 6.0
    """KL_target in nats per response for the adaptive controller."""
    kl_horizon: int = 10_000
    """H in samples for the adaptive controller."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward: ``k1``, ``k2`` or ``k3`` (``rl.kl_penalty``)."""
    gamma: float = 1.0
    """γ: discount."""
    lam: float = 0.95
    """λ: GAE parameter."""
    clip_range: float = 0.2
    """ε: policy ratio clip."""
    clip_range_value: float = 0.2
    """ε_v: value clip around the rollout values (detail 8)."""
    vf_coef: float = 0.1
    """c_1: weight of the value loss in ``L = L_policy + c_1·L_value``."""
    logging_steps: int = 1
    """Call ``log_fn`` with ``train/...`` metrics every this many updates."""
    eval_steps: int = 20
    """Evaluate on the held-out prompts every this many updates (and after the last update)."""
    eval_on_start: bool = False
    """Also evaluate the initial policy (update 0) on a fresh run."""
    eval_do_sample: bool = True
    """Evaluation samples at ``temperature`` from a fixed seed; ``False``: greedy decoding."""
    n_eval_samples: int = 4
    """Decoded samples (prompt, response, score, KL, gold) of the first held-out prompts, the same prompts at
    every evaluation, kept in the result and passed to ``samples_fn``."""
    save_steps: int = 20
    """Checkpoint every this many updates (and after the last update)."""
    save_total_limit: int | None = 2
    """Keep at most this many checkpoints (oldest deleted); ``None`` keeps all."""
    resume: bool = True
    """Resume from the latest complete checkpoint in ``output_dir`` when there is one."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """``auto``: bf16 on a GPU that supports it, else fp32."""
    progress: bool = True
    """Show a progress bar over updates."""

    def __post_init__(self) -> None:
        positive = ("max_updates", "rollout_batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                    "forward_batch_size", "learning_rate", "adam_epsilon", "max_length", "max_new_tokens", "temperature",
                    "reward_norm_batches", "kl_target", "kl_horizon", "clip_range", "clip_range_value", "logging_steps",
                    "eval_steps", "save_steps")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        step_rows = self.mini_batch_size * self.gradient_accumulation_steps
        if self.rollout_batch_size % step_rows:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be divisible by mini_batch_size × "
                f"gradient_accumulation_steps ({self.mini_batch_size} × {self.gradient_accumulation_steps} = {step_rows})"
            )
        if self.max_new_tokens >= self.max_length:
            raise ValueError(
                f"max_new_tokens ({self.max_new_tokens}) must be < max_length ({self.max_length}) to leave room for a prompt")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={self.gamma}, lam={self.lam}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator {self.kl_estimator!r} is not one of {sorted(KL_ESTIMATORS)}")
        if self.kl_coef < 0 or (self.kl_control == "adaptive" and self.kl_coef == 0):
            raise ValueError(
                f"kl_coef must be >= 0 (> 0 with kl_control='adaptive'), got {self.kl_coef} with kl_control={self.kl_control!r}")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(f"missing_eos_penalty must be a finite number or None, got {self.missing_eos_penalty}")
        if self.missing_eos_mode not in ("subtract", "replace"):
            raise ValueError(f"missing_eos_mode must be 'subtract' or 'replace', got {self.missing_eos_mode!r}")
        if not (math.isfinite(self.reward_model_weight) and math.isfinite(self.reward_fn_weight)):
            raise ValueError(f"reward weights must be finite, got reward_model_weight={self.reward_model_weight}, "
                             f"reward_fn_weight={self.reward_fn_weight}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit must be >= 1 or None, got {self.save_total_limit}")
        if self.n_eval_samples < 0:
            raise ValueError(f"n_eval_samples must be >= 0, got {self.n_eval_samples}")


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


# --------------------------------------------------------------------------------------------
# Models


class PolicyAndValue(nn.Module):
    """The two trained models under one module, so Accelerate (DDP) wraps a single forward."""

    def __init__(self, policy: PreTrainedModel, value: PreTrainedModel) -> None:
        super().__init__()
        self.policy = policy
        self.value = value

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T) ids and mask -> policy logits (B, T, V) and values (B, T)."""
        return causal_lm_logits(self.policy, input_ids, attention_mask), token_scores(self.value, input_ids, attention_mask)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability of ``model`` to 0 (detail 10), in place.

    Covers ``nn.Dropout`` modules (GPT-2's ``resid/embd/attn_pdrop``), float attributes read
    at forward time (Llama's ``attention_dropout``) and the config, so a saved model reloads
    without dropout too.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for name, value in config.to_dict().items():
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
                setattr(config, name, 0.0)
    return model


def value_model_from_policy(policy: PreTrainedModel, pad_token_id: int, seed: int = 0) -> PreTrainedModel:
    """A ``*ForSequenceClassification`` (``num_labels=1``) with the policy's backbone and a new head.

    Used when there is no reward model to copy. The head is drawn from ``seed`` without
    touching the caller's RNG.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        value = AutoModelForSequenceClassification.from_config(config)
    missing, unexpected = value.load_state_dict(policy.state_dict(), strict=False)
    if any(not k.startswith("score.") for k in missing) or any(not k.startswith("lm_head.") for k in unexpected):
        raise ValueError(
            f"cannot build a value model from {type(policy).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "pass value_model= (an AutoModelForSequenceClassification with num_labels=1)"
        )
    weight = next(policy.parameters())
    return value.to(device=weight.device, dtype=weight.dtype)


# --------------------------------------------------------------------------------------------
# Rollouts


@dataclass
class Rollout:
    """One batch of B sampled responses and everything PPO needs about them. R = response width."""

    query_response: Tensor
    """(B, Q + R) prompt ids (left-padded) followed by response ids."""
    attention_mask: Tensor
    """(B, Q + R) 1 on real prompt and response tokens."""
    n_query: int
    """Q: responses start at this column."""
    mask: Tensor
    """(B, R) bool, response tokens up to and including the first EOS."""
    has_eos: Tensor
    """(B,) bool."""
    prompts: list[str]
    texts: list[str]
    logprobs: Tensor
    """(B, R) log π_old(y_t) at temperature τ, 0 on padding."""
    ref_logprobs: Tensor
    """(B, R) log π_ref(y_t) at temperature τ."""
    values: Tensor
    """(B, R) V(s_t): value of the prefix before response token t."""
    entropy: Tensor
    """(B,) Σ_t H(π_old(·|s_t)) over response tokens."""
    raw_scores: Tensor
    """(B,) combined reward before normalisation and penalty."""
    scores: Tensor
    """(B,) normalised, penalised score: the reward at the last response token."""

    @property
    def completion_mask(self) -> Tensor:
        """(B, Q + R) 1 on response tokens, in ``query_response`` coordinates."""
        return torch.cat([torch.zeros_like(self.query_response[:, : self.n_query]), self.mask.long()], dim=1)


def response_logits(logits: Tensor, n_query: int) -> Tensor:
    """(B, Q + R, V) -> (B, R, V): the logits that predict the response tokens (position t−1 predicts t)."""
    return logits[:, n_query - 1 : -1]


def response_logprobs(logits: Tensor, query_response: Tensor, completion_mask: Tensor, n_query: int, temperature: float) -> Tensor:
    """(B, R) ``log softmax(z/τ)`` of the sampled response tokens, 0 outside the response mask."""
    per_token = masked_token_logprobs(logits, query_response, completion_mask, temperature)  # (B, Q+R-1)
    return per_token[:, n_query - 1 :]  # column j scores token j+1: response tokens start at Q


@dataclass
class RewardNorm:
    """Gain and bias of detail 1: ``s' = gain·s + bias``."""

    gain: float = 1.0
    bias: float = 0.0
    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def fit(cls, raw: list[float]) -> RewardNorm:
        """Mean 0, std 1 on ``raw``; a (near-)constant ``raw`` keeps gain 1 and only centres."""
        values = torch.tensor(raw, dtype=torch.float64)
        mean, std = float(values.mean()), float(values.std(unbiased=False))
        gain = 1.0 / std if std > 1e-6 else 1.0
        return cls(gain=gain, bias=-mean * gain, mean=mean, std=std)

    def __call__(self, raw: Tensor) -> Tensor:
        return raw * self.gain + self.bias


# --------------------------------------------------------------------------------------------
# The trainer


class PPOTrainer:
    """The loop; build it through :func:`train_ppo`."""

    def __init__(self, cfg: PPOConfig, accelerator: Accelerator, model: nn.Module, optimizer: Any, scheduler: Any,
                 ref_policy: PreTrainedModel, reward_model: PreTrainedModel | None, reward: CombinedReward,
                 tokenizer: PreTrainedTokenizerBase, train: datasets.Dataset, evaluation: datasets.Dataset,
                 monitor_fn: RewardFn | None, log_fn: LogFn | None, samples_fn: SamplesFn | None) -> None:
        self.cfg, self.accelerator, self.model = cfg, accelerator, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.ref_policy, self.reward_model, self.reward = ref_policy, reward_model, reward
        self.tokenizer, self.train_prompts, self.eval_prompts = tokenizer, train, evaluation
        self.monitor_fn, self.log_fn, self.samples_fn = monitor_fn, log_fn, samples_fn
        self.kl_ctl: KLController = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_control == "adaptive"
            else FixedKLController(cfg.kl_coef)
        )
        self.reward_norm = RewardNorm()
        self.update = 0
        self.samples: list[dict[str, Any]] = []
        self.eval_metrics: dict[str, float] = {}

    # --- models -------------------------------------------------------------------------

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    # --- prompts ------------------------------------------------------------------------

    def prompt_batch(self, update: int) -> list[int]:
        """Row indices of this process's prompts for ``update`` (0-based): a pure function of (seed, update).

        Epoch e is the permutation drawn from ``seed + e``; batches do not straddle epochs (the
        last partial batch is dropped), so resuming needs only the update counter.
        """
        n, size = len(self.train_prompts), self.cfg.rollout_batch_size
        per_epoch = n // size
        epoch, k = divmod(update, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))  # (n,)
        return order[k * size : (k + 1) * size].tolist()

    # --- rollouts -----------------------------------------------------------------------

    @torch.no_grad()
    def score(self, prompts: list[str], texts: list[str], query_response: Tensor, attention_mask: Tensor,
              has_eos: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) raw combined reward and (B,) normalised + penalised score (details 1 and 3)."""
        rm_scores = None
        if self.reward.uses_reward_model:
            rm_scores = torch.cat([
                sequence_scores(self.reward_model, query_response[i : i + self.cfg.forward_batch_size],
                                attention_mask[i : i + self.cfg.forward_batch_size]).float()
                for i in range(0, len(prompts), self.cfg.forward_batch_size)
            ]).tolist()
        raw = torch.tensor(self.reward(prompts, texts, rm_scores), dtype=torch.float32,
                           device=query_response.device)  # (B,)
        scores = self.reward_norm(raw) if self.cfg.normalize_reward else raw.clone()
        penalty = self.cfg.missing_eos_penalty
        if penalty is not None:
            penalised = scores - penalty if self.cfg.missing_eos_mode == "subtract" else torch.full_like(scores, -penalty)
            scores = torch.where(has_eos, scores, penalised)
        return raw, scores

    @torch.no_grad()
    def rollout(self, rows: list[int], dataset: datasets.Dataset | None = None, *, seed: int | None = None,
                do_sample: bool = True) -> Rollout:
        """Sample one response per prompt row, then score it with every model (no gradients)."""
        cfg, ds = self.cfg, dataset if dataset is not None else self.train_prompts
        unwrapped = self.unwrapped.eval()
        batch = ds.select(rows)
        started = time.perf_counter()
        out = generate(unwrapped.policy, self.tokenizer, [list(p) for p in batch["prompt_input_ids"]],
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=0, top_p=1.0,
                       do_sample=do_sample, batch_size=cfg.forward_batch_size, seed=seed)
        generated = time.perf_counter()
        query_response = torch.cat([out.query_ids, out.response_ids], dim=1)  # (B, Q+R)
        attention_mask = torch.cat([out.query_mask, out.response_mask], dim=1)  # (B, Q+R)
        n_query = out.query_ids.shape[1]
        completion_mask = torch.cat([torch.zeros_like(out.query_mask), out.response_mask], dim=1)  # (B, Q+R)
        mask = out.response_mask.bool()  # (B, R)
        parts: dict[str, list[Tensor]] = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
        for i in range(0, len(rows), cfg.forward_batch_size):
            sl = slice(i, i + cfg.forward_batch_size)
            ids, attn, comp = query_response[sl], attention_mask[sl], completion_mask[sl]
            logits, values = unwrapped(ids, attn)  # (b, Q+R, V), (b, Q+R)
            parts["logprobs"].append(response_logprobs(logits, ids, comp, n_query, cfg.temperature))  # (b, R)
            parts["values"].append(values[:, n_query - 1 : -1].float())  # (b, R): V of the prefix before token t
            entropy = entropy_from_logits(response_logits(logits, n_query) / cfg.temperature)  # (b, R)
            parts["entropy"].append(torch.where(mask[sl], entropy, 0.0).sum(dim=1))  # (b,)
            ref_logits = causal_lm_logits(self.ref_policy, ids, attn)  # (b, Q+R, V)
            parts["ref_logprobs"].append(response_logprobs(ref_logits, ids, comp, n_query, cfg.temperature))  # (b, R)
        prompts = list(batch[_PROMPT_TEXT])
        raw, scores = self.score(prompts, out.texts, query_response, attention_mask, out.has_eos)
        # Wall time of the phases of a PPO step (bench/ppo_step.py reads them from the logs).
        self.timing = {"generation": generated - started, "scoring": time.perf_counter() - generated,
                       "generated_tokens": float(out.response_mask.sum())}
        cat = {name: torch.cat(chunks) for name, chunks in parts.items()}
        return Rollout(query_response, attention_mask, n_query, mask, out.has_eos, prompts, out.texts,
                       cat["logprobs"].float(), cat["ref_logprobs"].float(), cat["values"], cat["entropy"].float(),
                       raw, scores)

    def fit_reward_norm(self) -> None:
        """Detail 1: gain and bias from ``reward_norm_batches`` rollouts of the initial policy."""
        raw: list[float] = []
        for k in range(self.cfg.reward_norm_batches):
            raw += self.rollout(self.prompt_batch(k)).raw_scores.tolist()
        self.reward_norm = RewardNorm.fit(gather_object(raw))

    # --- one update ---------------------------------------------------------------------

    def advantages(self, ro: Rollout) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Details 2, 5, 13, 6: shaped rewards, GAE, whitening. Returns (rewards, kl, advantages, returns), each (B, R)."""
        rewards, kl = compute_rewards(ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, self.kl_ctl.value,
                                      self.cfg.kl_estimator)  # (B, R) each
        if self.cfg.whiten_rewards:
            rewards = masked_whiten(rewards, ro.mask, shift_mean=False)
        advantages, returns = compute_gae(rewards, ro.values, ro.mask, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = masked_whiten(advantages, ro.mask)
        return rewards, kl, advantages, returns

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
                    vpred = values[:, ro.n_query - 1 : -1].float()  # (b, R)
                    pg_loss, pg_stats = ppo_policy_loss(new_logprobs.float(), ro.logprobs[idx], advantages[idx], mask, cfg.clip_range)
                    vf_loss, vf_stats = ppo_value_loss(vpred, ro.values[idx], returns[idx], mask, cfg.clip_range_value)
                    acc.backward(pg_loss + cfg.vf_coef * vf_loss)
                    if acc.sync_gradients and cfg.max_grad_norm is not None:
                        grad_norms.append(acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
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
        ro = self.rollout(self.prompt_batch(self.update))
        _, kl, advantages, returns = self.advantages(ro)
        beta = self.kl_ctl.value
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
        names = list(per_batch)
        device = self.accelerator.device
        values = torch.stack([torch.as_tensor(per_batch[n], dtype=torch.float32, device=device) for n in names])  # (n,)
        values = self.accelerator.reduce(values, reduction="mean").tolist()
        metrics = {M.key(M.TRAIN, n): v for n, v in zip(names, values)}
        metrics.update({M.key("timing", name): value for name, value in timing.items()})
        metrics[M.key(M.TRAIN, M.KL_COEF)] = beta
        metrics[M.key(M.TRAIN, M.LEARNING_RATE)] = lr
        self.kl_ctl.update(metrics[M.key(M.TRAIN, M.OBJECTIVE_KL)], n_steps=len(ro.prompts) * self.accelerator.num_processes)
        return metrics

    # --- evaluation ---------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Score one response per held-out prompt; log ``eval/...`` metrics and a few samples."""
        cfg = self.cfg
        rows_all: list[dict[str, Any]] = []
        for start in range(0, len(self.eval_prompts), cfg.forward_batch_size):
            rows = list(range(start, min(start + cfg.forward_batch_size, len(self.eval_prompts))))
            ro = self.rollout(rows, self.eval_prompts, seed=cfg.seed + start, do_sample=cfg.eval_do_sample)
            kl = torch.where(ro.mask, ro.logprobs - ro.ref_logprobs, 0.0).sum(dim=1)  # (B,) k1 KL per response
            gold = self.monitor_fn(ro.prompts, ro.texts) if self.monitor_fn is not None else None
            for i, (prompt, text) in enumerate(zip(ro.prompts, ro.texts)):
                row = {"step": self.update, "prompt": prompt, "response": text, "score": float(ro.scores[i]),
                       "raw_score": float(ro.raw_scores[i]), "kl": float(kl[i]), "length": int(ro.mask[i].sum()),
                       "has_eos": bool(ro.has_eos[i])}
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
            metrics[M.key(M.EVAL, M.OBJECTIVE_SCORES)] - self.kl_ctl.value * metrics[M.key(M.EVAL, M.OBJECTIVE_KL)])
        if self.monitor_fn is not None:
            metrics[M.key(M.EVAL, M.OBJECTIVE_GOLD)] = sum(r["gold_reward"] for r in rows_all) / n
        samples = rows_all[: cfg.n_eval_samples]
        self.samples += samples
        self.eval_metrics = metrics
        if self.accelerator.is_main_process:
            if self.log_fn is not None:
                self.log_fn(metrics, self.update)
            if self.samples_fn is not None and samples:
                self.samples_fn(samples, self.update)
        return metrics

    # --- checkpoints --------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"update": self.update, "kl_controller": self.kl_ctl.state_dict(), "reward_norm": asdict(self.reward_norm),
                "config": asdict(self.cfg)}

    def save(self) -> Path:
        """``checkpoint-<update>/``: Accelerate's state, then our JSON; renamed into place when complete."""
        final = Path(self.cfg.output_dir) / f"checkpoint-{self.update}"
        partial = final.with_name(final.name + ".partial")
        self.accelerator.save_state(str(partial))
        self.accelerator.wait_for_everyone()  # every process's RNG file is in before the rename
        if self.accelerator.is_main_process:
            (partial / STATE_FILE).write_text(json.dumps(self.state(), indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            self._prune()
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        limit = self.cfg.save_total_limit
        if limit is None:
            return
        for old in complete_checkpoints(self.cfg.output_dir)[:-limit]:
            shutil.rmtree(old)

    def load(self, checkpoint: Path) -> None:
        """Restore weights, optimizer, scheduler and RNG (Accelerate), then our JSON state."""
        self.accelerator.load_state(str(checkpoint))
        state = json.loads((checkpoint / STATE_FILE).read_text())
        self.update = int(state["update"])
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.reward_norm = RewardNorm(**state["reward_norm"])

    # --- the loop -----------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        checkpoint = complete_checkpoints(cfg.output_dir)[-1:] if cfg.resume else []
        if checkpoint:
            self.load(checkpoint[0])
            print(f"[rlhf] resuming PPO from {checkpoint[0]} (update {self.update})")
        else:
            if cfg.normalize_reward:
                self.fit_reward_norm()
            if cfg.eval_on_start:
                self.evaluate()
        show = cfg.progress and self.accelerator.is_main_process
        bar = tqdm(total=cfg.max_updates, initial=self.update, desc="ppo", disable=not show)
        evaluated_at = -1
        while self.update < cfg.max_updates:
            metrics = self.step()
            self.update += 1
            bar.update(1)
            if self.log_fn is not None and self.accelerator.is_main_process and self.update % cfg.logging_steps == 0:
                self.log_fn(metrics, self.update)
            if self.update % cfg.eval_steps == 0 or self.update == cfg.max_updates:
                self.evaluate()
                evaluated_at = self.update
            if self.update % cfg.save_steps == 0 or self.update == cfg.max_updates:
                self.save()
        bar.close()
        if evaluated_at != self.update:  # resumed at the end: evaluate the final policy once
            self.evaluate()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """``checkpoint-<update>`` folders holding our state file, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


# --------------------------------------------------------------------------------------------
# Entry point


def _tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: PPOConfig, what: str) -> datasets.Dataset:
    """Prompt records (``prompt``, ``prompt_messages``) -> ``prompt_input_ids`` + the prompt text."""
    if "prompt" not in ds.column_names:
        raise ValueError(f"{what}: dataset lacks a 'prompt' column (found {ds.column_names}); normalise it first")
    ds = ds.select_columns([c for c in ("prompt", "prompt_messages") if c in ds.column_names])
    ds = ds.add_column(_PROMPT_TEXT, list(ds["prompt"]))
    trunc = TruncationConfig(max_length=cfg.max_length, max_prompt_length=cfg.max_length - cfg.max_new_tokens)
    tokenized, _ = tokenize_prompts(ds, tokenizer, trunc)
    return tokenized


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
        cfg: :class:`PPOConfig`.
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
    train_tok = _tokenize(train_prompts, tokenizer, cfg, "train_prompts")
    eval_tok = _tokenize(eval_prompts, tokenizer, cfg, "eval_prompts")

    set_seed(cfg.seed)
    precision = resolve_precision(cfg.precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision="bf16" if precision["bf16"] else "fp16" if precision["fp16"] else "no",
        step_scheduler_with_optimizer=False,  # stepped once per update, not per optimizer step
    )
    train_tok = train_tok.shard(accelerator.num_processes, accelerator.process_index, contiguous=False)
    eval_tok = eval_tok.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    if len(train_tok) < cfg.rollout_batch_size:
        raise ValueError(f"train_prompts: {len(train_tok)} prompts per process after tokenisation, fewer than "
                         f"rollout_batch_size={cfg.rollout_batch_size}")
    if len(eval_tok) == 0:
        raise ValueError("eval_prompts: no prompt left after tokenisation")

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

    trainer = PPOTrainer(cfg, accelerator, model, optimizer, scheduler, ref_policy, reward_model, reward, tokenizer,
                         train_tok, eval_tok, monitor_fn, log_fn, samples_fn)
    trainer.train()
    unwrapped = trainer.unwrapped.eval()
    return PPOResult(policy=unwrapped.policy, value_model=unwrapped.value, metrics=trainer.eval_metrics,
                     samples=trainer.samples, reward_norm=asdict(trainer.reward_norm), updates=trainer.update)
