"""The MLflow Model Registry: registering a trained policy, and the ``@champion`` in service.

Every run that trains a new policy registers it as a version of ``tracking.registered_model``
(alias ``@challenger``); the ``promote`` stage moves ``@champion`` to it only when it beats the
current champion (``rlhf_core.promotion``). Decisions are recorded as tags on the model version
(``promotion.*``) and on the runs. The registry is reached through a client bound to the URI.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

CHAMPION = "champion"
CHALLENGER = "challenger"
# What a logged model needs to be served; explicit, else MLflow infers torchvision (STACK-NOTES).
MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


def _requirement(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{package}=={version(package).split('+')[0]}"  # drop local tags such as +cpu
    except PackageNotFoundError:
        return package


@contextmanager
def _active(run_id: str) -> Iterator[None]:
    """Make ``run_id`` MLflow's active run for the block, leaving its status as it was.

    ``mlflow.transformers.log_model`` logs into the active run only. When ``run_id`` is
    already active (called inside :func:`stage_run`) nothing changes; otherwise the run is
    resumed and its previous status restored (a parent run may still be RUNNING elsewhere).
    """
    import mlflow
    from mlflow import MlflowClient

    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    client = MlflowClient()
    status = client.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield
    if status != "FINISHED":
        client.update_run(run_id, status=status)


def _model_card(name: str, tags: Mapping[str, Any]) -> Any:
    """A Hugging Face model card naming the model's lineage (shown with the logged model)."""
    from huggingface_hub import ModelCard

    lines = "\n".join(f"- `{k}`: `{v}`" for k, v in tags.items())
    return ModelCard(f"---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n# {name}\n\nLineage:\n{lines}\n")


def register_model(
    run_id: str, model: Any, tokenizer: Any, name: str, tags: Mapping[str, Any], *, alias: str | None = CHALLENGER
) -> ModelVersion:
    """Log an in-memory causal LM + tokenizer into run ``run_id`` and register it as ``name``.

    Logged with ``mlflow.transformers.log_model`` (task ``text-generation``, explicit pip
    requirements; objects, not a checkpoint path, which crashes with transformers 5.23).
    ``tags`` (lineage: git commit, data digest, params hash, ...) go on the model version,
    ``alias`` (if any) points at it. Uses the current tracking URI (set by :func:`stage_run`).
    """
    import mlflow
    import mlflow.transformers
    from mlflow import MlflowClient

    with _active(run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=[_requirement(p) for p in MODEL_REQUIREMENTS],
            model_card=_model_card(name, tags),  # else MLflow asks the hub for one
        )
    version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


def version_by_alias(client: MlflowClient, name: str, alias: str = CHAMPION) -> ModelVersion | None:
    """The version ``name@alias`` points at, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@contextmanager
def downloaded_model(tracking_uri: str, name: str, version: str) -> Iterator[tuple[Path, Path]]:
    """A registered version's files in a temporary folder: (model folder, tokenizer folder),
    as ``mlflow.transformers.log_model`` wrote them (plain ``from_pretrained`` folders)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="rlhf-champion-") as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp,
                                                        tracking_uri=tracking_uri))
        yield root / "model", root / "components" / "tokenizer"


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    client.set_registered_model_alias(name, alias, version)


def tag_version(client: MlflowClient, name: str, version: str, tags: Mapping[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def find_version_of_run(client: MlflowClient, name: str, parent_run_id: str) -> ModelVersion | None:
    """The version registered by pipeline run ``parent_run_id`` (tag ``pipeline.run_id``)."""
    found = client.search_model_versions(f"name = '{name}' and tags.`pipeline.run_id` = '{parent_run_id}'")
    return found[0] if found else None
