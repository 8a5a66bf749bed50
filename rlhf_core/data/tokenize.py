"""Tokenise normalised records (see ``formats``) for SFT, preference training and generation.

Rules, the same for every kind:

1. Prompt tokens: the tokenizer's chat template applied to ``prompt_messages`` with
   ``add_generation_prompt=True`` when ``tokenizer.chat_template`` is set; otherwise
   ``tokenizer(prompt)`` with a BOS token put first if the tokenizer has one and did not add it.
2. Completion tokens: ``tokenizer(completion, add_special_tokens=False) + [eos_token_id]``.
3. A prompt longer than ``max_prompt_length`` keeps its END (left truncation).
4. A prompt of ``>= max_length`` tokens leaves no room for a completion: the example is dropped.
5. Completions are cut on the right so that prompt + completion fit ``max_length``.

Every function returns ``(dataset, TokenizeStats)``. The normalised text columns are replaced by
token columns and the provenance columns (``rows.SOURCE_COLUMNS``) are dropped; other columns
(e.g. a per-pair ``margin``) pass through. Counts are computed from per-row flags written by
``datasets.map``, so they are right even when ``map`` hits its cache.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from rlhf_core.data.rows import SOURCE_COLUMNS

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt tokens), as in ``torch.nn.CrossEntropyLoss``."""

_FLAGS = ("_dropped", "_prompt_truncated", "_completion_truncated")


@dataclass
class TruncationConfig:
    """Length limits in tokens."""

    max_length: int = 256
    """Prompt + completion tokens."""
    max_prompt_length: int | None = None
    """Longer prompts are cut keeping their end; ``None``: prompts are bounded by ``max_length`` only."""

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for a prompt token and EOS), got {self.max_length!r}")
        mpl = self.max_prompt_length
        if mpl is not None and (isinstance(mpl, bool) or not isinstance(mpl, int) or not 0 < mpl < self.max_length):
            raise ValueError(
                f"max_prompt_length must be None or an int in (0, max_length={self.max_length}), got {mpl!r}"
            )


@dataclass
class TokenizeStats:
    """What tokenisation did to a dataset (logged by the training stages)."""

    n_input: int = 0
    n_kept: int = 0
    n_dropped_prompt_too_long: int = 0
    """Examples whose prompt alone had ``>= max_length`` tokens (after ``max_prompt_length``)."""
    n_prompt_truncated: int = 0
    """Examples whose prompt was left-truncated to ``max_prompt_length``."""
    n_completion_truncated: int = 0
    """Kept examples with a completion cut to fit (preference: chosen or rejected or both)."""

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], prompt_messages: list[list[dict]]) -> list[list[int]]:
    """Prompt token ids, one list per example (rule 1 of the module docstring).

    Each distinct prompt is encoded once: preference data repeat a prompt in many pairs (the default
    task: 16,000 pairs, 160 prompts), and rendering the chat template is the slow part.
    """
    chat = bool(tokenizer.chat_template)
    # What the chat template renders, as a dict key (messages are role/content strings: always JSON)
    keys = [json.dumps(messages, ensure_ascii=False) for messages in prompt_messages] if chat else list(prompts)
    first = {}  # key -> the first row with it
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    rows = list(first.values())
    if chat:
        encoded = tokenizer.apply_chat_template(
            [prompt_messages[i] for i in rows], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    else:
        bos = tokenizer.bos_token_id
        encoded = [ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]
                   for ids in tokenizer([prompts[i] for i in rows])["input_ids"]]
    by_key = dict(zip(first, encoded))
    return [list(by_key[key]) for key in keys]  # a list of its own per row


