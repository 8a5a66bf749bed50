"""Supervised fine-tuning: next-token NLL on completion tokens only (prompt tokens carry no loss)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf_core import metrics as M
from rlhf_core.data.collate import SFTCollator
from rlhf_core.data.packing import PackedSFTCollator
from rlhf_core.data.tokenize import TokenizeStats, TruncationConfig, tokenize_sft
from rlhf_core.logprobs import packed_causal_lm_logits
from rlhf_core.losses import sft_loss
from rlhf_core.trainers.common import (
    LogFn,
    LogFnCallback,
    StoredMetricsTrainer,
    run_training,
    training_arguments,
)
from rlhf_core.trainers.lora_wrap import maybe_apply_lora
from rlhf_core.trainers.padding_free import padding_free_is_exact
from rlhf_core.trainers.train_config import SFTConfig


@dataclass
class TrainResult:
    model: PreTrainedModel
    metrics: dict[str, float]
    """Final held-out metrics (``eval/...``)."""
    train_stats: TokenizeStats
    eval_stats: TokenizeStats


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align logits at t with the token at t+1: (B,T,V),(B,T) -> (B,T-1,V),(B,T-1),(B,T-1) mask."""
    targets = labels[:, 1:]  # (B, T-1)
    return logits[:, :-1], targets, targets != -100


def sft_terms(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean completion NLL, correct next-token guesses and scored tokens of a padded or packed batch.

    A packed batch (``PackedSFTCollator``) has ``position_ids`` and no ``attention_mask``; its labels
    already hide every sequence's first token, so the shift never scores across a boundary.
    """
    if "attention_mask" in inputs:
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    else:
        logits = packed_causal_lm_logits(model, inputs["input_ids"], inputs["position_ids"])
    logits, targets, mask = _shifted(logits, inputs["labels"])
    loss = sft_loss(logits, targets, mask)
    correct = ((logits.detach().argmax(-1) == targets) & mask).sum()
    return loss, correct, mask.sum()


class SFTTrainer(StoredMetricsTrainer):
    def _forward(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
        return sft_terms(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, correct, n_tokens = self._forward(model, inputs)
        self.store_metrics({M.TOKEN_ACCURACY: correct / n_tokens.clamp(min=1)})
        if num_items_in_batch is not None:
            # As the Trainer scales a model's own loss: NLL summed here over the optimizer step's scored tokens (of every
            # accumulated batch, and of every process when it averages tokens across devices), times the processes the
            # gradient is averaged over. So N processes and accumulation train as one process on the whole batch.
            loss = loss * n_tokens / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, {}) if return_outputs else loss

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        model = self.model.eval()
        nll = correct = tokens = 0.0
        for batch in self.eval_batches(eval_dataset):
            batch = self._prepare_inputs(batch)
            loss, n_correct, n_tokens = self._forward(model, batch)
            nll += float(loss) * float(n_tokens)
            correct += float(n_correct)
            tokens += float(n_tokens)
        nll, correct, tokens = self.sum_across_processes(nll, correct, tokens)
        loss = nll / max(tokens, 1.0)
        return self.finish_evaluate(
            {M.LOSS: loss, M.PERPLEXITY: math.exp(min(loss, 50.0)), M.TOKEN_ACCURACY: correct / max(tokens, 1.0)},
            metric_key_prefix,
        )


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_data: datasets.Dataset,
    eval_data: datasets.Dataset,
    cfg: SFTConfig,
    log_fn: LogFn | None = None,
    callbacks: list | None = None,
    **trainer_kwargs: Any,
) -> TrainResult:
    """Fine-tune ``model`` on normalised SFT records (``prompt``, ``prompt_messages``, ``completion``).

    Checkpoints every ``cfg.save_steps`` into ``cfg.output_dir`` and resumes from the latest one.
    Returns the trained model (LoRA adapters, if any, still attached) and final held-out metrics.
    """
    trunc = TruncationConfig(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    train_tok, train_stats = tokenize_sft(train_data, tokenizer, trunc)
    eval_tok, eval_stats = tokenize_sft(eval_data, tokenizer, trunc)
    model = maybe_apply_lora(model, cfg.lora, task_type="CAUSAL_LM")
    packed = cfg.padding_free and padding_free_is_exact(model)
    trainer = SFTTrainer(
        model=model,
        args=training_arguments(cfg),
        train_dataset=train_tok,
        eval_dataset=eval_tok,
        data_collator=(PackedSFTCollator if packed else SFTCollator)(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[LogFnCallback(log_fn), *(callbacks or [])],
        **trainer_kwargs,
    )
    metrics = run_training(trainer, cfg)
    return TrainResult(model=trainer.model, metrics=metrics, train_stats=train_stats, eval_stats=eval_stats)
