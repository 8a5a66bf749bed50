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

Best checkpoint (``best_metric``, as OpenRLHF and NeMo-RL offer): at each evaluation that improves
the metric, the trained weights are written to ``<output_dir>/best/update_<n>.pt`` (outside the
rotated checkpoints, so rotation cannot delete them) and the step, value and evaluation go into
:class:`OnlineState`. A weights file is kept while the state or the newest saved checkpoint
refers to it; a resume drops the files of evaluations after its checkpoint (they are re-run). At
the end the trainer loads the best weights and reports that evaluation, ``checkpoint/best_step``
and ``checkpoint/best_value``.

N processes (``accelerate launch``; batch sizes are per process) sample and train as one process
given their batches: process ``p`` takes the ``p``-th part of the update's ``N × per_process`` prompts,
each ``generate`` call is seeded by (seed, update, its rows' place in the update's batch)
(:func:`unit_seed`), held-out prompts by their place among all; token means in the losses span every
process's tokens (:meth:`OnlineLoop.token_share`), whitening every process's batch (PPO).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from tqdm.auto import tqdm

from rlhf_core import metrics as M
from rlhf_core.compute_clock import compute_loop
from rlhf_core.errors import UserFacingError
from rlhf_core.rollout import prompt_rows
from rlhf_core.trainers.common import BaseTrainConfig, LogFn, resolve_precision

SamplesFn = Callable[[list[dict[str, Any]], int], None]
CHECKPOINTS = "checkpoints"
"""Accelerate's folder of automatically named checkpoints, under ``project_dir`` (= ``output_dir``)."""
STATE_FILE = "custom_checkpoint_0.pkl"
"""Accelerate's file for the first registered object (the trainer's state), the last one a save writes."""
BEST = "best"
"""Folder of the best evaluation's weights (``best_metric``), under ``output_dir``: ``update_<n>.pt``."""
ROLLOUT, REWARD_NORM = 0, 1
"""Streams of :func:`unit_seed`: training rollouts, and PPO's reward-normalisation rollouts."""
_NUMBER = re.compile(r"^checkpoint_(\d+)$")
_BEST_FILE = re.compile(r"^update_(\d+)\.pt$")


