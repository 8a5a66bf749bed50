"""Preflight: every stage's settings checked before any stage runs, in one report.

Each ``params.yaml`` group is built into the typed config its stage loads (unknown keys, wrong
types, out-of-range values and cross-field rules fail there, naming ``group.key``), with the keys a
stage reads itself (``ppo.reward_fn``, ``grpo.rewards``, each policy's ``train``) checked here and
``auto`` lengths left to the stage that resolves them. ``rlhf run`` and the flow run it on
``params.yaml`` plus the overrides before writing them; a stage run by hand runs it on its own group.

:func:`check_services` then asks what the run will reach, one short request each: the tracking
server, the DVC remote it will push to, the data sources ``prepare`` names and the model folder. ``rlhf run`` runs
both before it starts anything (:func:`preflight`); the flow runs them again as its first task
(the deployments, which start it without ``rlhf run``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.params import ParamsError


def group_configs() -> dict[str, type]:
    """The typed config of each ``params.yaml`` group (the class its stage loads it into)."""
    from rlhf_core.trainers.grpo.config import GRPOConfig  # the config modules, not the trainers: no torch here
    from rlhf_core.trainers.ppo.config import PPOConfig
    from rlhf_core.trainers.train_config import DPOConfig, RewardConfig, SFTConfig
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


REACH_TIMEOUT_S = 5.0
"""One request per service: connect and read timeouts of the tracking and remote checks."""
SOURCE_TIMEOUT_S = 10.0
"""Listing one data source (a local folder, an S3 prefix with a HEAD per file, a hub dataset's info)."""
NO_PUSH_HINT = "or run with --no-push (the outputs stay in the local DVC cache; `dvc push` sends them later)"


def _within(seconds: float, what: str, fn: Any) -> Any:
    """``fn()``'s result, or ``TimeoutError`` naming ``what`` after ``seconds`` (``fn`` is left to end in a daemon thread)."""
    import threading

    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # handed to the caller
            outcome["error"] = err

    worker = threading.Thread(target=call, name=f"preflight {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _writable_folder(path: Path) -> str | None:
    """Why ``path`` cannot be a DVC remote folder (``None`` when it is one, or can be made)."""
    import os

    if path.exists():
        if not path.is_dir():
            return f"{path} is not a folder"
        return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a folder, so {path} cannot be created"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{path} cannot be created ({parent} is not writable)"


def _s3_problem(config: dict[str, Any], timeout: float) -> str | None:
    """Why an ``s3://`` DVC remote does not answer: one listing request of its prefix (what ``dvc push`` needs first),
    with the remote's own endpoint, credentials, profile and TLS settings, ``timeout`` s, one attempt."""
    import boto3
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, prefix = config["url"][len("s3://"):].partition("/")
    core = botocore.session.Session()
    for key, variable in (("credentialpath", "credentials_file"), ("configpath", "config_file"), ("profile", "profile")):
        if config.get(key):
            core.set_config_variable(variable, config[key])
    session = boto3.session.Session(botocore_session=core, region_name=config.get("region"),
                                    aws_access_key_id=config.get("access_key_id"),
                                    aws_secret_access_key=config.get("secret_access_key"),
                                    aws_session_token=config.get("session_token"))
    unsigned = config.get("allow_anonymous_login") and session.get_credentials() is None
    client = session.client("s3", endpoint_url=config.get("endpointurl"), use_ssl=config.get("use_ssl", True),
                            verify=config.get("ssl_verify", True),
                            config=Config(connect_timeout=timeout, read_timeout=timeout,
                                          retries={"total_max_attempts": 1, "mode": "standard"},
                                          **({"signature_version": UNSIGNED} if unsigned else {})))
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404", "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "InvalidToken"):
            return _one_line(err)
        return None  # it answered (e.g. a region redirect, which DVC follows)
    except BotoCoreError as err:  # no connection, a timeout, no credentials
        return _one_line(err)
    return None


def check_remote(root: Path, remote: str | None = None, timeout: float = REACH_TIMEOUT_S) -> None:
    """The DVC remote ``dvc push`` will send the outputs to (``remote``, else the repo's default) can take them.

    A local (filesystem) remote: its folder exists and is writable, or can be created. ``s3://``: the
    bucket answers a listing of the remote's prefix (:func:`_s3_problem`). Any other scheme (gs, azure,
    ssh, http, ...): DVC's own filesystem for the remote is asked whether the remote's path exists,
    within ``timeout`` s (this loads the scheme's DVC plugin; one without it fails here as the push
    would). A remote whose path does not exist yet passes: the push creates it.
    """
    from tasks.dvc_ops import remote_config

    try:
        found = remote_config(root, remote)
    except KeyError as err:
        raise ParamsError(f"{err.args[0]}: name one of them with --remote, or run with --no-push") from None
    except Exception as err:  # not a DVC repository, an unreadable config
        raise ParamsError(f"cannot read the DVC remotes of {root} ({_one_line(err)}): the run needs a DVC repository "
                          "(`dvc init`)") from None
    if found is None:
        raise ParamsError("no DVC remote to push the outputs to: add one with `dvc remote add -d NAME URL`, name one with "
                          "--remote, or run with --no-push")
    name, config = found
    url = str(config.get("url", ""))
    where = f"the DVC remote '{name}' ({url}{', endpoint ' + config['endpointurl'] if config.get('endpointurl') else ''})"
    if "://" not in url:
        if (problem := _writable_folder(Path(url))) is not None:
            raise ParamsError(f"{where} cannot take the outputs: {problem}; fix it (`dvc remote modify {name} url PATH`), "
                              + NO_PUSH_HINT)
        return
    try:
        if url.startswith("s3://"):
            problem = _s3_problem(config, timeout)
        else:
            def exists() -> None:
                from dvc.repo import Repo

                with Repo(str(root)) as repo:
                    target = repo.cloud.get_remote(name)
                    target.fs.exists(target.path)

            _within(timeout, f"remote {name}", exists)
            problem = None
    except Exception as err:
        problem = _one_line(str(err) or type(err).__name__)
    if problem is not None:
        raise ParamsError(f"{where} does not answer ({problem}): start it or fix its settings (`dvc remote modify {name} "
                          f"...`), {NO_PUSH_HINT}")


def source_as_staged(uri: str, root: Path) -> str:
    """``uri`` as the stages read it: they run in the workspace ``root``, so a relative local path is ``root``'s."""
    from rlhf_core.data.loading import looks_like_path

    if "://" in uri:
        return uri
    path = Path(uri).expanduser()
    if path.is_absolute():
        return str(path)
    return str(root / path) if (root / path).exists() or looks_like_path(uri) else uri  # else a hub dataset's name


def check_sources(root: Path, params: dict[str, Any], timeout: float = SOURCE_TIMEOUT_S) -> list[str]:
    """Each data source ``prepare`` names answers (:func:`tasks.sources.list_source`, within ``timeout`` s) and
    its local files can be read; returns one line per problem, naming the setting (``prepare.<key>``)."""
    from rlhf_core.data.loading import DataLoadError
    from tasks.sources import ROLES, configured_sources, kind_of, list_source

    problems = []
    for role, uri in configured_sources(params).items():
        setting = f"prepare.{ROLES[role]}"
        staged = source_as_staged(uri, root)
        try:
            files = _within(timeout, setting, lambda staged=staged: list_source(staged))
            if kind_of(staged) == "local":
                for file in files:
                    with open(file.uri, "rb") as handle:
                        handle.read(1)
        except (DataLoadError, OSError) as err:  # TimeoutError is an OSError
            reason = _one_line(err)
            if isinstance(err, PermissionError):
                reason = f"{err.filename}: not readable (permission denied)"
            elif isinstance(err, TimeoutError):
                reason = f"{staged}: {reason}"
            relative = (f" (relative to the workspace {root})" if staged != uri and not Path(uri).expanduser().is_absolute()
                        else "")
            problems.append(f"{setting} = {uri!r}{relative}: {reason}; fix {setting} in params.yaml or --set {setting}=...")
    return problems


def check_model(root: Path, params: dict[str, Any], timeout: float = SOURCE_TIMEOUT_S) -> list[str]:
    """``model.name_or_path``, when set, is a model the stages can load (:mod:`tasks.model_folder`); one line if not."""
    from tasks.model_folder import model_problem

    name = (params.get("model") or {}).get("name_or_path")
    problem = model_problem(str(name), root, timeout) if name else None
    return [f"model.name_or_path = {name!r}: {problem}; fix model.name_or_path in params.yaml or --set "
            "model.name_or_path=..."] if problem else []


def check_services(root: Path, params: dict[str, Any], *, push: bool = True, remote: str | None = None,
                   tracking_uri: str | None = None) -> None:
    """What a run reaches, one short request each, all problems in one :class:`ParamsError` (one line each): the
    tracking server (``tracking_uri``, else ``params``' resolved against ``root``), the DVC remote when
    ``push`` (:func:`check_remote`), the data sources (:func:`check_sources`) and the model (:func:`check_model`)."""
    from tasks.tracking.client import resolve_tracking_uri

    problems = []
    uri = tracking_uri or resolve_tracking_uri((params.get("tracking") or {}).get("uri"), root)
    checks = [lambda: check_tracking_server(uri)] + ([lambda: check_remote(root, remote)] if push else [])
    for check in checks:
        try:
            check()
        except ParamsError as err:
            problems.append(str(err))
    problems += check_sources(root, params)
    problems += check_model(root, params)
    if problems:
        raise ParamsError("\n  ".join(["the run cannot reach what it needs:", *problems]) if len(problems) > 1 else problems[0])


def preflight(root: Path, overrides: list[str], *, push: bool = True, remote: str | None = None) -> dict[str, Any]:
    """Before ``rlhf run`` starts anything: ``params.yaml`` with ``overrides`` (not written) passes
    :func:`check_params`, then :func:`check_services` (the tracking server, the DVC remote when ``push``,
    the data sources). Returns those parameters."""
    from tasks.params import apply_overrides

    checked: dict[str, Any] = {}

    def check(params: dict[str, Any]) -> None:
        check_params(params)
        checked.update(params)

    apply_overrides(root / "params.yaml", overrides, check=check, write=False)
    check_services(root, checked, push=push, remote=remote)
    return checked
