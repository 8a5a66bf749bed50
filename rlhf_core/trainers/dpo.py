"""Direct Preference Optimization (Rafailov et al. 2023) and its offline kin on transformers' ``Trainer``.

``method`` picks the objective (``rlhf_core.trainers.offline_methods``): ``dpo`` (default),
``simpo`` and ``orpo`` (no reference model), ``kto`` (pairs split into desirable and undesirable
examples). The reference policy is the starting model. By default its log-probs are computed once before
training (``reference="precomputed"``: no second model in memory, as TRL's
``precompute_ref_log_probs``); ``reference="live"`` keeps a frozen copy (or, with LoRA, the
base model with adapters disabled) and scores each batch. Precomputed, only the training rows the Trainer's
sampler will read in ``max_steps`` steps are scored (batched as it reads them; the rest stay NaN, and a NaN
reaching the loss raises), and the whole eval set.
Log-probs are sums over completion tokens; completion-token means for ``ipo`` (as TRL).
"""

from __future__ import annotations

import copy
import itertools
import math
from contextlib import nullcontext
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core import metrics as M
from rlhf_core.compute_clock import computing
from rlhf_core.data.collate import PreferenceCollator
from rlhf_core.data.packing import PackedGroup, PackedPreferenceCollator
from rlhf_core.data.tokenize import TruncationConfig, tokenize_preference
from rlhf_core.logprobs import (
    packed_scored_token_counts,
    packed_sequence_logprobs,
    scored_token_counts,
    sequence_logprobs,
)
from rlhf_core.losses import dpo_loss
from rlhf_core.reward_sources import RewardFn
from rlhf_core.trainers.common import (
    LogFn,
    LogFnCallback,
    StoredMetricsTrainer,
    WithScalarFields,
    run_training,
    train_batches_read,
    training_arguments,
)
from rlhf_core.trainers.curve_probe import CurveProbe, distinct_prompt_records
from rlhf_core.trainers.lora_wrap import maybe_apply_lora
from rlhf_core.trainers.offline_methods import (
    NEEDS_REFERENCE,
    PairLogps,
    kto_terms,
    orpo_terms,
    simpo_terms,
    with_mismatched_completions,
)
from rlhf_core.trainers.padding_free import padding_free_is_exact
from rlhf_core.trainers.sft import TrainResult
from rlhf_core.trainers.train_config import DPOConfig

REF_FIELDS = ["ref_chosen_logps", "ref_rejected_logps"]
KL_REF_FIELD = "ref_kl_logps"
LENGTH_NORMALISED = {"ipo"}  # loss types fed completion-token MEAN log-probs (Azar et al. 2023)


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Completion log-probs of chosen and rejected in one forward pass: (B,), (B,). The batch is padded or packed."""
    packed = PackedGroup.from_batch(batch, "pairs")
    if packed is not None:  # sequences 0..B-1 chosen, B..2B-1 rejected
        return packed_sequence_logprobs(model, packed.input_ids, packed.position_ids, packed.completion_mask,
                                        packed.sequence_ids, packed.n_sequences, average=average).chunk(2)
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])  # (2B, T)
    completion_mask = torch.cat([batch["chosen_completion_mask"], batch["rejected_completion_mask"]])  # (2B, T)
    logps = sequence_logprobs(model, input_ids, attention_mask, completion_mask, average=average)  # (2B,)
    return logps.chunk(2)


def pair_token_counts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored completion tokens of chosen and rejected (``pair_logps(average=True)``'s divisors): (B,), (B,)."""
    packed = PackedGroup.from_batch(batch, "pairs")
    if packed is not None:
        return packed_scored_token_counts(packed.completion_mask, packed.position_ids, packed.sequence_ids,
                                          packed.n_sequences).chunk(2)
    chosen, rejected = (scored_token_counts(batch[f"{side}_completion_mask"], batch[f"{side}_attention_mask"])
                        for side in ("chosen", "rejected"))
    return chosen, rejected


