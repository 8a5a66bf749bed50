"""Reward-model training: a scalar head on the last non-pad token, Bradley–Terry loss on pairs."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core import metrics as M
from rlhf_core.data.collate import PreferenceCollator
from rlhf_core.data.packing import PackedGroup, PackedPreferenceCollator
from rlhf_core.data.tokenize import TruncationConfig, tokenize_preference
from rlhf_core.losses import reward_loss
from rlhf_core.models.scalar_head import packed_sequence_scores, sequence_scores
from rlhf_core.promotion import bootstrap_mean_interval
from rlhf_core.trainers.common import (
    LogFn,
    LogFnCallback,
    StoredMetricsTrainer,
    WithScalarFields,
    run_training,
    training_arguments,
)
from rlhf_core.trainers.lora_wrap import maybe_apply_lora
from rlhf_core.trainers.padding_free import padding_free_is_exact
from rlhf_core.trainers.sft import TrainResult
from rlhf_core.trainers.train_config import RewardConfig

ACCURACY_INTERVAL = 0.95
"""Two-sided level of the held-out accuracy's bootstrap interval (``eval/accuracy_ci_low``/``_high``)."""
N_BOOTSTRAP = 2000


def pair_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of chosen and rejected in one forward pass: (B,), (B,). The batch is padded or packed."""
    packed = PackedGroup.from_batch(batch, "pairs")
    if packed is not None:  # sequences 0..B-1 chosen, B..2B-1 rejected
        return packed_sequence_scores(model, packed.input_ids, packed.position_ids, packed.last_index).chunk(2)
    input_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    attention_mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])  # (2B, T)
    scores = sequence_scores(model, input_ids, attention_mask)  # (2B,)
    return scores.chunk(2)


class RewardTrainer(StoredMetricsTrainer):
    center_rewards_coefficient: float | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = pair_scores(model, inputs)
        loss = reward_loss(chosen, rejected, inputs.get("margin")).mean()
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
        diff = (chosen - rejected).detach()
        self.store_metrics({M.ACCURACY: (diff > 0).float(), M.MARGIN: diff})
        return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        model = self.model.eval()
        chosen_all, rejected_all = [], []
        for batch in self.eval_batches(eval_dataset):
            chosen, rejected = pair_scores(model, self._prepare_inputs(batch))
            chosen_all.append(chosen.float())
            rejected_all.append(rejected.float())
        chosen = self.gather_across_processes(torch.cat(chosen_all))
        rejected = self.gather_across_processes(torch.cat(rejected_all))
        both = torch.cat([chosen, rejected])
        correct = (chosen > rejected).double().cpu().numpy()  # (N,) 1 where the chosen reply scores higher
        low, high = bootstrap_mean_interval(correct, confidence=(1 + ACCURACY_INTERVAL) / 2, n_bootstrap=N_BOOTSTRAP,
                                            seed=self.args.seed)
        return self.finish_evaluate(
            {
                M.LOSS: float(reward_loss(chosen, rejected).mean()),
                M.ACCURACY: float(correct.mean()),
                M.ci_low(M.ACCURACY): low,
                M.ci_high(M.ACCURACY): high,
                M.MARGIN: float((chosen - rejected).mean()),
                M.REWARD_MEAN: float(both.mean()),
                M.REWARD_STD: float(both.std()),
            },
            metric_key_prefix,
        )


def train_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: datasets.Dataset,
    eval_data: datasets.Dataset,
    cfg: RewardConfig,
    log_fn: LogFn | None = None,
    callbacks: list | None = None,
    **trainer_kwargs: Any,
) -> TrainResult:
    """Train a scalar-head model (``AutoModelForSequenceClassification``, 1 label) on preference pairs.

    ``train_data``/``eval_data`` are normalised preference records (``prompt``, ``prompt_messages``,
    ``chosen``, ``rejected``); an optional numeric ``margin`` column is used as the Llama-2 margin.
    """
    trunc = TruncationConfig(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    train_tok, train_stats = tokenize_preference(train_data, tokenizer, trunc)
    eval_tok, eval_stats = tokenize_preference(eval_data, tokenizer, trunc)
    model = maybe_apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    packed = cfg.padding_free and padding_free_is_exact(model, scalar_head=True)
    trainer = RewardTrainer(
        model=model,
        args=training_arguments(cfg),
        train_dataset=train_tok,
        eval_dataset=eval_tok,
        data_collator=WithScalarFields(
            (PackedPreferenceCollator if packed else PreferenceCollator)(tokenizer.pad_token_id), ["margin"] if "margin" in train_tok.column_names else []
        ),
        processing_class=tokenizer,
        callbacks=[LogFnCallback(log_fn), *(callbacks or [])],
        **trainer_kwargs,
    )
    trainer.center_rewards_coefficient = cfg.center_rewards_coefficient
    metrics = run_training(trainer, cfg)
    return TrainResult(model=trainer.model, metrics=metrics, train_stats=train_stats, eval_stats=eval_stats)
