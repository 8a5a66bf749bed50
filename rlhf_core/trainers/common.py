"""What every trainer shares: TrainingArguments, precision, metric plumbing, resume (and the base configs, which
live in the torch-free ``rlhf_core.trainers.train_config`` and are re-exported here).

The loops themselves are transformers' ``Trainer`` (checkpoints, resume with optimizer,
scheduler and RNG state, mixed precision, gradient accumulation, multi-GPU through
Accelerate); our trainers only override ``compute_loss`` and ``evaluate``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from rlhf_core import metrics as M
from rlhf_core.compute_clock import compute_loop
from rlhf_core.trainers.divergence import DivergenceGuard
from rlhf_core.trainers.train_config import BaseTrainConfig as BaseTrainConfig  # re-exported
from rlhf_core.trainers.train_config import TrainConfig

LogFn = Callable[[dict[str, float], int], None]


def resolve_precision(precision: str) -> dict[str, bool]:
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def training_arguments(cfg: TrainConfig, **overrides: Any) -> TrainingArguments:
    """``TrainingArguments`` from our config; evaluation, logging and saving are step-based."""
    kwargs: dict[str, Any] = dict(
        output_dir=cfg.output_dir,
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm is not None else 0.0,  # 0: the Trainer does not clip
        logging_steps=cfg.logging_steps,
        eval_on_start=cfg.eval_on_start,  # run_training turns it off when resuming (step 0 is in the kept curve)
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        report_to=[],
        remove_unused_columns=False,  # our collators need the tokenised columns as they are
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        **resolve_precision(cfg.precision),
    )
    if cfg.best_metric is not None:  # transformers keeps the best checkpoint and loads it at the end
        kwargs.update(load_best_model_at_end=True, metric_for_best_model=cfg.best_metric,
                      greater_is_better=cfg.greater_is_better)
    kwargs.update(cfg.extra_args)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class LogFnCallback(TrainerCallback):
    """Forwards every ``Trainer`` log (train and eval) to ``log_fn`` under our metric names."""

    def __init__(self, log_fn: LogFn | None) -> None:
        self.log_fn = log_fn

    def on_train_begin(self, args, state, control, **kwargs):
        """On a resume, replay the curve the checkpoint kept (``log_history``), so it holds every step."""
        if self.log_fn and state.global_step > 0:
            for entry in state.log_history:
                named = M.from_trainer_logs({k: v for k, v in entry.items() if k != "step"})
                if named and "step" in entry:
                    self.log_fn(named, entry["step"])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.log_fn and logs:
            named = M.from_trainer_logs(logs)
            if named:
                self.log_fn(named, state.global_step)


class StoredMetricsTrainer(Trainer):
    """A ``Trainer`` whose ``compute_loss`` can store batch metrics, averaged into the next log.

    As TRL does: metrics of every micro-batch since the last log are averaged, so a logged
    ``rewards/accuracies`` covers ``logging_steps × accumulation`` batches, not one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stored: dict[str, list[float]] = defaultdict(list)

    def store_metrics(self, values: dict[str, torch.Tensor | float]) -> None:
        for name, value in values.items():
            self._stored[name].append(float(value.detach().float().mean()) if torch.is_tensor(value) else float(value))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the averaged batch metrics
            logs.update({name: sum(v) / len(v) for name, v in self._stored.items() if v})
            self._stored.clear()
        super().log(logs, start_time)

    def finish_evaluate(self, metrics: dict[str, float], prefix: str) -> dict[str, float]:
        """Log eval metrics and fire ``on_evaluate``, as ``Trainer.evaluate`` does."""
        metrics = {f"{prefix}_{k}": float(v) for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def eval_batches(self, eval_dataset=None) -> Iterator[dict[str, Any]]:
        """Collated batches of this process's contiguous part of the eval set: each example once over all processes.

        (The Trainer's eval loader repeats examples so that every process gets as many batches, and
        ``gather_for_metrics`` drops the repeats only when called on every batch: sums and pair statistics would
        count them.) Its parts, gathered in process order, are the eval set in order.
        """
        data = self.eval_dataset if eval_dataset is None else eval_dataset
        acc = self.accelerator
        if acc.num_processes > 1:
            data = data.shard(acc.num_processes, acc.process_index, contiguous=True)
        yield from DataLoader(data, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                              collate_fn=self.data_collator, pin_memory=self.args.dataloader_pin_memory)

    def sum_across_processes(self, *values: float) -> list[float]:
        """Sum per-process eval totals over all processes (a no-op on one)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.args.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()

    def gather_across_processes(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenate the per-process 1-D eval tensors (of :meth:`eval_batches`; lengths may differ) in process order."""
        if self.accelerator.num_processes == 1:
            return values
        from accelerate.utils import gather_object

        return torch.tensor(gather_object(values.tolist()), dtype=values.dtype, device=values.device)


def train_batches_read(trainer: Trainer) -> list[list[int]] | None:
    """The row-index batches of ``trainer.train_dataset`` that its ``max_steps`` steps will read, over all processes.

    Read from the Trainer's own train dataloader: its sampler's order for each epoch the steps reach (accelerate's
    ``SeedableRandomSampler`` draws each epoch's permutation from ``data_seed + epoch`` with a generator of its own,
    so nothing is drawn from the global RNG), cut where the Trainer's loop stops (``set_initial_training_values``:
    batches per epoch, updates per epoch; ``gradient_accumulation_steps`` batches per update). Every process gets
    the same list: step by step, process 0's batch, then process 1's, ... A run resumed from a checkpoint reads a
    part of these. ``None`` where the order is not known before training: a sampler that draws from the global RNG
    (``use_seedable_sampler`` off, ``group_by_length``), epoch-based training, dispatched or uneven batches.
    """
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard

    args = trainer.args
    if (args.max_steps <= 0 or not args.accelerator_config.use_seedable_sampler
            or args.train_sampling_strategy not in ("random", "sequential") or trainer.get_sp_size() > 1):
        return None
    loader = trainer.get_train_dataloader()
    shard = loader.batch_sampler
    if not isinstance(loader, DataLoaderShard) or (isinstance(shard, BatchSamplerShard) and not shard.even_batches):
        return None
    epochs, updates_per_epoch, *_, batches_per_epoch, max_steps = trainer.set_initial_training_values(args, loader)
    per_process = [shard] if not isinstance(shard, BatchSamplerShard) else [
        BatchSamplerShard(shard.batch_sampler, shard.num_processes, rank, shard.split_batches, shard.even_batches)
        for rank in range(shard.num_processes)]
    read: list[list[int]] = []
    steps_left = max_steps
    for epoch in range(epochs):
        updates = min(updates_per_epoch, steps_left)
        n_batches = min(updates * args.gradient_accumulation_steps, batches_per_epoch)  # the last update may read fewer
        steps_left -= updates
        orders = []
        for sampler in per_process:
            loader.set_epoch(epoch)  # what the loader does before each pass: the sampler's seed is data_seed + epoch
            orders.append(list(itertools.islice(sampler, n_batches)))
        read += [order[i] for i in range(n_batches) for order in orders]
        if steps_left <= 0:
            break
    return read


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-<step>`` folder in ``output_dir``, or ``None``."""
    path = Path(output_dir)
    return get_last_checkpoint(str(path)) if path.is_dir() else None


SPECIAL_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


@contextmanager
def special_token_ids_kept(model: torch.nn.Module) -> Iterator[None]:
    """Keep the pad/bos/eos ids of ``model``'s config and generation config as they were.

    ``Trainer.train`` copies the tokenizer's special-token ids into both (transformers'
    ``align_special_tokens``). A pretrained model without a pad token is batched with the eos
    token as pad (``models.load_tokenizer``); saved with ``pad_token_id = eos``, the next stage
    would build a Llama-style embedding with ``padding_idx = eos`` and never train that row. The
    model keeps what it came with (for the from-scratch model the ids already agree: no change).
    """
    configs = [c for c in (getattr(model, "config", None), getattr(model, "generation_config", None)) if c is not None]
    kept = [{name: copy.deepcopy(getattr(c, name, None)) for name in SPECIAL_TOKEN_IDS} for c in configs]
    try:
        yield
    finally:
        for config, values in zip(configs, kept):
            for name, value in values.items():
                setattr(config, name, value)


@compute_loop  # training and the final evaluation: the stage's compute seconds
def run_training(trainer: Trainer, cfg: TrainConfig) -> dict[str, float]:
    """Train (resuming from the latest checkpoint when ``cfg.resume``), then evaluate once more.

    Returns the final held-out metrics under our names (``eval/...``).
    """
    trainer.add_callback(DivergenceGuard(cfg.max_skipped_steps))  # a NaN step never reaches the weights
    checkpoint = latest_checkpoint(cfg.output_dir) if cfg.resume else None
    if checkpoint:
        print(f"[rlhf] resuming from {checkpoint}")
        trainer.args.eval_on_start = False  # the step-0 evaluation is in the checkpoint's log history, replayed
    with special_token_ids_kept(trainer.model):
        trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.state
    if cfg.best_metric is not None:  # the model is now the best checkpoint's: report its evaluation
        chosen = state.best_global_step or state.global_step
        done = [e for e in state.log_history if e.get("step") == chosen and "eval_loss" in e]
        final = done[-1] if done else trainer.evaluate()
        named = {k: v for k, v in M.from_trainer_logs(final).items() if k.startswith(M.EVAL + "/") and k != "eval/step"}
        return {**named, M.BEST_STEP: float(chosen)}
    # The Trainer already evaluated at the last step when it falls on an eval step: reuse that.
    done = [e for e in state.log_history if e.get("step") == state.global_step and "eval_loss" in e]
    final = done[-1] if done else trainer.evaluate()
    return {k: v for k, v in M.from_trainer_logs(final).items() if k.startswith(M.EVAL + "/") and k != "eval/step"}


class WithScalarFields:
    """Wraps a collator to also pass per-example float fields (e.g. precomputed reference log-probs)."""

    def __init__(self, collator: Callable[[list[dict]], dict[str, torch.Tensor]], fields: list[str]) -> None:
        self.collator = collator
        self.fields = fields

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(examples)
        for name in self.fields:
            batch[name] = torch.tensor([float(e[name]) for e in examples], dtype=torch.float32)  # (B,)
        return batch
