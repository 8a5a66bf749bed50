"""Stage ``prepare``: build the normalised, versioned data splits (and the tokenizer).

By default the synthetic task (``rlhf_core.synthetic``) is generated; configured datasets
(any file, folder, ``s3://`` URI or hub name the data layer accepts, in any supported
format) replace it. Writes ``data/prepared/{sft_train,sft_test,pref_train,pref_test,prompts}.jsonl``,
``data/tokenizer/`` (a pretrained model's tokenizer files as they are), ``metrics/prepare.json``
and ``data/prepared/lengths/*.json``: the token counts ``auto`` length settings are resolved from
(``tasks.lengths``).

Every source is cleaned row by row (``rlhf_core.data.cleaning``). With ``invalid_rows: drop``
invalid rows are left out and written to ``data/prepared/quarantine.jsonl`` (source file, row,
rule, raw record); ``data/prepared/invalid_rows.json`` holds the counts per source and rule,
which the ``validate`` gate checks against ``validate.max_invalid_fraction``. With ``fail`` the
stage stops at the first source with an invalid row and writes nothing. Every prepared row keeps
its ``source_file``/``source_row``/``source_unit``, so later reports name the row in its file.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.model_config import ModelConfig
from tasks.params import typed
from tasks.sources import ingested_snapshots
from tasks.workspace import SPLITS, Workspace, write_json


@dataclass
class SyntheticConfig:
    """Sizes and label noise of the synthetic task (see ``rlhf_core.synthetic``)."""

    n_sft: int = 2000
    n_pref_train: int = 16000
    """The reward model needs many noisy pairs to generalise."""
    n_pref_test: int = 400
    n_prompts: int = 200
    temperature: float = 0.2
    """Bradley–Terry temperature of the simulated labellers: lower = less label noise."""


@dataclass
class PrepareConfig:
    """The ``prepare`` group of ``params.yaml``."""

    seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    sft_data: str | None = None
    """SFT demonstrations: file, folder, s3:// URI or hub name; ``null``: the synthetic task."""
    sft_format: str = "auto"
    preference_data: str | None = None
    """Preference pairs, as above; ``null``: the synthetic task."""
    preference_format: str = "auto"
    prompt_data: str | None = None
    """Held-out prompts for PPO/evaluation; ``null``: the prompts of the preference test split."""
    prompt_format: str = "auto"
    sft_columns: dict[str, str] | None = None
    """``{column in your data: column the format expects}``, renamed before the format is detected, e.g. Orca DPO
    pairs' ``{question: prompt}`` (``rlhf_core.data.columns``); likewise ``preference_columns``, ``prompt_columns``."""
    preference_columns: dict[str, str] | None = None
    prompt_columns: dict[str, str] | None = None
    test_fraction: float = 0.1
    """Share of a configured dataset held out for evaluation (the synthetic task has its own splits)."""
    max_rows: int | None = None
    """Keep at most this many rows per configured dataset (after shuffling), for quick trials."""
    invalid_rows: str = "drop"
    """Rows breaking a cleaning rule: ``drop`` (quarantine, count, go on) or ``fail`` (stop the stage)."""
    length_percentile: float = 99.0
    """Length settings set to ``auto`` cover this percentile of the prepared data's token counts
    (capped by the model's context length; see ``tasks.lengths``)."""

    def __post_init__(self) -> None:
        from rlhf_core.data.columns import check_mapping

        for role in ("sft", "preference", "prompt"):
            check_mapping(getattr(self, f"{role}_columns"), f"prepare.{role}_columns")
        if not 0.0 < self.length_percentile <= 100.0:
            raise ValueError(f"length_percentile must be in (0, 100], got {self.length_percentile}")
        if self.invalid_rows not in ("drop", "fail"):
            raise ValueError(f"invalid_rows must be 'drop' or 'fail', got {self.invalid_rows!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_rows is not None and self.max_rows < 2:
            raise ValueError(f"max_rows must be >= 2, got {self.max_rows}")


QUARANTINE = "quarantine.jsonl"
INVALID_ROWS = "invalid_rows.json"


@dataclass
class Cleaning:
    """The ``invalid_rows`` policy, and what cleaning found in each source read so far."""

    policy: str
    results: list[Any] = field(default_factory=list)
    """``rlhf_core.data.cleaning.CleanResult`` per source, in reading order."""


def _load_normalised(source: str, kind: str, fmt: str, cleaning: Cleaning, source_name: str | None = None,
                     columns: dict[str, str] | None = None):
    """Source rows normalised and cleaned (with source columns); ``source_name`` is what reports call it, ``columns``
    the renames (``prepare.<role>_columns``)."""
    from rlhf_core.data.cleaning import load_clean

    result = load_clean(source, kind, fmt, policy=cleaning.policy, source_name=source_name, columns=columns)
    cleaning.results.append(result)
    if result.invalid:
        print(f"[prepare] {result.report()}")
    return result.dataset


def _split(ds, test_fraction: float, seed: int, max_rows: int | None):
    ds = ds.shuffle(seed=seed)
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    parts = ds.train_test_split(test_size=test_fraction, seed=seed)
    return parts["train"], parts["test"]


def build_splits(cfg: PrepareConfig, scratch: Path, snapshots: dict[str, Path] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The five normalised splits, and facts about them (synthetic task info; ``cleaning``: a ``Cleaning``).

    ``snapshots``: {role: folder} of the DVC-tracked copies ``ingest`` made of the configured
    sources (``sft``, ``preference``, ``prompt``); a role without one is read from its source.
    """
    from rlhf_core.data.rows import SOURCE_COLUMNS
    from rlhf_core.synthetic import generate_task

    snapshots = snapshots or {}

    def source(role: str, configured: str) -> str:
        return str(snapshots.get(role, configured))

    info: dict[str, Any] = {}
    splits: dict[str, Any] = {}
    cleaning = Cleaning(cfg.invalid_rows)
    synthetic_dir = scratch / "synthetic"
    if cfg.sft_data is None or cfg.preference_data is None:
        syn = cfg.synthetic
        info["synthetic"] = generate_task(
            synthetic_dir, seed=cfg.seed, n_sft=syn.n_sft, n_pref_train=syn.n_pref_train,
            n_pref_test=syn.n_pref_test, n_prompts=syn.n_prompts, temperature=syn.temperature,
        )
    if cfg.sft_data is None:
        sft = _load_normalised(str(synthetic_dir / "sft.jsonl"), "sft", "prompt_completion", cleaning, "synthetic/sft.jsonl")
        splits["sft_train"], splits["sft_test"] = _split(sft, cfg.test_fraction, cfg.seed, None)
    else:
        splits["sft_train"], splits["sft_test"] = _split(
            _load_normalised(source("sft", cfg.sft_data), "sft", cfg.sft_format, cleaning, cfg.sft_data, cfg.sft_columns),
            cfg.test_fraction, cfg.seed, cfg.max_rows,
        )
    if cfg.preference_data is None:
        for split, file in (("pref_train", "preferences_train.jsonl"), ("pref_test", "preferences_test.jsonl")):
            splits[split] = _load_normalised(
                str(synthetic_dir / file), "preference", "prompt_chosen_rejected", cleaning, f"synthetic/{file}"
            )
    else:
        splits["pref_train"], splits["pref_test"] = _split(
            _load_normalised(source("preference", cfg.preference_data), "preference", cfg.preference_format, cleaning,
                             cfg.preference_data, cfg.preference_columns),
            cfg.test_fraction, cfg.seed, cfg.max_rows,
        )
    if cfg.prompt_data is not None:
        splits["prompts"] = _load_normalised(source("prompt", cfg.prompt_data), "prompt", cfg.prompt_format, cleaning,
                                             cfg.prompt_data, cfg.prompt_columns)
    elif cfg.preference_data is None:
        splits["prompts"] = _load_normalised(str(synthetic_dir / "prompts.jsonl"), "prompt", "auto", cleaning, "synthetic/prompts.jsonl")
    else:
        splits["prompts"] = splits["pref_test"].select_columns(["prompt", "prompt_messages", *SOURCE_COLUMNS])
    info["cleaning"] = cleaning
    return splits, info


def build_tokenizer(model_cfg: ModelConfig, splits: dict[str, Any]):
    """Train a tokenizer on the prepared texts (from-scratch model) or load the base model's, as it is."""
    from rlhf_core.models import load_tokenizer, train_tokenizer

    if model_cfg.name_or_path is not None:
        return load_tokenizer(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code)

    def texts():  # each row's prompt, then its completion or chosen and rejected; read in batches (rows are slow)
        for ds in splits.values():
            columns = [c for c in ("prompt", "completion", "chosen", "rejected") if c in ds.column_names]
            for batch in ds.select_columns(columns).iter(batch_size=1000):
                for row in zip(*(batch[c] for c in columns)):
                    yield from row

    return train_tokenizer(texts(), vocab_size=model_cfg.tokenizer_vocab_size)


def model_context_length(model_cfg: ModelConfig) -> int | None:
    """The base model's context length: ``model.tiny.max_positions`` from scratch, else its config's."""
    from tasks.lengths import context_length

    if model_cfg.name_or_path is None:
        from rlhf_core.config import config_from_dict
        from rlhf_core.models import TinyModelConfig

        return config_from_dict(TinyModelConfig, model_cfg.tiny, section="model.tiny").max_positions
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(model_cfg.name_or_path, trust_remote_code=model_cfg.trust_remote_code))


LENGTH_SPLITS = {"sft": ("sft_train", "sft_test"), "preference": ("pref_train", "pref_test"), "prompt": ("prompts",)}


def data_lengths(splits: dict[str, Any], tokenizer, percentile: float, context: int | None) -> dict[str, dict[str, Any]]:
    """{kind: lengths file contents}: the token counts of each kind of prepared data (``tasks.lengths``)."""
    from rlhf_core.data.lengths import summarise, token_lengths

    out = {}
    for kind, names in LENGTH_SPLITS.items():
        counts: dict[str, list[int]] = {}
        for name in names:
            for part, values in token_lengths(splits[name], tokenizer, kind).items():
                counts.setdefault(part, []).extend(values)
        out[kind] = {"percentile": percentile, "context_length": context, "rows": sum(len(splits[n]) for n in names),
                     "parts": summarise(counts, percentile)}
    return out


def _length_metrics(lengths: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from tasks.lengths import auto_everywhere

    any_kind = next(iter(lengths.values()))
    metrics: dict[str, Any] = {"lengths/percentile": any_kind["percentile"], "lengths/context_length": any_kind["context_length"]}
    for kind, stats in lengths.items():
        for part, summary in stats["parts"].items():
            metrics[f"lengths/{kind}/{part}/p"] = summary["p"]
            metrics[f"lengths/{kind}/{part}/max"] = summary["max"]
    metrics.update({f"lengths/auto/{setting}": value for setting, value in auto_everywhere(lengths).items()})
    return metrics


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    from rlhf_core.models.tokenizer import save_tokenizer
    from tasks.lengths import lengths_file

    cfg = typed(params, "prepare", PrepareConfig)
    model_cfg = typed(params, "model", ModelConfig)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rlhf-prepare-") as tmp:
        splits, info = build_splits(cfg, Path(tmp), ingested_snapshots(params, ws))
        data_seconds = time.perf_counter() - started
        tokenizer_started = time.perf_counter()
        tokenizer = build_tokenizer(model_cfg, splits)
        tokenizer_seconds = time.perf_counter() - tokenizer_started
        lengths_started = time.perf_counter()
        lengths = data_lengths(splits, tokenizer, cfg.length_percentile, model_context_length(model_cfg))
        lengths_seconds = time.perf_counter() - lengths_started
        # Write everything beside the old outputs first, then swap: a failure leaves them intact.
        staging = Path(tmp) / "out"
        for name in SPLITS:
            splits[name].to_json(staging / "prepared" / f"{name}.jsonl", lines=True, force_ascii=False)
        if "synthetic" in info:
            shutil.copy(Path(tmp) / "synthetic" / "task.json", staging / "prepared" / "task.json")
        _write_cleaning(info["cleaning"], staging / "prepared")
        for kind, stats in lengths.items():  # read by stages whose length settings are `auto`
            write_json(staging / "prepared" / "lengths" / lengths_file(ws, kind).name, stats)
        save_tokenizer(tokenizer, staging / "tokenizer")  # a pretrained tokenizer's own files, as they are
        for src, dst in ((staging / "prepared", ws.prepared), (staging / "tokenizer", ws.tokenizer)):
            if dst.exists():
                shutil.rmtree(dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), dst)
    metrics: dict[str, Any] = {f"rows/{name}": len(splits[name]) for name in SPLITS}
    metrics["vocab_size"] = len(tokenizer)
    metrics["seconds/data"] = round(data_seconds, 3)
    metrics["seconds/tokenizer"] = round(tokenizer_seconds, 3)
    metrics["seconds/lengths"] = round(lengths_seconds, 3)
    metrics.update(_length_metrics(lengths))
    if "synthetic" in info:
        task = info["synthetic"]
        for name in ("bayes_accuracy_train", "bayes_accuracy_test"):
            if name in task:
                metrics[f"synthetic/{name}"] = task[name]
    metrics.update(_cleaning_metrics(info["cleaning"]))
    write_json(ws.metrics("prepare"), metrics)
    if tracker is not None:
        for name in SPLITS:
            tracker.log_dataset(splits[name].to_pandas(), name=name, context=name, source=str(ws.split(name)))
        for name in (INVALID_ROWS, QUARANTINE):
            tracker.log_artifact(ws.prepared / name, "invalid_rows")
    return metrics


def _write_cleaning(cleaning: Cleaning, folder: Path) -> None:
    """``invalid_rows.json`` (counts per source and rule, read by ``validate``) and the quarantine (one line per row)."""
    import json

    from rlhf_core.data.cleaning import summary

    write_json(folder / INVALID_ROWS, summary(cleaning.results, cleaning.policy))
    with (folder / QUARANTINE).open("w", encoding="utf-8") as handle:
        for result in cleaning.results:
            for row in result.invalid:
                record = {"source": result.source, "kind": result.kind, **row.to_dict()}
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def _cleaning_metrics(cleaning: Cleaning) -> dict[str, Any]:
    """Invalid rows per rule (all rules, zeros too: runs compare key by key) and per kind of data."""
    from rlhf_core.data.rules import RULES

    metrics: dict[str, Any] = {f"invalid_rows/{rule}": 0 for rule in RULES}
    for result in cleaning.results:
        for rule, count in result.counts().items():
            metrics[f"invalid_rows/{rule}"] += count
        metrics[f"invalid_rows/{result.kind}"] = metrics.get(f"invalid_rows/{result.kind}", 0) + len(result.invalid)
        metrics[f"rows_read/{result.kind}"] = metrics.get(f"rows_read/{result.kind}", 0) + result.rows_read
    metrics["invalid_rows/total"] = sum(len(r.invalid) for r in cleaning.results)
    return metrics


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main("prepare", run)


if __name__ == "__main__":
    main()
