"""``params.yaml``: the one parameter source. Loading, typed groups, and overrides.

Overrides (``rlhf run --set dpo.beta=0.2``) are written into ``params.yaml`` itself before
the stages run, as ``dvc exp run -S`` does, so ``dvc.lock`` records what ran. The file is
edited round-trip (comments and order kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhf_core.config import config_from_dict

T = TypeVar("T")


class ParamsError(ValueError):
    """A problem with params.yaml or an override; the message names the file and key."""


def load_params(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path}: no such parameters file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of groups at the top level")
    return data


def group(params: dict[str, Any], name: str) -> dict[str, Any]:
    if name not in params:
        raise ParamsError(f"params.yaml has no '{name}' group (groups: {sorted(params)})")
    return params[name] or {}


def typed(params: dict[str, Any], name: str, cls: type[T], **fixed: Any) -> T:
    """Group ``name`` as dataclass ``cls``; ``fixed`` fields (e.g. output_dir) are set by the stage."""
    values = {**group(params, name), **fixed}
    try:
        return config_from_dict(cls, values, section=name)
    except ValueError as err:
        raise ParamsError(f"params.yaml: {err}") from err


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"dpo.beta=0.2"`` -> (["dpo", "beta"], 0.2); the value is read as YAML (numbers, bools, null, lists)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r}: expected KEY=VALUE, e.g. dpo.beta=0.2")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ParamsError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ParamsError(f"override {text!r}: value is not valid YAML: {err}") from err
    return parts, value


def apply_overrides(path: Path, overrides: list[str]) -> dict[str, Any]:
    """Write ``overrides`` into ``path`` (keeping comments); return {dotted key: (old, new)} changed.

    The group (every part but the last) must exist in params.yaml; a new last key is added
    (e.g. a config field left at its default). A key no stage knows fails in that stage's typed
    config, which names the known keys.
    """
    from ruamel.yaml import YAML  # round-trip editor that DVC also uses

    if not overrides:
        return {}
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text())
    changed: dict[str, Any] = {}
    for text in overrides:
        parts, value = parse_override(text)
        node = doc
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"override {text!r}: {'.'.join(parts[:depth + 1])} is not in {path.name}")
            if node[part] is None and depth == len(parts) - 2:
                node[part] = {}
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, dict):
            raise ParamsError(f"override {text!r}: {'.'.join(parts)} is not in {path.name}")
        old = node.get(leaf)
        node[leaf] = value
        changed[".".join(parts)] = (old, value)
    tmp = path.with_suffix(".yaml.tmp")
    with tmp.open("w") as fh:
        rt.dump(doc, fh)
    tmp.replace(path)
    return changed