@dataclass
class OnlineState:
    """What an online trainer adds to Accelerate's checkpoint; registered with ``register_for_checkpointing``."""

    update: int = 0
    """Updates done."""
    history: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    """Every ``(update, metrics)`` given to ``log_fn`` so far, replayed after a resume."""
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Every evaluation's decoded samples so far."""
    best_step: int | None = None
    """``best_metric``: the update of the best evaluation so far (its weights: ``best/update_<n>.pt``)."""
    best_value: float | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    """That evaluation's ``eval/...`` metrics."""

    def state_dict(self) -> dict[str, Any]:
        return {"update": self.update, "history": list(self.history), "samples": list(self.samples),
                "best_step": self.best_step, "best_value": self.best_value, "best_metrics": dict(self.best_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.update = int(state["update"])
        self.history = list(state.get("history", []))
        self.samples = list(state.get("samples", []))
        self.best_step = state.get("best_step")
        self.best_value = state.get("best_value")
        self.best_metrics = dict(state.get("best_metrics", {}))


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


class BestMetricError(UserFacingError, ValueError):
    """``best_metric`` names no metric of the trainer's evaluation (raised at the first evaluation)."""


def best_weights_files(output_dir: str | Path) -> dict[int, Path]:
    """``{update: best/update_<update>.pt}`` in ``output_dir``."""
    root = Path(output_dir) / BEST
    return {int(m.group(1)): p for p in root.glob("update_*.pt") if (m := _BEST_FILE.match(p.name))}


def unit_seed(seed: int, stream: int, update: int, row: int) -> int:
    """Seed of the ``generate`` call that samples rows ``row, row + 1, …`` of an update's batch (``stream``: what is
    sampled): the same whichever process makes the call."""
    import numpy as np

    return int(np.random.SeedSequence([seed, stream, update, row]).generate_state(1)[0])


def contiguous_share(n: int, parts: int, index: int) -> range:
    """Rows of part ``index`` of ``n`` rows cut into ``parts`` contiguous parts (the first ``n % parts`` one row longer)."""
    size, extra = divmod(n, parts)
    start = index * size + min(index, extra)
    return range(start, start + size + (index < extra))


def prepare_prompts_and_accelerator(cfg: Any, tokenizer: Any, train_prompts: Any, eval_prompts: Any, *, batch_prompts: int,
                                    batch_setting: str) -> tuple[Accelerator, Any, Any, int]:
    """Tokenise the prompt records, seed, build the Accelerator (mixed precision, accumulation, checkpoint
    naming); checks that there are prompts for an update's batch (``batch_prompts`` per process).

    Returns the Accelerator, every training prompt (an update's batch is drawn from all of them), this
    process's contiguous part of the held-out prompts and the index of its first one among all."""
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
    n_procs = accelerator.num_processes
    if len(train_tok) < batch_prompts * n_procs:
        raise ValueError(f"train_prompts: {len(train_tok)} prompts after tokenisation, fewer than {batch_setting}={batch_prompts}"
                         + (f" × {n_procs} processes" if n_procs > 1 else ""))
    share = contiguous_share(len(eval_tok), n_procs, accelerator.process_index)
    if len(share) == 0:
        raise ValueError(f"eval_prompts: {len(eval_tok)} prompts after tokenisation, fewer than the {n_procs} processes")
    return accelerator, train_tok, eval_tok.select(share), share.start


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
    train_prompts: Any
    eval_offset: int = 0
    """Index of this process's first held-out prompt among all (its evaluation seeds follow from it)."""
    _best_in_checkpoint: int | None = None
    """The best evaluation the newest saved checkpoint refers to (its weights file is kept until a newer save)."""

    @property
    def update(self) -> int:
        return self.state.update

    def batch_rows(self, update: int, per_process: int) -> tuple[list[int], int]:
        """This process's prompt rows of ``update`` (0-based) and the place of the first in the update's batch."""
        first = self.accelerator.process_index * per_process
        rows = prompt_rows(len(self.train_prompts), per_process * self.accelerator.num_processes, self.cfg.seed, update)
        return rows[first : first + per_process], first

    def token_share(self, mask: Any) -> Any:
        """``n_here · N / n_all`` for a mini-batch's token mask: scales a token mean over this process's mini-batch to
        its part of the mean over every process's (the N processes' gradients are averaged). 1 on one process."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return 1.0
        here = mask.sum().float()
        return here * acc.num_processes / acc.reduce(here.clone(), reduction="sum").clamp(min=1.0)

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
        """Evaluate the current policy on the held-out prompts: log and return its ``eval/...`` metrics, set ``eval_metrics``."""
        raise NotImplementedError

    # --- best checkpoint (``best_metric``) ------------------------------------------------

    def _best_key(self) -> str:
        name = self.cfg.best_metric
        return name if name.startswith(M.EVAL + "/") else M.key(M.EVAL, name)

    def _best_file(self, update: int) -> Path:
        return Path(self.accelerator.project_dir) / BEST / f"update_{update}.pt"

    def _prune_best(self, keep: set[int | None]) -> None:
        """Delete the best-weights files no one refers to (main process)."""
        if self.accelerator.is_main_process:
            for update, path in best_weights_files(self.accelerator.project_dir).items():
                if update not in keep:
                    path.unlink(missing_ok=True)

    def keep_if_best(self, metrics: dict[str, float]) -> None:
        """After an evaluation: when ``best_metric`` improved, save the weights and record the step, value and metrics."""
        cfg = self.cfg
        if cfg.best_metric is None:
            return
        key = self._best_key()
        if key not in metrics:
            known = sorted(k[len(M.EVAL) + 1:] for k in metrics if k.startswith(M.EVAL + "/"))
            raise BestMetricError(f"{self.name}.best_metric {cfg.best_metric!r} is not one of {self.name}'s evaluation "
                                  f"metrics {known}")
        value = float(metrics[key])
        best = self.state.best_value
        better = math.isfinite(value) and (best is None or (value > best if cfg.best_is_greater() else value < best))
        if not better:
            return
        weights = self.accelerator.get_state_dict(self.model)  # every process takes part (sharded models gather)
        path = self._best_file(self.update)
        if self.accelerator.is_main_process:
            import torch

            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".tmp")
            torch.save(weights, partial)
            os.replace(partial, path)  # complete or absent
        self.accelerator.wait_for_everyone()
        self.state.best_step, self.state.best_value, self.state.best_metrics = self.update, value, dict(metrics)
        self._prune_best({self.state.best_step, self._best_in_checkpoint})

    def load_best(self) -> None:
        """Load the best evaluation's weights into the model and report that evaluation (``eval_metrics``)."""
        state = self.state
        if state.best_step is None:  # no finite value at any evaluation: the last policy stays
            print(f"[rlhf] {self.name}: best_metric {self.cfg.best_metric!r} was never finite; the last policy is the output")
            return
        path = self._best_file(state.best_step)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the weights of the best evaluation (update {state.best_step}) are missing")
        import torch

        self.accelerator.unwrap_model(self.model).load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.eval_metrics = {**state.best_metrics, M.BEST_STEP: float(state.best_step), M.BEST_VALUE: float(state.best_value)}
        print(f"[rlhf] {self.name}: output the policy of update {state.best_step} ({self.cfg.best_metric} = {state.best_value:.4g})")

    def run_evaluation(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.keep_if_best(metrics)
        return metrics

    # --- the loop -------------------------------------------------------------------------

    @compute_loop
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
            self._best_in_checkpoint = self.state.best_step
            self._prune_best({self.state.best_step})  # evaluations after the checkpoint are run again
        else:
            self._best_in_checkpoint = None
            self._prune_best(set())  # left by an earlier run that did not resume
            self.start_fresh()
            if cfg.eval_on_start:
                self.run_evaluation()
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
                self.run_evaluation()
                evaluated_at = self.update
            if self.update % cfg.save_steps == 0 or self.update == cfg.max_updates:
                save_checkpoint(self.accelerator, self.state)
                self._best_in_checkpoint = self.state.best_step
                self._prune_best({self.state.best_step})
        bar.close()
        if evaluated_at != self.update:  # resumed at the end: evaluate the final policy once
            self.run_evaluation()
        if cfg.best_metric is not None:
            self.load_best()