def kl_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed completion log-probs of KTO's mismatched pairs (``kl_*`` or packed group ``kl``): (B,)."""
    packed = PackedGroup.from_batch(batch, "kl")
    if packed is not None:
        return packed_sequence_logprobs(model, packed.input_ids, packed.position_ids, packed.completion_mask,
                                        packed.sequence_ids, packed.n_sequences)
    return sequence_logprobs(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_completion_mask"])


@torch.no_grad()
def precompute_reference_logps(
    model: torch.nn.Module, tokenized: datasets.Dataset, pad_token_id: int, *, average: bool, batch_size: int,
    desc: str = "reference log-probs", padding_free: bool = False, batches: list[list[int]] | None = None,
) -> datasets.Dataset:
    """Adds ``ref_chosen_logps``/``ref_rejected_logps`` (and, for KTO, ``ref_kl_logps``) scored by the (frozen) reference.

    ``padding_free``: score packed batches (only for a model that keeps packed sequences apart).
    ``batches``: score only these rows, batched so (a row of several batches in its first), NaN for the others;
    ``None``: every row, in order, ``batch_size`` at a time. A row's log-prob can differ in the last bits with the
    batch it is scored in (its padding, its packing): batched as the Trainer reads them, the reference values are
    what a frozen copy of the model computes on the training batch (``reference="live"``).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collator = (PackedPreferenceCollator if padding_free else PreferenceCollator)(pad_token_id)
    plan = [list(range(i, min(i + batch_size, len(tokenized)))) for i in range(0, len(tokenized), batch_size)]
    if batches is not None:
        seen: set[int] = set()
        plan = []
        for read in batches:
            fresh = [i for i in dict.fromkeys(read) if i not in seen]  # unique, in order, not scored yet
            seen.update(fresh)
            plan += [fresh] if fresh else []
    fields = REF_FIELDS + ([KL_REF_FIELD] if "kl_input_ids" in tokenized.column_names else [])  # KTO's mismatched pairs
    values = {name: [math.nan] * len(tokenized) for name in fields}
    # Its own generator: iterating draws a base seed, and this may run after the Trainer seeded the global RNG.
    loader = DataLoader(tokenized, batch_sampler=plan, collate_fn=collator, generator=torch.Generator())
    with computing():  # a scoring loop: the reference's forward passes the trainer would otherwise make
        for rows, batch in zip(plan, tqdm(loader, desc=desc, leave=False)):
            batch = {k: v.to(device) for k, v in batch.items()}
            scored = [*pair_logps(model, batch, average=average)] + ([kl_logps(model, batch)] if len(fields) > 2 else [])
            for name, logps in zip(fields, scored):
                for i, value in zip(rows, logps.float().cpu().tolist()):
                    values[name][i] = value
    model.train(was_training)
    for name in fields:
        tokenized = tokenized.add_column(name, values[name])
    return tokenized


def precomputed(batch: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``batch[name]``, a precomputed reference log-prob per row: (B,). Raises on a row that was not scored."""
    values = batch[name]
    if torch.isnan(values).any():
        raise RuntimeError(f"{name}: a row without a precomputed reference log-prob reached the loss; only the rows "
                           "the Trainer was to read were scored (rlhf_core.trainers.common.train_batches_read)")
    return values


class DPOTrainer(StoredMetricsTrainer):
    dpo: DPOConfig
    ref_model: torch.nn.Module | None = None  # only for reference="live"
    curve_probe: CurveProbe | None = None  # the over-optimisation curve's point at each evaluation

    def _reference_logps(self, batch: dict[str, torch.Tensor], average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dpo.reference == "precomputed":
            return precomputed(batch, REF_FIELDS[0]), precomputed(batch, REF_FIELDS[1])
        with torch.no_grad():
            if self.ref_model is not None:
                return pair_logps(self.ref_model, batch, average=average)
            with self.accelerator.unwrap_model(self.model).disable_adapter():  # LoRA: base model = reference
                return pair_logps(self.model, batch, average=average)

    def _batch_terms(self, model, batch):
        if self.dpo.method != "dpo":
            return self._method_terms(model, batch)
        average = self.dpo.loss_type in LENGTH_NORMALISED
        chosen, rejected = pair_logps(model, batch, average=average)
        ref_chosen, ref_rejected = self._reference_logps(batch, average)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen.to(chosen.dtype), ref_rejected.to(chosen.dtype),
            beta=self.dpo.beta, loss_type=self.dpo.loss_type, label_smoothing=self.dpo.label_smoothing,
        )
        if self.dpo.rpo_alpha > 0:
            # NLL per chosen completion token: sums back from the summed (or averaged) log-probs.
            n_tokens = pair_token_counts(batch)[0].to(chosen.dtype)  # (B,)
            nll = -(chosen if average else chosen / n_tokens)
            losses = losses + self.dpo.rpo_alpha * nll
        stats = {
            M.REWARDS_CHOSEN: chosen_rewards,
            M.REWARDS_REJECTED: rejected_rewards,
            M.REWARDS_ACCURACIES: (chosen_rewards > rejected_rewards).float(),
            M.REWARDS_MARGINS: chosen_rewards - rejected_rewards,
            M.LOGPS_CHOSEN: chosen.detach(),
            M.LOGPS_REJECTED: rejected.detach(),
        }
        return losses, stats

    def _kl_estimate(self, model, batch) -> torch.Tensor:
        """KTO's reference point: mean of log π_θ − log π_ref on the batch's mismatched pairs, over all processes."""
        with torch.no_grad():
            policy = kl_logps(model, batch)  # (B,)
            if self.dpo.reference == "precomputed":
                ref = precomputed(batch, KL_REF_FIELD).to(policy.dtype)
            elif self.ref_model is not None:
                ref = kl_logps(self.ref_model, batch)
            else:
                with self.accelerator.unwrap_model(self.model).disable_adapter():
                    ref = kl_logps(model, batch)
        return self.accelerator.gather(policy - ref).mean()

    def _method_terms(self, model, batch):
        """SimPO, ORPO or KTO from one forward pass over the pairs (summed log-probs and token counts)."""
        cfg = self.dpo
        chosen, rejected = pair_logps(model, batch, average=False)
        counts = pair_token_counts(batch)
        logps = PairLogps(chosen, rejected, counts[0].to(chosen.dtype), counts[1].to(chosen.dtype))
        if cfg.method == "simpo":
            losses, stats = simpo_terms(logps, beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing)
        elif cfg.method == "orpo":
            losses, stats = orpo_terms(logps, beta=cfg.beta)
        else:
            losses, stats = kto_terms(logps, self._reference_logps(batch, False), self._kl_estimate(model, batch),
                                      beta=cfg.beta, desirable_weight=cfg.kto_desirable_weight,
                                      undesirable_weight=cfg.kto_undesirable_weight)
        if cfg.rpo_alpha > 0 and cfg.method != "orpo":  # ORPO's NLL term is part of its loss
            nll = -(chosen / logps.chosen_tokens)  # (B,)
            losses = losses + cfg.rpo_alpha * (torch.cat([nll, nll]) if cfg.method == "kto" else nll)
        return losses, stats

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, stats = self._batch_terms(model, inputs)
        self.store_metrics(stats)
        loss = losses.mean()
        return (loss, stats) if return_outputs else loss

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        model = self.model.eval()
        collected: dict[str, list[torch.Tensor]] = {}
        for batch in self.eval_batches(eval_dataset):
            losses, stats = self._batch_terms(model, self._prepare_inputs(batch))
            for name, value in {M.LOSS: losses.detach(), **stats}.items():
                collected.setdefault(name, []).append(value.float().reshape(-1))  # scalars (nll_loss, kl) too
        means = {name: float(self.gather_across_processes(torch.cat(v)).mean()) for name, v in collected.items()}
        if self.curve_probe is not None:
            means.update(self.curve_probe(self.accelerator.unwrap_model(self.model)))
        return self.finish_evaluate(means, metric_key_prefix)


def train_dpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: datasets.Dataset,
    eval_data: datasets.Dataset,
    cfg: DPOConfig,
    log_fn: LogFn | None = None,
    ref_model: PreTrainedModel | None = None,
    callbacks: list | None = None,
    reward_model: PreTrainedModel | None = None,
    monitor_fn: RewardFn | None = None,
    **trainer_kwargs: Any,
) -> TrainResult:
    """DPO-train ``model`` on normalised preference records; the reference is ``ref_model`` or ``model`` as given.

    With a ``reward_model`` (and ``cfg.overopt_prompts`` > 0) every evaluation also samples the first
    ``overopt_prompts`` distinct prompts of ``eval_data`` and logs the over-optimisation curve's point
    (``eval/overopt/...``: reward-model score, ``monitor_fn``'s gold reward, KL to the starting policy).
    """
    if reward_model is not None and reward_model is model:
        raise ValueError("train_dpo: reward_model must be a separate model from the trained policy")
    trunc = TruncationConfig(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    train_tok, train_stats = tokenize_preference(train_data, tokenizer, trunc)
    eval_tok, eval_stats = tokenize_preference(eval_data, tokenizer, trunc)
    if cfg.method == "kto":
        train_tok = with_mismatched_completions(train_tok, cfg.max_length)
        eval_tok = with_mismatched_completions(eval_tok, cfg.max_length)
    fields: list[str] = []
    # Probed before LoRA wraps the model (adapters do not change how it positions tokens).
    packed = cfg.padding_free and padding_free_is_exact(model, ref_model if ref_model is not model else None)
    reference = None  # the model whose log-probs are precomputed, once the Trainer is built
    if cfg.method not in NEEDS_REFERENCE:
        ref_model = None  # SimPO and ORPO are reference-free: no reference log-probs, no frozen copy
    elif cfg.reference == "precomputed":
        reference = ref_model if ref_model is not None else model
        fields = REF_FIELDS + ([KL_REF_FIELD] if cfg.method == "kto" else [])
    elif ref_model is None and cfg.lora is None:
        ref_model = copy.deepcopy(model)  # frozen snapshot of the starting policy
    probe = None
    if reward_model is not None and cfg.overopt_prompts > 0:  # KL to the given reference, else to the starting policy
        probe = CurveProbe(ref_model if ref_model is not None else copy.deepcopy(model), reward_model, tokenizer,
                           distinct_prompt_records(eval_data, cfg.overopt_prompts), max_length=cfg.max_length,
                           max_new_tokens=cfg.overopt_max_new_tokens, temperature=cfg.overopt_temperature,
                           batch_size=cfg.per_device_eval_batch_size, seed=cfg.seed, gold_fn=monitor_fn)
    base = model
    model = maybe_apply_lora(model, cfg.lora, task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=training_arguments(cfg),
        train_dataset=train_tok,
        eval_dataset=eval_tok,
        data_collator=WithScalarFields((PackedPreferenceCollator if packed else PreferenceCollator)(tokenizer.pad_token_id),
                                       fields),
        processing_class=tokenizer,
        callbacks=[LogFnCallback(log_fn), *(callbacks or [])],
        **trainer_kwargs,
    )
    if reference is not None:
        # Only the rows the Trainer's sampler will read (it needs the Trainer), batched as it reads them.
        batches = train_batches_read(trainer)
        if batches is not None and len(set(itertools.chain.from_iterable(batches))) >= len(train_tok):
            batches = None  # every row is read: score them all
        average = cfg.loss_type in LENGTH_NORMALISED and cfg.method == "dpo"
        kwargs = dict(average=average, batch_size=cfg.per_device_eval_batch_size, padding_free=packed)
        adapters_off = model.disable_adapter() if reference is base and model is not base else nullcontext()
        with adapters_off:  # LoRA wrapped the starting model in place: with its adapters off, it is the reference
            trainer.train_dataset = precompute_reference_logps(reference, train_tok, tokenizer.pad_token_id,
                                                               batches=batches, **kwargs)
            trainer.eval_dataset = precompute_reference_logps(reference, eval_tok, tokenizer.pad_token_id, **kwargs)
    trainer.dpo = cfg
    trainer.curve_probe = probe
    if cfg.reference == "live" and ref_model is not None:
        trainer.ref_model = ref_model.to(trainer.args.device)
    metrics = run_training(trainer, cfg)
    return TrainResult(model=trainer.model, metrics=metrics, train_stats=train_stats, eval_stats=eval_stats)
