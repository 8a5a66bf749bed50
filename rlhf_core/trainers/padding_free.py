"""Whether a model keeps packed sequences apart, so padding-free batches (``rlhf_core.data.packing``) are exact.

Packing relies on two things the model must do: read ``position_ids`` (restarting at 0 for each
sequence) instead of counting positions along the row, and build its attention mask from them when no
``attention_mask`` is given. transformers' GPT-2, Llama and most decoders do both (``masking_utils``);
architectures that position tokens some other way do not: Bloom's ALiBi biases come from the attention
mask (its forward takes no ``position_ids``), and a remote-code model may ignore them. Rather than keep
a list, each trainer asks the model itself: a probe batch is run padded and packed, and packing is used
only when the per-token outputs agree. Otherwise the trainer says why and pads, as before.
"""

from __future__ import annotations

import torch

from rlhf_core.data.collate import pad
from rlhf_core.data.packing import pack_sequences
from rlhf_core.logprobs import causal_lm_logits, packed_causal_lm_logits
from rlhf_core.models.scalar_head import token_scores

PROBE_LENGTHS = (6, 3, 2, 4)
"""Packed into rows of 6 as [6], [4, 2] and [3 + 3 free]: a boundary inside a row and free space."""
TOLERANCE = 1e-4
"""Largest |packed − padded| output, relative to the largest |padded| output (at least 1), counted as equal.
fp32 agrees to ~1e-7; attention leaking across a boundary or wrong positions give 1e-3 (a random tiny
model) to 1e-1. For 16-bit weights the bound is raised to 4× the rounding noise of the padded outputs
themselves (the same batch in another layout), so rounding alone never passes for a leak."""


def _outputs(model: torch.nn.Module, scalar_head: bool, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Per-token outputs ``(R, W, ·)`` as float32: logits of a causal LM, scores of a scalar-head model."""
    if scalar_head:
        out = token_scores(model, input_ids, attention_mask, position_ids=position_ids).unsqueeze(-1)
    elif attention_mask is not None:
        out = causal_lm_logits(model, input_ids, attention_mask)
    else:
        out = packed_causal_lm_logits(model, input_ids, position_ids)
    return out.float()


@torch.no_grad()
def packing_error(model: torch.nn.Module, *, scalar_head: bool = False) -> tuple[float, float]:
    """``(error, noise)`` on a probe batch, both relative to the padded outputs' scale.

    ``error``: largest |packed − padded| per-token output. ``noise``: the same between the padded batch
    and that batch in reverse order with 3 more pad columns (equal in exact arithmetic: rounding only).
    Raises whatever the model raises when called with ``position_ids`` and no attention mask.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    device = next(model.parameters()).device
    sequences = [[(7 * i + 3 * t + 1) % config.vocab_size for t in range(n)] for i, n in enumerate(PROBE_LENGTHS)]
    width = max(PROBE_LENGTHS)

    def padded(seqs, length):
        ids = pad(seqs, 0, length=length).to(device)  # (B, T)
        return ids, pad([[1] * len(s) for s in seqs], 0, length=length).to(device)  # (B, T) mask

    packed = {k: v.to(device) for k, v in pack_sequences(sequences, 0).items()}
    was_training = model.training
    model.eval()  # no dropout
    try:
        ids, mask = padded(sequences, width)
        reference = _outputs(model, scalar_head, ids, attention_mask=mask)  # (B, T, ·)
        wide = _outputs(model, scalar_head, *padded(sequences[::-1], width + 3))  # (B, T + 3, ·), rows reversed
        flat = _outputs(model, scalar_head, packed["input_ids"], position_ids=packed["position_ids"]).flatten(0, 1)
    finally:
        model.train(was_training)
    error = noise = 0.0
    for s, n in enumerate(PROBE_LENGTHS):
        last = int(packed["last_index"][s])
        error = max(error, float((flat[last - n + 1 : last + 1] - reference[s, :n]).abs().max()))
        noise = max(noise, float((wide[len(sequences) - 1 - s, :n] - reference[s, :n]).abs().max()))
    scale = max(float(reference[mask.bool()].abs().max()), 1.0)
    return error / scale, noise / scale


def padding_free_is_exact(*models: torch.nn.Module | None, scalar_head: bool = False) -> bool:
    """True when every given model keeps packed sequences apart; otherwise prints why it does not."""
    for model in (m for m in models if m is not None):
        name = type(model).__name__
        try:
            error, noise = packing_error(model, scalar_head=scalar_head)
        except (TypeError, ValueError, RuntimeError) as err:  # e.g. a forward without position_ids (Bloom)
            print(f"[rlhf] padding_free: {name} cannot run packed rows ({type(err).__name__}: {err}); "
                  "training on padded batches")
            return False
        half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
        if error > (max(TOLERANCE, 4 * noise) if half else TOLERANCE):
            print(f"[rlhf] padding_free: {name} does not keep packed sequences apart (outputs differ from the "
                  f"padded ones by {error:.2g}: its attention or positions ignore position_ids); "
                  "training on padded batches")
            return False
    return True
