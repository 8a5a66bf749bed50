"""Padding-free batches: a batch's sequences laid end to end in a few rows, with per-sequence position ids.

A padded batch of B sequences costs ``B × T_max`` tokens of compute; on real data (HH-RLHF dialogues
from 20 to 500 tokens) most of it is padding. Here the sequences are packed, longest first, into the
fewest rows of width ``T_max`` (best-fit decreasing), each row holding several whole sequences one
after another. Every sequence's ``position_ids`` restart at 0, and the model is called WITHOUT an
attention mask: transformers (``masking_utils.find_packed_sequence_indices``, used by the sdpa, eager
and flash-attention paths alike) then reads the sequence boundaries from the position ids and builds
a block-diagonal causal mask, so no token attends across a boundary and each sequence's outputs equal
its padded ones (checked per model by ``rlhf_core.trainers.padding_free``).

Why rows of ``T_max`` rather than one row of all ``N`` tokens (TRL's and transformers' flattening
collators): without a varlen kernel (CPU, sdpa or eager on GPU) attention computes the full masked
``N × N`` score matrix, so one long row can cost more than padding (forward + backward of the tiny
GPT-2 on 32 HH-length sequences: padded 1.10 s, one row 1.38 s, rows of ``T_max`` 0.34 s; see
``docs/benchmarks.md``). Rows no wider than the longest sequence never cost more attention than the
padded batch.

The free space at the end of a row is filled with ``pad`` tokens that form a "sequence" of their own
(position ids restarting at 0), owned by no example (``sequence_ids == -1``) and never read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_core.data.collate import _check_pad
from rlhf_core.data.tokenize import IGNORE_INDEX

PACKED_PREFIX = "packed_"
"""Preference batches name each packed group ``packed_<group>_<field>`` (groups: ``pairs``, ``kl``)."""


def best_fit_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Assign sequences to rows of ``width`` tokens: longest first, each into the fullest row it fits.

    Returns the sequence indices of each row, in the order they are laid out. Deterministic.
    """
    if any(n > width for n in lengths):
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit rows of {width}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda r: free[r])
            rows[best].append(i)
            free[best] -= lengths[i]
        else:
            rows.append([i])
            free.append(width - lengths[i])
    return rows


def pack_sequences(
    sequences: Sequence[Sequence[int]],
    pad_value: int,
    per_token: dict[str, tuple[Sequence[Sequence[int]], int]] | None = None,
    *,
    width: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pack ``S`` token sequences into ``R`` rows of ``W`` tokens (``W`` = the longest, or ``width``).

    Args:
        sequences: ``S`` lists of token ids (none empty).
        pad_value: token id of the free space at the end of a row.
        per_token: ``{name: (values, fill)}``: other per-token lists (one per sequence, each as long as
            its sequence, e.g. labels) laid out the same way, ``fill`` in the free space.
        width: row width; ``None``: the longest sequence.

    Returns:
        ``input_ids`` ``(R, W)``; ``position_ids`` ``(R, W)``, ``0..n-1`` along each sequence (and along the
        free space); ``sequence_ids`` ``(R, W)``, the index in ``sequences`` owning each token, -1 in free
        space; ``last_index`` ``(S,)``, the flat index (``row · W + column``) of each sequence's last token;
        and each ``per_token`` name ``(R, W)``.
    """
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) == 0:
        raise ValueError("pack_sequences: needs at least one sequence and no empty sequence")
    width = max(lengths) if width is None else width
    per_token = per_token or {}
    columns: dict[str, list[int]] = {name: [] for name in ("input_ids", "position_ids", "sequence_ids", *per_token)}
    last_index = [0] * len(sequences)
    for r, members in enumerate(best_fit_rows(lengths, width)):
        used = 0
        for s in members:
            n = lengths[s]
            columns["input_ids"] += sequences[s]
            columns["position_ids"] += range(n)
            columns["sequence_ids"] += [s] * n
            for name, (values, _fill) in per_token.items():
                columns[name] += values[s]
            used += n
            last_index[s] = r * width + used - 1
        free = width - used
        columns["input_ids"] += [pad_value] * free
        columns["position_ids"] += range(free)  # a separate segment: never attended to from a sequence
        columns["sequence_ids"] += [-1] * free
        for name, (_values, fill) in per_token.items():
            columns[name] += [fill] * free
    out = {name: torch.tensor(values, dtype=torch.long).view(-1, width) for name, values in columns.items()}  # (R, W)
    out["last_index"] = torch.tensor(last_index, dtype=torch.long)  # (S,)
    return out


class PackedSFTCollator:
    """``input_ids``/``labels`` examples -> packed ``input_ids``, ``position_ids``, ``labels`` (all ``(R, W)``).

    No ``attention_mask``: its absence tells the model (and ``SFTTrainer``) the batch is packed.
    ``labels`` is ``IGNORE_INDEX`` on free space and on each sequence's first token, which in a packed
    row is the target of the previous sequence's last logit (in a padded batch it is nobody's target).
    """

    def __init__(self, pad_token_id: int | None) -> None:
        self.pad_token_id = _check_pad(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(e["input_ids"]) for e in examples]
        labels = [[IGNORE_INDEX, *list(e.get("labels", e["input_ids"]))[1:]] for e in examples]
        packed = pack_sequences(ids, self.pad_token_id, {"labels": (labels, IGNORE_INDEX)})
        return {name: packed[name] for name in ("input_ids", "position_ids", "labels")}


class PackedPreferenceCollator:
    """Pairs -> one packed group ``pairs`` of the B chosen then the B rejected sequences (prompt + completion).

    Keys ``packed_pairs_{input_ids, position_ids, completion_mask, sequence_ids, last_index}``: sequence
    ``i < B`` is pair ``i``'s chosen, ``B + i`` its rejected (the order of ``PreferenceCollator``'s
    ``torch.cat`` of the two sides). Examples with ``kl_input_ids`` (KTO) also get a ``kl`` group.
    """

    def __init__(self, pad_token_id: int | None) -> None:
        self.pad_token_id = _check_pad(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [list(e["prompt_input_ids"]) for e in examples]
        groups = {"pairs": ("chosen", "rejected"), "kl": ("kl",)}
        batch: dict[str, torch.Tensor] = {}
        for group, sides in groups.items():
            if f"{sides[0]}_input_ids" not in examples[0]:
                continue
            completions = [list(e[f"{side}_input_ids"]) for side in sides for e in examples]
            prompt_of = prompts * len(sides)
            sequences = [p + c for p, c in zip(prompt_of, completions)]
            completion_mask = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_of, completions)]
            packed = pack_sequences(sequences, self.pad_token_id, {"completion_mask": (completion_mask, 0)})
            batch.update({f"{PACKED_PREFIX}{group}_{name}": value for name, value in packed.items()})
        return batch


@dataclass
class PackedGroup:
    """One packed group of a batch (see ``pack_sequences`` for the shapes)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    sequence_ids: torch.Tensor
    last_index: torch.Tensor
    completion_mask: torch.Tensor | None = None

    @property
    def n_sequences(self) -> int:
        return self.last_index.numel()

    @classmethod
    def from_batch(cls, batch: dict[str, Any], group: str) -> PackedGroup | None:
        """The group ``group`` of a ``PackedPreferenceCollator`` batch, ``None`` for a padded batch."""
        prefix = f"{PACKED_PREFIX}{group}_"
        if f"{prefix}input_ids" not in batch:
            return None
        return cls(**{name: batch[prefix + name] for name in ("input_ids", "position_ids", "sequence_ids", "last_index")},
                   completion_mask=batch.get(f"{prefix}completion_mask"))
