"""Collators: lists of tokenised examples (see ``tokenize``) -> dicts of padded tensors.

Training batches are right-padded (positions line up with the prompt start, the usual layout for
teacher-forced log-probs); generation batches are left-padded so every prompt ends at the last
column and ``generate`` appends directly after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhf_core.data.tokenize import IGNORE_INDEX


def _check_pad(pad_token_id: int | None) -> int:
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token) before collating")
    return int(pad_token_id)


def pad(sequences: Sequence[Sequence[int]], value: int, *, length: int | None = None, left: bool = False) -> torch.Tensor:
    """Stack int sequences into a (B, T) long tensor, T = ``length`` or the longest, padded with ``value``."""
    width = max((len(s) for s in sequences), default=0) if length is None else length
    out = torch.full((len(sequences), width), value, dtype=torch.long)  # (B, T)
    for row, seq in enumerate(sequences):
        if len(seq):
            target = out[row, width - len(seq) :] if left else out[row, : len(seq)]
            target.copy_(torch.as_tensor(seq, dtype=torch.long))
    return out


def _mask(sequences: Sequence[Sequence[int]], width: int, *, left: bool = False) -> torch.Tensor:
    """(B, T) long tensor: 1 on real tokens, 0 on padding."""
    return pad([[1] * len(s) for s in sequences], 0, length=width, left=left)


class SFTCollator:
    """``input_ids``/``labels`` examples -> right-padded ``input_ids``, ``attention_mask``, ``labels``.

    Output tensors are (B, T), T the longest example; ``labels`` is ``IGNORE_INDEX`` on padding
    (and wherever the example already had it, i.e. the prompt). Examples without ``labels``
    are trained on every token.
    """

    def __init__(self, pad_token_id: int | None) -> None:
        self.pad_token_id = _check_pad(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        labels = [e.get("labels", e["input_ids"]) for e in examples]
        input_ids = pad(ids, self.pad_token_id)  # (B, T)
        return {
            "input_ids": input_ids,
            "attention_mask": _mask(ids, input_ids.shape[1]),  # (B, T)
            "labels": pad(labels, IGNORE_INDEX, length=input_ids.shape[1]),  # (B, T)
        }


PAIR_SIDES = ("chosen", "rejected", "kl")


class PreferenceCollator:
    """Pairs -> right-padded chosen and rejected sequences of ONE common length T.

    For ``side`` in (chosen, rejected): ``{side}_input_ids`` = prompt + completion,
    ``{side}_attention_mask`` (1 on real tokens), ``{side}_completion_mask`` (1 on completion
    tokens only). All six tensors are (B, T), so a trainer can ``torch.cat`` chosen and rejected
    into one (2B, T) forward pass. Examples that also carry ``kl_input_ids`` (KTO's mismatched
    completions) get the same three ``kl_*`` tensors, of the same width.
    """

    def __init__(self, pad_token_id: int | None) -> None:
        self.pad_token_id = _check_pad(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [e["prompt_input_ids"] for e in examples]
        present = [side for side in PAIR_SIDES if f"{side}_input_ids" in examples[0]]
        sides = {side: [e[f"{side}_input_ids"] for e in examples] for side in present}
        full = {side: [list(p) + list(c) for p, c in zip(prompts, comps)] for side, comps in sides.items()}
        width = max(len(s) for seqs in full.values() for s in seqs)
        batch: dict[str, torch.Tensor] = {}
        for side, seqs in full.items():
            batch[f"{side}_input_ids"] = pad(seqs, self.pad_token_id, length=width)  # (B, T)
            batch[f"{side}_attention_mask"] = _mask(seqs, width)  # (B, T)
            completion_only = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, sides[side])]
            batch[f"{side}_completion_mask"] = pad(completion_only, 0, length=width)  # (B, T)
        return batch
