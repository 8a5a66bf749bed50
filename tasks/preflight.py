"""Preflight: every stage's settings checked before any stage runs, in one report.

Each ``params.yaml`` group is built into the typed config its stage loads (unknown keys, wrong
types, out-of-range values and cross-field rules fail there, naming ``group.key``), with the keys a
stage reads itself (``ppo.reward_fn``, ``grpo.rewards``, each policy's ``train``) checked here and
``auto`` lengths left to the stage that resolves them. ``rlhf run`` and the flow run it on
``params.yaml`` plus the overrides before writing them; a stage run by hand runs it on its own group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.params import ParamsError


def group_configs() -> dict[str, type]:
    """The typed config of each ``params.yaml`` group (the class its stage loads it into)."""
    from rlhf_core.trainers.dpo import DPOConfig
    from rlhf_core.trainers.grpo import GRPOConfig
    from rlhf_core.trainers.ppo import PPOConfig
    from rlhf_core.trainers.reward_model import RewardConfig
    from rlhf_core.trainers.sft import SFTConfig
    from tasks.heldout import EvaluateConfig
    from tasks.model_config import ModelConfig
    from tasks.prepare import PrepareConfig
    from tasks.promote import PromoteConfig
    from tasks.tracking.client import TrackingConfig
    from tasks.validation.suites import ValidationConfig

    return {"model": ModelConfig, "prepare": PrepareConfig, "validate": ValidationConfig, "sft": SFTConfig,
            "reward": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig, "grpo": GRPOConfig, "evaluate": EvaluateConfig,
            "promote": PromoteConfig, "tracking": TrackingConfig}


def nested_configs() -> dict[str, type]:
    """Groups inside groups that a stage loads into a config of their own, not through their parent's field type."""
    from rlhf_core.models import TinyModelConfig

    return {"model.tiny": TinyModelConfig}  # ModelConfig keeps it as a dict: tasks/ must not import torch at import time


def stage_keys() -> dict[str, dict[str, Any]]:
    """Keys a stage reads itself beside its config, with the default it applies."""
    from tasks import grpo, ppo
    from tasks.policies import DEFAULT_TRAIN, TRAIN_KEY

    switches = {stage: {TRAIN_KEY: default} for stage, default in DEFAULT_TRAIN.items()}
    return {"ppo": {**{key: None for key in ppo.STAGE_KEYS}, **switches["ppo"]},  # ``group.get(key)``
            "dpo": switches["dpo"], "grpo": {"rewards": grpo.DEFAULT_REWARDS, **switches["grpo"]}}


def _check_stage_keys(group: str, values: dict[str, Any]) -> None:
    """The keys a stage reads itself: the policy switches, ``ppo.reward_fn`` and ``grpo.rewards``' names."""
    from tasks.policies import DEFAULT_TRAIN, selected

    if group in DEFAULT_TRAIN:
        selected({group: values}, group)
    if group == "ppo" and values.get("reward_fn") not in (None, "gold"):
        raise ParamsError(f"params.yaml: ppo.reward_fn must be null or 'gold', got {values['reward_fn']!r}")
    if group == "grpo":
        from rlhf_core.reward_registry import BUILTIN

        specs = values.get("rewards") or []
        if not isinstance(specs, list) or not all(isinstance(s, dict) and "name" in s for s in specs):
            raise ParamsError("params.yaml: grpo.rewards must be a list of {name: ..., weight: ..., <settings>} entries")
        unknown = [s["name"] for s in specs if s["name"] not in BUILTIN and ":" not in str(s["name"])]
        if unknown:
            raise ParamsError(f"params.yaml: grpo.rewards: unknown reward(s) {unknown}; built-ins are {sorted(BUILTIN)}, "
                              "or give an import path 'package.module:function'")


def check_group(params: dict[str, Any], group: str) -> None:
    """Build ``group``'s typed config (and its nested ones); raise :class:`ParamsError` naming the key and the rule."""
    from rlhf_core.config import config_from_dict
    from tasks.lengths import AUTO, SETTINGS

    configs = group_configs()
    if group not in configs:
        raise ParamsError(f"params.yaml: unknown group '{group}' (groups: {', '.join(configs)})")
    values = dict(params.get(group) or {})
    if not isinstance(params.get(group) or {}, dict):
        raise ParamsError(f"params.yaml: '{group}' must be a group of settings, got {params[group]!r}")
    own = stage_keys().get(group, {})
    _check_stage_keys(group, {k: values[k] for k in own if k in values})
    values = {k: v for k, v in values.items() if k not in own}
    lengths = SETTINGS.get(group, ())
    if any(values.get(key) == AUTO for key in lengths):
        # auto lengths are resolved from the data by the stage, which then checks them with the group's other
        # lengths (e.g. max_prompt_length < max_length): here an auto one would stand in as its default.
        values = {k: v for k, v in values.items() if k not in lengths}
    try:
        for name, cls in nested_configs().items():
            parent, _, child = name.partition(".")
            if parent == group and child in values:
                config_from_dict(cls, values[child], section=name)
        config_from_dict(configs[group], values, section=group)
    except ValueError as err:
        raise ParamsError(f"params.yaml: {err}") from err


def check_params(params: dict[str, Any]) -> None:
    """Every group of ``params``; all problems in one :class:`ParamsError`, one line each."""
    problems = []
    for group in params:
        try:
            check_group(params, group)
        except ParamsError as err:
            problems.append(str(err).removeprefix("params.yaml: "))
    if problems:
        raise ParamsError("params.yaml: " + ("\n  ".join(["settings that no stage accepts:", *problems])
                                             if len(problems) > 1 else problems[0]))


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """An ``http(s)`` MLflow tracking server answers ``/health`` within ``timeout`` seconds (one request, no retries)."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return  # a local store (sqlite, a folder) is created on first use
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        problem = str(getattr(err, "reason", err))
    raise ParamsError(f"the MLflow tracking server {uri} does not answer ({problem}): start it, or point tracking.uri / "
                      "$MLFLOW_TRACKING_URI at one that runs (unset both for the local sqlite store)")


def preflight(root: Path, overrides: list[str]) -> dict[str, Any]:
    """Before ``rlhf run`` starts anything: ``params.yaml`` with ``overrides`` (not written) passes
    :func:`check_params`, and the tracking server it names answers. Returns those parameters."""
    from tasks.params import apply_overrides
    from tasks.tracking.client import resolve_tracking_uri

    checked: dict[str, Any] = {}

    def check(params: dict[str, Any]) -> None:
        check_params(params)
        checked.update(params)

    apply_overrides(root / "params.yaml", overrides, check=check, write=False)
    check_tracking_server(resolve_tracking_uri((checked.get("tracking") or {}).get("uri"), root))
    return checked
