"""Glue the training stages share: loading splits and models, recording curves, saving outputs."""

from __future__ import annotations

import csv
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.workspace import Workspace


def load_split(ws: Workspace, name: str):
    """A prepared split (normalised records) as a ``datasets.Dataset``."""
    from rlhf_core.data.loading import load_records

    return load_records(ws.split(name))


def load_tokenizer(ws: Workspace):
    from rlhf_core.models import load_tokenizer as _load

    return _load(str(ws.tokenizer))


def base_causal_lm(params: dict[str, Any], tokenizer, seed: int):
    """The starting model of SFT: ``model.name_or_path``, or a tiny model built from scratch."""
    from rlhf_core.models import TinyModelConfig, build_tiny_causal_lm, load_causal_lm
    from tasks.model_config import ModelConfig
    from tasks.params import typed

    cfg = typed(params, "model", ModelConfig)
    if cfg.name_or_path is None:
        from rlhf_core.config import config_from_dict

        return build_tiny_causal_lm(tokenizer, config_from_dict(TinyModelConfig, cfg.tiny, section="model.tiny"), seed=seed)
    return load_causal_lm(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code, dtype=cfg.dtype)


class CurveRecorder:
    """Wraps a ``log_fn``: forwards to MLflow and keeps the curves for ``plots/<stage>/``."""

    def __init__(self, forward: Callable[[dict[str, float], int], None] | None) -> None:
        self.forward = forward
        self.rows: dict[str, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            split = name.split("/", 1)[0]
            self.rows[split][step][name] = value
        if self.forward is not None:
            self.forward(metrics, step)

    def write(self, out_dir: Path) -> list[Path]:
        """One CSV per split (``train.csv``, ``eval.csv``): a ``step`` column and one per metric."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for split, by_step in self.rows.items():
            columns = sorted({k for row in by_step.values() for k in row})
            path = out_dir / f"{split}.csv"
            with path.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["step", *columns])
                for step in sorted(by_step):
                    writer.writerow([step, *(by_step[step].get(c, "") for c in columns)])
            written.append(path)
        return written


def log_fn_of(tracker: Any) -> Callable[[dict[str, float], int], None] | None:
    return getattr(tracker, "log_fn", None)


def save_model_atomically(model, tokenizer, out_dir: Path) -> None:
    """Save (safetensors, LoRA merged) beside ``out_dir`` and swap it in only when complete."""
    from rlhf_core.models import save_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_model(model, tokenizer, staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def tokenize_stats(prefix: str, stats: Any) -> dict[str, float]:
    return {f"{prefix}/{k}": v for k, v in stats.to_dict().items()}


def checkpoint_dir(ws: Workspace, stage: str, params: dict[str, Any], inputs: list[Path]) -> Path:
    """Checkpoints of one stage run, keyed by its params and inputs.

    An interrupted stage re-run with the same params and inputs resumes from its latest
    checkpoint; a run with other params or inputs starts fresh instead of resuming stale state.
    """
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(params.get(stage), sort_keys=True, default=str).encode())
    for path in sorted(inputs):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:  # size + mtime: cheap for multi-GB checkpoints, and changes whenever DVC rewrites them
            stat = f.stat()
            digest.update(f"{f.relative_to(ws.root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return ws.checkpoints(stage) / digest.hexdigest()[:12]


def run_training_stage(
    stage: str, params: dict[str, Any], ws: Workspace, tracker: Any, *, config_cls: type, train_fn: Callable,
    make_model: Callable[[Any, Any], Any], train_split: str, eval_split: str, inputs: list[Path],
    extra_metrics: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    train_kwargs: Callable[[Any, Any], dict[str, Any]] | None = None,
    after_curves: Callable[[CurveRecorder], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Shared body of the ``sft``, ``reward`` and ``dpo`` stages.

    Resolves ``auto`` lengths (``tasks.lengths``), loads the config and tokenizer, builds the
    starting model (``make_model(tokenizer, cfg)``), trains with checkpoints under
    ``checkpoints/<stage>/<key>``, saves the final model to ``models/<stage>`` atomically, writes
    curves and ``metrics/<stage>.json`` (with the ``lengths/...`` used), and removes the
    checkpoints once the model is saved (the model itself is versioned by DVC).
    ``extra_metrics(metrics)`` adds stage-specific numbers derived from the trained ones;
    ``train_kwargs(tokenizer, cfg)`` gives ``train_fn`` more keyword arguments (DPO: the reward model and gold reward
    of its over-optimisation curve); ``after_curves(curves)`` writes more under ``plots/<stage>`` (before they are
    logged) and returns numbers for the metrics (DPO: ``tasks.overoptimization.write_overoptimization``).
    """
    import time

    from rlhf_core import metrics as M
    from rlhf_core.compute_clock import compute_seconds
    from tasks.launch import barrier, is_main_process
    from tasks.lengths import with_auto_lengths
    from tasks.params import typed
    from tasks.workspace import write_json

    params, lengths = with_auto_lengths(params, ws, stage)  # `auto` lengths from data/prepared/lengths
    ckpt = checkpoint_dir(ws, stage, params, inputs)
    cfg = typed(params, stage, config_cls, output_dir=str(ckpt))
    started = time.perf_counter()
    tokenizer = load_tokenizer(ws)
    model = make_model(tokenizer, cfg)
    curves = CurveRecorder(log_fn_of(tracker))
    more = train_kwargs(tokenizer, cfg) if train_kwargs is not None else {}
    result = train_fn(model, tokenizer, load_split(ws, train_split), load_split(ws, eval_split), cfg, log_fn=curves, **more)
    barrier()  # every process is done with the checkpoints before rank 0 saves and removes them
    if not is_main_process():
        return result.metrics
    save_model_atomically(result.model, tokenizer, ws.model(stage))
    curves.write(ws.plots(stage))
    extra_outputs = after_curves(curves) if after_curves is not None else {}
    if tracker is not None:
        tracker.log_artifacts(str(ws.plots(stage)), "plots")
    metrics = {
        **result.metrics,
        **extra_outputs,
        **tokenize_stats("data/train", result.train_stats),
        **tokenize_stats("data/eval", result.eval_stats),
        **lengths,
        "seconds": round(time.perf_counter() - started, 2),
        M.COMPUTE_SECONDS: round(compute_seconds(), 2),
    }
    if extra_metrics is not None:
        metrics.update(extra_metrics(metrics))
    write_json(ws.metrics(stage), metrics)
    shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def gold_reward_fn(ws: Workspace):
    """The synthetic task's gold reward when the prepared data is the synthetic task, else ``None``."""
    if not (ws.prepared / "task.json").exists():
        return None
    from rlhf_core.synthetic import GoldReward

    return GoldReward()


def distinct_prompts(ds):
    """Prompt records of ``ds`` without repeats, in first-seen order (preference data repeats prompts)."""
    seen: set[str] = set()
    keep = [i for i, p in enumerate(ds["prompt"]) if not (p in seen or seen.add(p))]
    return ds.select(keep).select_columns(["prompt", "prompt_messages"])


def finish_online_stage(stage: str, ws: Workspace, tracker: Any, result: Any, tokenizer: Any, curves: Any,
                        checkpoints: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The outputs of an online policy stage (PPO, GRPO), main process only: the policy (atomically), curves (with what
    the stage wrote beside them, e.g. the over-optimisation curve), decoded evaluation samples
    (``reports/<stage>/samples.jsonl`` and MLflow), ``metrics/<stage>.json``; then the checkpoints go (the model itself
    is versioned by DVC)."""
    import json

    from tasks.workspace import write_json

    save_model_atomically(result.policy, tokenizer, ws.model(stage))
    curves.write(ws.plots(stage))
    if tracker is not None:
        tracker.log_artifacts(str(ws.plots(stage)), "plots")
        if result.samples:  # decoded samples of every evaluation, with score and KL
            tracker.log_table(result.samples, "samples.json")
    reports = ws.reports(stage)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "samples.jsonl").write_text("".join(json.dumps(s, default=str) + "\n" for s in result.samples))
    write_json(ws.metrics(stage), metrics)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return metrics
