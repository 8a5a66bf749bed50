"""``params.yaml`` and the typed configs state each default once: every value in ``params.yaml`` equals
the default of the config field it sets, so a config built without ``params.yaml`` (a test, a
notebook, ``rlhf_core`` used as a library) trains what the default pipeline run trains.

When a default changes, change it in both places (this test names each disagreement).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from tasks.preflight import group_configs, nested_configs, stage_keys

ROOT = Path(__file__).resolve().parents[1]


def _defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def disagreements(params: dict[str, Any]) -> list[str]:
    """``key: params.yaml value != config default`` for every value that differs (or has no config field)."""
    found: list[str] = []

    def compare(prefix: str, values: dict[str, Any], cls: type, extra: dict[str, Any]) -> None:
        defaults = _defaults(cls)
        for key, value in values.items():
            name = f"{prefix}.{key}"
            if name in nested_configs():
                compare(name, value or {}, nested_configs()[name], {})
            elif key in extra:
                if value != extra[key]:
                    found.append(f"{name}: params.yaml {value!r} != the stage's default {extra[key]!r}")
            elif key not in defaults:
                found.append(f"{name}: no field of {cls.__name__} (and no default)")
            elif dataclasses.is_dataclass(defaults[key]):
                compare(name, value or {}, type(defaults[key]), {})
            elif value != defaults[key]:
                found.append(f"{name}: params.yaml {value!r} != {cls.__name__}.{key} default {defaults[key]!r}")

    configs = group_configs()
    for group, values in params.items():
        if group not in configs:
            found.append(f"{group}: a params.yaml group without a typed config in this test")
            continue
        compare(group, values or {}, configs[group], stage_keys().get(group, {}))
    return found


def test_every_params_yaml_value_is_its_typed_config_default():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert disagreements(params) == []


def test_the_check_names_a_drifted_default():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sft"]["learning_rate"] = params["sft"]["learning_rate"] * 2
    params["prepare"]["synthetic"]["n_pref_train"] += 1
    params["model"]["tiny"]["max_positions"] += 1
    params["dpo"]["no_such_key"] = 1
    found = "\n".join(disagreements(params))
    for name in ("sft.learning_rate", "prepare.synthetic.n_pref_train", "model.tiny.max_positions", "dpo.no_such_key"):
        assert name in found, found
