"""What the online trainers (PPO, GRPO/RLOO) share: the update loop, its state, and checkpoints through Accelerate.

``Accelerator.save_state`` writes the trained weights, the optimizer, the scheduler, the RNG states
of every process and every object registered with ``register_for_checkpointing`` — here the
trainer's :class:`OnlineState`: the update counter (prompt batches are a pure function of
(seed, update), so it is the whole data position), the logged metrics and the evaluation samples
(so curves and samples after a resume hold every update, as an uninterrupted run's do), plus what
a trainer adds (PPO: the KL controller and the reward normalisation). With
``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=save_total_limit)`` Accelerate
names the folders ``<output_dir>/checkpoints/checkpoint_<n>`` and deletes the oldest beyond the
limit; ``n`` is set to the update counter before each save, so a folder says which update it holds.

Accelerate writes a checkpoint in place, and the registered state comes last
(``custom_checkpoint_0.pkl``): a folder without it was cut short by a crash and is removed
before resuming, so that ``load_state`` does not pick it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from rlhf_core.trainers.common import BaseTrainConfig, LogFn, resolve_precision

SamplesFn = Callable[[list[dict[str, Any]], int], None]
CHECKPOINTS = "checkpoints"
"""Accelerate's folder of automatically named checkpoints, under ``project_dir`` (= ``output_dir``)."""
STATE_FILE = "custom_checkpoint_0.pkl"
"""Accelerate's file for the first registered object (the trainer's state), the last one a save writes."""
_NUMBER = re.compile(r"^checkpoint_(\d+)$")


