"""``auto`` length settings: resolved from the prepared data's token lengths, capped by the model's context.

Every length setting in ``params.yaml`` may be ``auto`` instead of a number:

=========================  ====================================================================
setting                    ``auto`` resolves to (P: the ``prepare.length_percentile``-th
                           percentile of the prepared data's token counts; C: the model's context)
=========================  ====================================================================
validate.max_prompt_tokens min(P(prompt) of the kind with the longest prompts, C − 1)
sft.max_length             min(P(prompt + completion) of the SFT data, C)
reward/dpo.max_length      min(P(prompt + longer response) of the preference pairs, C)
*.max_prompt_length        min(P(prompt) of the stage's data, its max_length − 1)
ppo, grpo.max_new_tokens   min(P(response) of the preference pairs, max(C − P(prompt), C // 4)),
                           P(prompt) over the preference and held-out prompts: responses get the
                           room prompts leave, but at least a quarter of the context
evaluate.max_new_tokens    the same as ppo.max_new_tokens
ppo, grpo.max_length       min(P(prompt) + max_new_tokens, C)
=========================  ====================================================================

``prepare`` counts the tokens (with the run's tokenizer and chat template, as the trainers encode
them) and writes ``data/prepared/lengths/{sft,preference,prompts}.json`` (the percentile, the
context length, and n/P/max/mean of each part), plus what ``auto`` would give for every setting
into ``metrics/prepare.json`` (``lengths/auto/<setting>``). A stage with an ``auto`` setting
reads the file of its data (a DVC dependency of the stage, so new data re-resolves it) and
records the value it used in ``metrics/<stage>.json`` and MLflow (``lengths/<setting>``).
The explicit numbers in ``params.yaml`` stay the default: ``auto`` is opt-in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.workspace import Workspace

AUTO = "auto"
KIND_FILES = {"sft": "sft", "preference": "preference", "prompt": "prompts"}
"""Kind of data -> its lengths file name (the prompt split is ``prompts.jsonl``)."""

SETTINGS: dict[str, tuple[str, ...]] = {
    "validate": ("max_prompt_tokens",),
    "sft": ("max_length", "max_prompt_length"),
    "reward": ("max_length", "max_prompt_length"),
    "dpo": ("max_length", "max_prompt_length"),
    "ppo": ("max_new_tokens", "max_length"),  # max_length after max_new_tokens: it adds it
    "grpo": ("max_new_tokens", "max_length"),
    "evaluate": ("max_new_tokens",),
}
"""Stage group -> the settings that may be ``auto``, in resolution order."""

NEEDS: dict[str, tuple[str, ...]] = {
    "validate": ("sft", "preference", "prompt"), "sft": ("sft",), "reward": ("preference",), "dpo": ("preference",),
    "ppo": ("preference", "prompt"), "grpo": ("preference", "prompt"), "evaluate": ("preference", "prompt"),
}
"""Stage group -> the kinds of data whose lengths its ``auto`` settings read."""


class LengthsError(ValueError):
    """An ``auto`` length cannot be resolved (no lengths file: the data was prepared by an older version)."""


def lengths_file(ws: Workspace, kind: str) -> Path:
    return ws.prepared / "lengths" / f"{KIND_FILES[kind]}.json"


def context_length(config: Any) -> int | None:
    """The longest sequence a model config accepts (``max_position_embeddings``, GPT-2's ``n_positions``...).

    ``None`` when the config states none (e.g. recurrent models): lengths are then not capped.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _cap(value: int, limit: int | None) -> int:
    return value if limit is None else min(value, limit)


def _p(stats: dict[str, Any], kind: str, part: str) -> int:
    try:
        return int(stats[kind]["parts"][part]["p"])
    except KeyError:
        raise LengthsError(f"no {part} lengths for the {kind} data in data/prepared/lengths; re-run prepare") from None


def _prompt(stats: dict[str, Any]) -> int:
    """P(prompt) of what is generated from: the preference pairs' prompts (PPO rollouts) and the held-out prompts."""
    return max(_p(stats, kind, "prompt") for kind in ("preference", "prompt") if kind in stats)


def resolve(stage: str, group: dict[str, Any], stats: dict[str, Any]) -> dict[str, int]:
    """The ``auto`` settings of one stage group, as numbers (see the module docstring's table).

    ``group``: the stage's settings as in ``params.yaml``; ``stats``: {kind: contents of its lengths file}.
    A setting given as a number is used as it is by the rules that build on it.
    """
    values = dict(group)
    resolved: dict[str, int] = {}
    context = next((s.get("context_length") for s in stats.values()), None)
    kind = "sft" if stage == "sft" else "preference"
    for key in SETTINGS.get(stage, ()):
        if values.get(key) != AUTO:
            continue
        if stage == "validate":
            value = _cap(max(_p(stats, k, "prompt") for k in NEEDS["validate"] if k in stats), None if context is None else context - 1)
        elif key == "max_length" and stage in ("sft", "reward", "dpo"):
            value = _cap(_p(stats, kind, "total"), context)
        elif key == "max_prompt_length":
            if values.get("max_length") in (None, AUTO):
                raise LengthsError(f"{stage}.max_prompt_length: auto needs max_length (a number or auto)")
            value = min(_p(stats, kind, "prompt"), int(values["max_length"]) - 1)
        elif key == "max_new_tokens":
            room = None if context is None else max(context - _prompt(stats), context // 4)
            value = _cap(_p(stats, "preference", "completion"), room)
        elif key == "max_length" and stage in ("ppo", "grpo"):
            if values.get("max_new_tokens") in (None, AUTO):
                raise LengthsError(f"{stage}.max_length: auto needs {stage}.max_new_tokens (a number or auto)")
            value = _cap(_prompt(stats) + int(values["max_new_tokens"]), context)
        else:  # a setting listed in SETTINGS without a rule
            raise LengthsError(f"{stage}.{key}: no rule for auto")
        values[key] = resolved[key] = max(int(value), 2 if key == "max_length" else 1)
    return resolved


def read_stats(ws: Workspace, kinds: tuple[str, ...]) -> dict[str, Any]:
    stats = {}
    for kind in kinds:
        path = lengths_file(ws, kind)
        if path.is_file():
            stats[kind] = json.loads(path.read_text())
    return stats


def with_auto_lengths(params: dict[str, Any], ws: Workspace, stage: str) -> tuple[dict[str, Any], dict[str, int]]:
    """``params`` with the stage group's ``auto`` lengths resolved, and ``{"lengths/<stage>.<key>": value}`` used.

    Unchanged (and ``{}``) when the group has no ``auto`` setting.
    """
    group = params.get(stage) or {}
    if not any(group.get(key) == AUTO for key in SETTINGS.get(stage, ())):
        return params, {}
    stats = read_stats(ws, NEEDS[stage])
    missing = [lengths_file(ws, k).relative_to(ws.root).as_posix() for k in NEEDS[stage] if k not in stats]
    if missing:
        raise LengthsError(f"{stage}: 'auto' lengths need {', '.join(missing)}, written by prepare; re-run prepare")
    resolved = resolve(stage, group, stats)
    for key, value in resolved.items():
        print(f"[{stage}] {key}: auto -> {value}")
    return {**params, stage: {**group, **resolved}}, {f"lengths/{stage}.{key}": value for key, value in resolved.items()}


def auto_everywhere(stats: dict[str, Any]) -> dict[str, int]:
    """What ``auto`` resolves to for every setting: ``{"<stage>.<key>": value}`` (for ``metrics/prepare.json``)."""
    out: dict[str, int] = {}
    for stage, keys in SETTINGS.items():
        group = {key: AUTO for key in keys}
        try:
            out.update({f"{stage}.{key}": value for key, value in resolve(stage, group, stats).items()})
        except LengthsError:
            continue
    return out