def encode_completions(tokenizer: PreTrainedTokenizerBase, completions: list[str]) -> list[list[int]]:
    """Completion token ids, each ending with EOS (rule 2)."""
    eos = _eos_id(tokenizer)
    return [[*ids, eos] for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: set one, every completion ends with it")
    return tokenizer.eos_token_id


def _fit_prompt(prompt: list[int], cfg: TruncationConfig) -> tuple[list[int], bool, bool]:
    """(prompt, was left-truncated, must be dropped) per rules 3 and 4."""
    truncated = cfg.max_prompt_length is not None and len(prompt) > cfg.max_prompt_length
    if truncated:
        prompt = prompt[-cfg.max_prompt_length :]
    return prompt, truncated, len(prompt) >= cfg.max_length


def _require(ds: datasets.Dataset, columns: tuple[str, ...], fn: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{fn}: dataset lacks columns {missing} (found {ds.column_names}); normalise it first with rlhf_core.data.normalize"
        )


def _run(ds: datasets.Dataset, batch_fn: Any, consumed: tuple[str, ...], desc: str) -> tuple[datasets.Dataset, TokenizeStats]:
    """Map ``batch_fn`` (which writes the token columns and ``_FLAGS``), then count, drop and clean up."""
    if len(ds) == 0:
        raise ValueError(f"{desc}: the dataset has no rows")
    provenance = [c for c in SOURCE_COLUMNS if c in ds.column_names]  # only for reports, not for training
    mapped = ds.map(batch_fn, batched=True, remove_columns=[*consumed, *provenance], desc=desc)
    columns = mapped.with_format("arrow")  # whole columns at once: reading a Column row by row is slow
    flags = {name: sum(columns[name].to_pylist()) for name in _FLAGS}
    kept = mapped.filter(lambda dropped: not dropped, input_columns="_dropped") if flags["_dropped"] else mapped
    stats = TokenizeStats(
        n_input=len(ds),
        n_kept=len(kept),
        n_dropped_prompt_too_long=flags["_dropped"],
        n_prompt_truncated=flags["_prompt_truncated"],
        n_completion_truncated=flags["_completion_truncated"],
    )
    return kept.remove_columns(list(_FLAGS)), stats


def tokenize_sft(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: TruncationConfig
) -> tuple[datasets.Dataset, TokenizeStats]:
    """SFT examples -> ``input_ids`` (prompt + completion), ``labels``, ``prompt_length``.

    ``labels`` equals ``input_ids`` with ``IGNORE_INDEX`` on the first ``prompt_length``
    positions: the loss is on completion tokens only, ``L = -Σ_{t ≥ |x|} log π(y_t | x, y_<t)``.
    """
    consumed = ("prompt", "prompt_messages", "completion")
    _require(ds, consumed, "tokenize_sft")
    _eos_id(tokenizer)

    def batch_fn(batch: dict[str, list]) -> dict[str, list]:
        prompts = encode_prompts(tokenizer, batch["prompt"], batch["prompt_messages"])
        completions = encode_completions(tokenizer, batch["completion"])
        out: dict[str, list] = {"input_ids": [], "labels": [], "prompt_length": [], **{f: [] for f in _FLAGS}}
        for prompt, completion in zip(prompts, completions):
            prompt, prompt_cut, drop = _fit_prompt(prompt, cfg)
            room = max(cfg.max_length - len(prompt), 0)
            out["input_ids"].append(prompt + completion[:room])
            out["labels"].append([IGNORE_INDEX] * len(prompt) + completion[:room])
            out["prompt_length"].append(len(prompt))
            out["_dropped"].append(drop)
            out["_prompt_truncated"].append(prompt_cut)
            out["_completion_truncated"].append(not drop and len(completion) > room)
        return out

    return _run(ds, batch_fn, consumed, "tokenise SFT")


def tokenize_preference(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: TruncationConfig
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Preference pairs -> ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``.

    Chosen and rejected are completion ids only (each ending with EOS unless cut), sharing one
    truncated prompt; each is cut to ``max_length - len(prompt)``.
    """
    consumed = ("prompt", "prompt_messages", "chosen", "rejected")
    _require(ds, consumed, "tokenize_preference")
    _eos_id(tokenizer)

    def batch_fn(batch: dict[str, list]) -> dict[str, list]:
        prompts = encode_prompts(tokenizer, batch["prompt"], batch["prompt_messages"])
        chosen_all = encode_completions(tokenizer, batch["chosen"])
        rejected_all = encode_completions(tokenizer, batch["rejected"])
        out: dict[str, list] = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": [], **{f: [] for f in _FLAGS}}
        for prompt, chosen, rejected in zip(prompts, chosen_all, rejected_all):
            prompt, prompt_cut, drop = _fit_prompt(prompt, cfg)
            room = max(cfg.max_length - len(prompt), 0)
            out["prompt_input_ids"].append(prompt)
            out["chosen_input_ids"].append(chosen[:room])
            out["rejected_input_ids"].append(rejected[:room])
            out["_dropped"].append(drop)
            out["_prompt_truncated"].append(prompt_cut)
            out["_completion_truncated"].append(not drop and max(len(chosen), len(rejected)) > room)
        return out

    return _run(ds, batch_fn, consumed, "tokenise preference pairs")


def tokenize_prompts(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: TruncationConfig
) -> tuple[datasets.Dataset, TokenizeStats]:
    """Prompts for generation -> ``prompt_input_ids`` (dropped when ``>= max_length``: no room to generate)."""
    consumed = ("prompt", "prompt_messages")
    _require(ds, consumed, "tokenize_prompts")

    def batch_fn(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"prompt_input_ids": [], **{f: [] for f in _FLAGS}}
        for prompt in encode_prompts(tokenizer, batch["prompt"], batch["prompt_messages"]):
            prompt, prompt_cut, drop = _fit_prompt(prompt, cfg)
            out["prompt_input_ids"].append(prompt)
            out["_dropped"].append(drop)
            out["_prompt_truncated"].append(prompt_cut)
            out["_completion_truncated"].append(False)
        return out

    return _run(ds, batch_fn, consumed, "tokenise prompts")
