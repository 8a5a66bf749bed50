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


def _model_card(name: str, tags: Mapping[str, Any]) -> Any:
    """A Hugging Face model card naming the model's lineage (shown with the logged model)."""
    from huggingface_hub import ModelCard

    lines = "\n".join(f"- `{k}`: `{v}`" for k, v in tags.items())
    return ModelCard(f"---\nlibrary_name: transformers\npipeline_tag: text-generation\n---\n\n# {name}\n\nLineage:\n{lines}\n")


def register_model(
    client: MlflowClient, run_id: str, model: Any, tokenizer: Any, name: str, tags: Mapping[str, Any], *,
    alias: str | None = CHALLENGER,
) -> ModelVersion:
    """Log an in-memory causal LM + tokenizer as a model of run ``run_id`` and register it as ``name``.

    What ``mlflow.transformers.log_model(..., registered_model_name=name)`` does, through ``client``
    (whose URI it is; the run may be RUNNING in another process and stays so): a LoggedModel
    output of the run, saved by ``mlflow.transformers.save_model`` (task ``text-generation``,
    explicit pip requirements; objects, not a checkpoint path, which crashes with
    transformers 5.23) and uploaded, then a model version. ``tags`` (lineage: git commit, data
    digest, params hash, ...) go on the version, ``alias`` (if any) points at it.
    """
    import mlflow.transformers
    from mlflow.entities import LoggedModelOutput
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    with tempfile.TemporaryDirectory(prefix="rlhf-model-") as tmp:
        mlflow.transformers.save_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            path=str(Path(tmp) / "model"),
            task="text-generation",
            pip_requirements=[_requirement(p) for p in MODEL_REQUIREMENTS],
            model_card=_model_card(name, tags),  # else MLflow asks the hub for one
            mlflow_model=Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id,
                               model_id=logged.model_id),
        )
        client.log_model_artifacts(logged.model_id, str(Path(tmp) / "model"))
    client.finalize_logged_model(logged.model_id, "READY")
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    # The source is the logged model's artifact location, not "models:/<id>": a database registry store resolves
    # that URI through MLflow's global tracking URI (an MLflow TODO), i.e. a store other than this client's.
    version = client.create_model_version(name, logged.artifact_location, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()}, model_id=logged.model_id)
    note_version_on_logged_model(client, logged.model_id, name, version.version)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def note_version_on_logged_model(client: MlflowClient, model_id: str, name: str, version: str | int) -> None:
    """List ``name`` ``version`` in the logged model's ``mlflow.modelVersions`` tag, where MLflow's UI looks for the
    registered versions of a run's models. An ``mlflow server`` does it as it creates the version; a client writing
    to a database store (the embedded SQLite default) does not, so it is done here (once: an entry already there stays)."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if any(entry.get("name") == name and str(entry.get("version")) == str(version) for entry in listed):
        return
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, {"name": name, "version": str(version)}])})


def version_by_alias(client: MlflowClient, name: str, alias: str = CHAMPION) -> ModelVersion | None:
    """The version ``name@alias`` points at, or None (no such model or alias yet). Any other error raises: a
    tracking server that does not answer is not "no champion" (promote would crown against the reference)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no such model; no such alias
            return None
        raise


@contextmanager
def downloaded_model(client: MlflowClient, name: str, version: str) -> Iterator[tuple[Path, Path]]:
    """A registered version's files in a temporary folder: (model folder, tokenizer folder),
    as ``mlflow.transformers.save_model`` wrote them (plain ``from_pretrained`` folders)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory(prefix="rlhf-champion-") as tmp:
        # The version's storage location through this client's registry ("models:/..." would use the global one).
        location = client.get_model_version_download_uri(name, version)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp, tracking_uri=client.tracking_uri))
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
