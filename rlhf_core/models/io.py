"""Saving models (safetensors only, LoRA merged) and the keyword arguments every loader shares."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DType = str | torch.dtype | None

BORROWED_PAD = "_rlhf_borrowed_pad_token_id"
"""Set on a model whose ``config.pad_token_id`` was borrowed for batching (see :func:`borrow_pad_token_id`)."""


def borrow_pad_token_id(model: torch.nn.Module, pad_token_id: int) -> None:
    """Give ``model.config`` a pad id for this process only; :func:`save_model` does not write it.

    transformers' ``*ForSequenceClassification`` refuses batches without ``config.pad_token_id``.
    Saved, the id would change what a later load computes: Llama-style models build their
    embedding with ``padding_idx = config.pad_token_id``, and that row (here: eos) then gets no
    gradient. So the borrowed id stays in memory and the saved config keeps the checkpoint's.
    """
    model.config.pad_token_id = pad_token_id
    setattr(model, BORROWED_PAD, True)


def resolve_dtype(dtype: DType) -> str | torch.dtype | None:
    """Check a ``dtype`` argument: ``None``, ``"auto"``, a torch dtype, or its name (``"bfloat16"``)."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be 'auto', a torch dtype or its name such as 'bfloat16' or 'float32', got {dtype!r}")


def pretrained_kwargs(*, trust_remote_code: bool, dtype: DType) -> dict[str, Any]:
    """``from_pretrained`` keywords shared by all loaders.

    ``use_safetensors=True``: weights are never unpickled from ``.bin`` files (pickle can run code).
    ``trust_remote_code`` is passed explicitly so a checkpoint's custom code runs only when asked.
    ``dtype=None`` leaves transformers' default (``"auto"``: the dtype the checkpoint was saved in).
    """
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": bool(trust_remote_code)}
    resolved = resolve_dtype(dtype)
    if resolved is not None:
        kwargs["dtype"] = resolved
    return kwargs


def save_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    *,
    merge_lora: bool = True,
) -> torch.nn.Module:
    """Write ``model`` (and ``tokenizer``, see ``tokenizer.save_tokenizer``) to ``out_dir`` as safetensors.

    A peft model is merged first when ``merge_lora`` (W ← W + (α/r)·BA, adapters removed) so the
    result loads as a plain transformers model; peft merges **in place**, so use the returned
    model afterwards. With ``merge_lora=False`` only the adapter (and, for SEQ_CLS, the score head)
    is written, in peft's format.

    Returns:
        The model that was saved (the merged base model when a merge happened).

    Raises:
        RuntimeError: if a pickled ``.bin`` weight file ended up in ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge_lora:
        model = model.merge_and_unload()
        is_peft = False
    if is_peft:
        model.save_pretrained(str(out_dir), safe_serialization=True)
    else:
        borrowed = getattr(model, BORROWED_PAD, False)
        pad_token_id = model.config.pad_token_id
        if borrowed:
            model.config.pad_token_id = None
        try:  # transformers 5 writes only safetensors (its save_pretrained has no other format).
            model.save_pretrained(str(out_dir))
        finally:
            model.config.pad_token_id = pad_token_id
    if tokenizer is not None:
        from rlhf_core.models.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, out_dir)  # a pretrained tokenizer's own files, unchanged
    pickled = sorted(p.name for p in out_dir.glob("*.bin") if p.name != "training_args.bin")
    if pickled:
        raise RuntimeError(f"save_model wrote pickled weight files {pickled} to {out_dir}; expected safetensors only")
    return model
