"""``params.yaml``: the one parameter source. Loading, typed groups, and overrides.

Overrides (``rlhf run --set dpo.beta=0.2``) are written into ``params.yaml`` itself before
the stages run, as ``dvc exp run -S`` does, so ``dvc.lock`` records what ran. Only the
overridden values' text changes; every other byte of the file stays as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhf_core.config import config_from_dict

T = TypeVar("T")


class ParamsError(ValueError):
    """A problem with params.yaml or an override; the message names the file and key."""


def load_params(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path}: no such parameters file (a workspace is a clone of the pipeline's repository, with "
                          "params.yaml and dvc.yaml: run from there, or pass --workspace PATH)")
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


def _scalar_text(value: Any) -> str:
    """``value`` as a one-line YAML scalar (``null``, ``true``, ``0.2``, ``'a: b'``, ``[1, 2]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _value_end(line: str, start: int) -> int:
    """Where a plain or quoted scalar that starts at ``start`` ends (before spaces and a ``#`` comment)."""
    if line[start:start + 1] in ("'", '"'):
        quote, i = line[start], start + 1
        while i < len(line):
            if line[i] == quote and not (quote == "'" and line[i + 1:i + 2] == "'"):
                return i + 1
            i += 2 if quote == "'" and line[i:i + 2] == "''" else 1
        return len(line)
    comment = line.find(" #", start)
    end = len(line) if comment < 0 else comment
    return len(line[:end].rstrip())


def apply_overrides(path: Path, overrides: list[str], check: Callable[[dict[str, Any]], None] | None = None,
                    *, write: bool = True) -> dict[str, Any]:
    """Write ``overrides`` into ``path``; return {dotted key: (old, new)} for each.

    The edit is minimal: only the overridden value's text changes (a key a group lacks, e.g. a
    config field left at its default, is added as one line at the end of the group); every other
    line, comment and ``null`` stays byte-identical. Nothing is written unless every override
    parses, names a key inside an existing group (never a whole group) and, when ``check`` is
    given, the resulting parameters pass it (e.g. every stage's typed config builds). With
    ``write=False`` everything is checked and nothing is written (a preflight).
    """
    from ruamel.yaml import YAML  # round-trip loader: gives each key's line and column

    if not overrides:
        if check is not None:
            check(load_params(path))
        return {}
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    doc = YAML().load(text)
    changed: dict[str, Any] = {}
    for override in overrides:
        parts, value = parse_override(override)
        if len(parts) < 2:
            groups = ", ".join(doc) if isinstance(doc, dict) else ""
            raise ParamsError(f"override {override!r}: {parts[0]} is a group of {path.name}, not a parameter; "
                              f"set one of its keys, e.g. {parts[0]}.KEY=VALUE (groups: {groups})")
        node = doc
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                where = ".".join(parts[:depth + 1])
                known = f" (known: {', '.join(map(str, node))})" if isinstance(node, dict) else ""
                raise ParamsError(f"override {override!r}: {where} is not a group in {path.name}{known}")
            node = node[part]
        leaf = parts[-1]
        if isinstance(node.get(leaf), dict):
            raise ParamsError(f"override {override!r}: {'.'.join(parts)} is a nested group in {path.name}; "
                              "set its keys one by one")
        new, old = _scalar_text(value), node.get(leaf)
        if isinstance(old, list) and not old.fa.flow_style():  # a block list: its item lines become one flow value
            key_row, key_col = node.lc.key(leaf)
            end = key_row + 1
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > key_col):
                end += 1
            while end > key_row + 1 and not lines[end - 1].strip():
                end -= 1
            del lines[key_row + 1:end]
            body = lines[key_row].rstrip("\r\n")
            colon = body.index(":", key_col)
            comment = body[colon + 1:].strip()
            lines[key_row] = body[:colon + 1] + " " + new + (f"  {comment}" if comment.startswith("#") else "") + "\n"
        elif leaf in node:
            row, col = node.lc.value(leaf)
            line = lines[row]
            eol = line[len(line.rstrip("\r\n")):]
            body = line[: len(line) - len(eol)]
            lines[row] = body[:col] + new + body[_value_end(body, col):] + eol
        else:
            last_row, key_col = node.lc.key(list(node)[-1])
            end = last_row + 1  # after the group's last key (and its nested lines, if any)
            while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > key_col):
                end += 1
            while end > last_row + 1 and not lines[end - 1].strip():
                end -= 1
            lines.insert(end, " " * key_col + f"{leaf}: {new}\n")
        changed[".".join(parts)] = (old, value)
        doc = YAML().load("".join(lines))  # positions for the next override
    edited = "".join(lines)
    try:
        result = yaml.safe_load(edited)
    except yaml.YAMLError as err:  # a value our line edit cannot express
        raise ParamsError(f"override {overrides!r}: the edited {path.name} would not be valid YAML: {err}") from err
    if check is not None:
        check(result)
    if not write:
        return changed
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(edited)
    tmp.replace(path)
    return changed
