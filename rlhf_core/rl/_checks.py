"""Input checks shared by the RL math: same shapes, boolean masks, contiguous masks."""

from __future__ import annotations

import torch
from torch import Tensor


def require_same_shape(fn: str, **tensors: Tensor) -> None:
    """Raise ``ValueError`` naming ``fn`` and every argument's shape unless all shapes agree."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"{fn}: arguments must have the same shape, got {listed}")


def as_bool_mask(mask: Tensor) -> Tensor:
    """``mask`` (any dtype, 1/True = real token) as a bool tensor of the same shape."""
    return mask if mask.dtype == torch.bool else mask != 0


def require_contiguous_rows(fn: str, mask: Tensor) -> None:
    """Raise ``ValueError`` unless every row of ``mask`` (B, T) is ``0…0 1…1 0…0``.

    A row may start and end with zeros (prompt on the left, padding after EOS on the right)
    but its ones must form one block; an all-zero row passes (callers check emptiness).
    """
    m = as_bool_mask(mask).to(torch.int8)  # (B, T)
    # A block starts wherever a 1 follows a 0 (or opens the row): count starts per row.
    starts = m[:, 0] + (m[:, 1:] - m[:, :-1]).clamp(min=0).sum(dim=1)  # (B,)
    bad = (starts > 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"{fn}: mask rows must be one contiguous block of ones (left zeros for the prompt, "
            f"right zeros for padding); rows {bad[:10]} have gaps"
        )
