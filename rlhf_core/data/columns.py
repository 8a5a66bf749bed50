"""Rename a source's columns to the names its format expects, before the format is detected.

Public datasets name the same fields differently: Orca DPO pairs have ``question`` for the prompt,
StackExchange-paired ``question``/``response_j``/``response_k``. A mapping ``{column in the data:
column a format expects}`` (``prepare.<role>_columns`` in params.yaml) renames them; every other
column keeps its name, and the formats in ``rlhf_core.data.formats`` then apply as usual.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def check_mapping(mapping: Mapping[str, str] | None, name: str = "columns") -> dict[str, str]:
    """``mapping`` as a dict, checked: text keys and values, no two columns renamed to the same name.

    Raises:
        ValueError: naming ``name`` (the setting) and the offending entry.
    """
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{name} must be a mapping {{column in your data: column the format expects}}, got {mapping!r}")
    for old, new in mapping.items():
        if not isinstance(old, str) or not isinstance(new, str) or not old or not new:
            raise ValueError(f"{name}: every entry must map a column name to a column name, got {old!r}: {new!r}")
    targets: dict[str, str] = {}
    for old, new in mapping.items():
        if new in targets:
            raise ValueError(f"{name}: both {targets[new]!r} and {old!r} are renamed to {new!r}")
        targets[new] = old
    return dict(mapping)


def check_columns(columns: Sequence[str], mapping: Mapping[str, str], label: str) -> None:
    """Every renamed column is in the data, and no new name collides with a column that stays.

    Raises:
        DataFormatError: naming the source (``label``), the column and the columns found.
    """
    from rlhf_core.data.formats import DataFormatError  # imports datasets: the configs' check above must not

    missing = [old for old in mapping if old not in columns]
    if missing:
        raise DataFormatError(f"{label}: cannot rename {missing}: no such column; found {list(columns)}")
    kept = set(columns) - set(mapping)
    clashes = [f"{old!r} -> {new!r}" for old, new in mapping.items() if new in kept]
    if clashes:
        raise DataFormatError(
            f"{label}: renaming {', '.join(clashes)} would collide with a column of the same name that the data already "
            f"has; found {list(columns)} (rename that one too, or drop it from the mapping)"
        )


def renamed(record: Mapping[str, Any], mapping: Mapping[str, str]) -> dict[str, Any]:
    """``record`` with its columns renamed by ``mapping`` (others unchanged, order kept)."""
    return {mapping.get(key, key): value for key, value in record.items()}