@dataclass
class OnlineState:
    """What an online trainer adds to Accelerate's checkpoint; registered with ``register_for_checkpointing``."""

    update: int = 0
    """Updates done."""
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    """Every ``(update, metrics)`` given to ``log_fn`` so far, replayed after a resume."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Every evaluation's decoded samples so far."""

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "history": list(self.history), "samples": list(self.samples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.update = int(state["update"])
        self.history = list(state.get("history", []))
        self.samples = list(state.get("samples", []))


def project_configuration(cfg: BaseTrainConfig) -> ProjectConfiguration:
    """Accelerate's checkpoint naming and rotation for ``cfg.output_dir``."""
    return ProjectConfiguration(project_dir=cfg.output_dir, automatic_checkpoint_naming=True, total_limit=cfg.save_total_limit)


def _folders(output_dir: str | Path) -> list[Path]:
    """``checkpoint_<n>`` folders, oldest first (the order Accelerate sorts them in)."""
    root = Path(output_dir) / CHECKPOINTS
    found = [(int(m.group(1)), p) for p in root.glob("checkpoint_*") if (m := _NUMBER.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def saved_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    return [p for p in _folders(output_dir) if (p / STATE_FILE).is_file()]


def save_checkpoint(accelerator: Accelerator, state: OnlineState) -> Path:
    """``checkpoints/checkpoint_<update>``; Accelerate deletes the oldest beyond ``total_limit`` first."""
    folder = Path(accelerator.project_dir) / CHECKPOINTS / f"checkpoint_{state.update}"
    if accelerator.is_main_process and folder.exists():  # left by an earlier run that did not resume (resume=False)
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.project_configuration.iteration = state.update  # names the folder after the update
    accelerator.save_state()
    accelerator.wait_for_everyone()  # every process's RNG file is in before anyone goes on
    return folder


def resume_from_latest(accelerator: Accelerator) -> Path | None:
    """Restore the newest complete checkpoint (weights, optimizer, scheduler, RNG, registered state); ``None``: none."""
    output_dir = accelerator.project_dir
    if accelerator.is_main_process:
        for partial in (p for p in _folders(output_dir) if not (p / STATE_FILE).is_file()):
            shutil.rmtree(partial)  # a save that a crash cut short
    accelerator.wait_for_everyone()
    complete = saved_checkpoints(output_dir)
    if not complete:
        return None
    accelerator.load_state()  # Accelerate picks the newest checkpoint_<n>
    return complete[-1]


def prepare_prompts_and_accelerator(cfg: Any, tokenizer: Any, train_prompts: Any, eval_prompts: Any, *, batch_prompts: int,
                                    batch_setting: str) -> tuple[Accelerator, Any, Any]:
    """Tokenise the prompt records, seed, build the Accelerator (mixed precision, accumulation, checkpoint
    naming) and shard the prompts over its processes; checks that each process has a batch of prompts."""
    from accelerate.utils import set_seed

    from rlhf_core.rollout import tokenize_prompt_records

    kwargs = dict(max_length=cfg.max_length, max_new_tokens=cfg.max_new_tokens)
    train_tok = tokenize_prompt_records(train_prompts, tokenizer, what="train_prompts", **kwargs)
    eval_tok = tokenize_prompt_records(eval_prompts, tokenizer, what="eval_prompts", **kwargs)
    set_seed(cfg.seed)
    precision = resolve_precision(cfg.precision)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision="bf16" if precision["bf16"] else "fp16" if precision["fp16"] else "no",
        step_scheduler_with_optimizer=False,  # stepped once per update, not per optimizer step
        project_config=project_configuration(cfg),
    )
    train_tok = train_tok.shard(accelerator.num_processes, accelerator.process_index, contiguous=False)
    eval_tok = eval_tok.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)
    if len(train_tok) < batch_prompts:
        raise ValueError(f"train_prompts: {len(train_tok)} prompts per process after tokenisation, fewer than "
                         f"{batch_setting}={batch_prompts}")
    if len(eval_tok) == 0:
        raise ValueError("eval_prompts: no prompt left after tokenisation")
    return accelerator, train_tok, eval_tok


class OnlineLoop:
    """The update loop of an online trainer: a subclass gives ``step()`` (one update's metrics) and ``evaluate()``.

    The subclass sets ``cfg``, ``accelerator``, ``state`` (registered for checkpointing), ``log_fn``
    and ``samples_fn`` before :meth:`train`; ``name`` labels the progress bar and resume message.
    """

    name = "online"
    cfg: Any
    accelerator: Accelerator
    state: OnlineState
    log_fn: LogFn | None
    samples_fn: SamplesFn | None

    @property
    def update(self) -> int:
        return self.state.update

    @property
    def samples(self) -> list[dict[str, Any]]:
        return self.state.samples

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Give ``metrics`` to ``log_fn`` (main process) and keep them for a resumed run's curves."""
        if self.accelerator.is_main_process:
            self.state.history.append((step, dict(metrics)))
            if self.log_fn is not None:
                self.log_fn(metrics, step)

    def reduce_train_metrics(self, per_batch: dict[str, Any]) -> dict[str, float]:
        """An update's batch statistics averaged over processes, as ``train/<name>`` (one all-reduce)."""
        import torch

        from rlhf_core import metrics as M

        names = list(per_batch)
        values = torch.stack([torch.as_tensor(per_batch[n], dtype=torch.float32, device=self.accelerator.device)
                              for n in names])  # (n,)
        values = self.accelerator.reduce(values, reduction="mean").tolist()
        return {M.key(M.TRAIN, n): v for n, v in zip(names, values)}

    def add_samples(self, rows: list[dict[str, Any]], step: int) -> None:
        self.state.samples += rows
        if self.accelerator.is_main_process and self.samples_fn is not None and rows:
            self.samples_fn(rows, step)

    def start_fresh(self) -> None:
        """Work before the first update of a run that does not resume (e.g. PPO's reward normalisation)."""

    def step(self) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def train(self) -> None:
        cfg = self.cfg
        checkpoint = resume_from_latest(self.accelerator) if cfg.resume else None
        if checkpoint is not None:
            print(f"[rlhf] resuming {self.name} from {checkpoint} (update {self.update})")
            if self.accelerator.is_main_process:  # the curves and samples before the checkpoint, as logged then
                for step, metrics in self.state.history:
                    if self.log_fn is not None:
                        self.log_fn(metrics, step)
                if self.samples_fn is not None and self.state.samples:
                    self.samples_fn(list(self.state.samples), self.update)
        else:
            self.start_fresh()
        show = cfg.progress and self.accelerator.is_main_process
        bar = tqdm(total=cfg.max_updates, initial=self.update, desc=self.name, disable=not show)
        evaluated_at = -1
        while self.update < cfg.max_updates:
            metrics = self.step()
            self.state.update += 1
            bar.update(1)
            if self.update % cfg.logging_steps == 0:
                self.log(metrics, self.update)
            if self.update % cfg.eval_steps == 0 or self.update == cfg.max_updates:
                self.evaluate()
                evaluated_at = self.update
            if self.update % cfg.save_steps == 0 or self.update == cfg.max_updates:
                save_checkpoint(self.accelerator, self.state)
        bar.close()
        if evaluated_at != self.update:  # resumed at the end: evaluate the final policy once
            self.evaluate()
