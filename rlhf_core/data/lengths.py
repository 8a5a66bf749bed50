"""Token lengths of normalised records and their percentiles: the facts ``auto`` length settings use.

Lengths are counted exactly as ``tokenize`` encodes the records for training (the chat template
for prompts when the tokenizer has one, completions with their EOS), before any truncation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from rlhf_core.data.tokenize import encode_completions, encode_prompts

KIND_PARTS = {"sft": ("prompt", "completion", "total"), "preference": ("prompt", "completion", "total"), "prompt": ("prompt",)}
"""What is measured per kind of data. ``total``: prompt + completion (preference: the longer of chosen
and rejected, as a pair is batched to that length); a preference ``completion`` is every chosen and
every rejected response."""

_CHUNK = 1000  # rows encoded at a time


def percentile(values: Sequence[int], q: float) -> int:
    """The nearest-rank ``q``-th percentile: the smallest value with at least ``q``% of ``values`` at or below it.

    Always one of ``values`` (an integer length); ``q = 100`` is the maximum.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < q <= 100:
        raise ValueError(f"percentile q must be in (0, 100], got {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))  # 1-based
    return int(ordered[rank - 1])


def token_lengths(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, kind: str) -> dict[str, list[int]]:
    """Per-row token counts of normalised ``kind`` records (``sft``, ``preference``, ``prompt``): {part: [n]}."""
    if kind not in KIND_PARTS:
        raise ValueError(f"kind must be one of {sorted(KIND_PARTS)}, got {kind!r}")
    out: dict[str, list[int]] = {part: [] for part in KIND_PARTS[kind]}
    prompt_tokens: dict[str, int] = {}  # preference data repeats prompts: encode each distinct one once
    for start in range(0, len(ds), _CHUNK):
        rows = ds[start:start + _CHUNK]
        keys = [json.dumps([p, m], sort_keys=True) for p, m in zip(rows["prompt"], rows["prompt_messages"])]
        new = {k: i for i, k in enumerate(keys) if k not in prompt_tokens}
        if new:
            encoded = encode_prompts(tokenizer, [rows["prompt"][i] for i in new.values()],
                                     [rows["prompt_messages"][i] for i in new.values()])
            prompt_tokens.update({k: len(ids) for k, ids in zip(new, encoded)})
        prompts = [prompt_tokens[k] for k in keys]
        out["prompt"] += prompts
        if kind == "sft":
            completions = [len(ids) for ids in encode_completions(tokenizer, rows["completion"])]
            out["completion"] += completions
            out["total"] += [p + c for p, c in zip(prompts, completions)]
        elif kind == "preference":
            chosen = [len(ids) for ids in encode_completions(tokenizer, rows["chosen"])]
            rejected = [len(ids) for ids in encode_completions(tokenizer, rows["rejected"])]
            out["completion"] += chosen + rejected
            out["total"] += [p + max(c, r) for p, c, r in zip(prompts, chosen, rejected)]
    return out


def summarise(lengths: dict[str, list[int]], q: float) -> dict[str, dict[str, Any]]:
    """{part: {"n", "p" (the ``q``-th percentile), "max", "mean"}} for each non-empty part."""
    return {
        part: {"n": len(values), "p": percentile(values, q), "max": max(values), "mean": round(sum(values) / len(values), 2)}
        for part, values in lengths.items() if values
    }
