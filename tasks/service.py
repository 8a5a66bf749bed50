"""What is in service: the ``@champion`` and the recent runs' decisions (``rlhf status``), and
putting a run's policy in service by hand (``rlhf promote RUN_ID --force``)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.registry import CHAMPION, find_version_of_run, set_alias, tag_version, version_by_alias


@dataclass
class ServiceStatus:
    model: str
    champion: Any | None
    """The ``@champion`` ModelVersion, or None."""
    runs: list[Any]
    """Recent pipeline parent runs, newest first (their ``promotion.*`` tags carry each decision)."""


def service_status(project_dir: Path, tracking: dict[str, Any] | None, *, last: int = 10) -> ServiceStatus:
    from tasks.compare import pipeline_runs
    from tasks.tracking.client import connect

    store = connect(project_dir, tracking)
    champion = version_by_alias(store.client, store.registered_model, CHAMPION)
    return ServiceStatus(store.registered_model, champion, pipeline_runs(project_dir, tracking, last=last, finished_only=False))


def force_promote(project_dir: Path, tracking: dict[str, Any] | None, run_id: str) -> tuple[str, str | None]:
    """Make the version registered by pipeline run ``run_id`` (or by a stage run with that id) the champion,
    whatever its evidence; recorded as forced on the version and the run. Returns (new, previous) versions."""
    from tasks.tracking.client import connect

    store = connect(project_dir, tracking)
    client, name = store.client, store.registered_model
    version = find_version_of_run(client, name, run_id)
    if version is None:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        version = found[0] if found else None
    if version is None:
        raise ValueError(f"no version of model {name!r} was registered by run {run_id!r} (see `rlhf status`)")
    previous = version_by_alias(client, name, CHAMPION)
    set_alias(client, name, CHAMPION, version.version)
    tag_version(client, name, version.version, {
        "promotion.decision": "forced", "promotion.previous_champion": previous.version if previous else "-",
    })
    parent = version.tags.get("pipeline.run_id") or run_id
    with contextlib.suppress(Exception):  # the parent run may have been deleted; the registry is the record
        client.set_tag(parent, "promotion.decision", f"forced: version {version.version} made @champion by hand")
    return version.version, previous.version if previous else None
