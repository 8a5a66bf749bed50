"""Python values as MLflow stores them: params flattened to dotted strings, their hash, finite metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

PARAM_VALUE_LIMIT = 6000  # MLflow 3.x param value limit (it was 500 before MLflow 2.3 / 250 before 1.x)


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as dotted keys with string values: ``{"sft": {"lr": 1e-4}}`` -> ``{"sft.lr": "0.0001"}``.

    Values longer than MLflow's limit (:data:`PARAM_VALUE_LIMIT`) are cut, with a warning.
    An empty mapping is kept as the value ``"{}"``.
    """
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, name + "."))
            continue
        text = str(value)
        if len(text) > PARAM_VALUE_LIMIT:
            logger.warning("param %s is %d chars; MLflow keeps %d, logging it cut", name, len(text), PARAM_VALUE_LIMIT)
            text = text[: PARAM_VALUE_LIMIT - 3] + "..."
        out[name] = text
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``params`` (sorted keys, no spaces; non-JSON values as str)."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float (a metric MLflow accepts), or None for strings, None, non-scalars, NaN and inf."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        number = float(value)  # ints, bools, numpy and 0-d torch scalars
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None
