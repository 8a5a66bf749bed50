"""Promote and a tracking server that stops answering: an outage is never read as "no champion yet", and a
registry step it interrupts ends in one message naming the server, the step and what the registry holds."""

from __future__ import annotations

import time

import pytest

from tasks.promote import registry_step
from tasks.registry import version_by_alias
from tasks.tracking.outage import TrackingUnavailable
from tests.servers import free_port


@pytest.fixture()
def dead_store(tmp_path, monkeypatch):
    """A client of an MLflow server that is not there (a free port), with one attempt of 2 s per request."""
    from tasks.tracking.client import connect

    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(key, "0")  # restored after the test: connect() sets them for the process
    return connect(tmp_path, {"uri": f"http://127.0.0.1:{free_port()}", "timeout_s": 2, "max_retries": 0})


def test_no_model_or_no_alias_is_no_champion(tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert version_by_alias(client, "policy") is None  # no such model
    client.create_registered_model("policy")
    assert version_by_alias(client, "policy") is None  # no @champion yet


def test_a_server_that_does_not_answer_is_not_no_champion(dead_store):
    from mlflow.exceptions import MlflowException

    started = time.monotonic()
    with pytest.raises(MlflowException, match="API request to"):
        version_by_alias(dead_store.client, "policy")  # before: None, and promote crowned against the reference
    assert time.monotonic() - started < 30


def test_an_outage_in_a_registry_step_is_one_message_naming_the_step_and_what_is_registered(dead_store):
    with pytest.raises(TrackingUnavailable) as err, \
            registry_step(dead_store.uri, "reading the champion", "nothing was registered and @champion did not move"):
        version_by_alias(dead_store.client, "policy")
    message = str(err.value)
    assert message.startswith(f"the MLflow tracking server {dead_store.uri} stopped answering (Connection refused) while "
                              "promote was reading the champion: nothing was registered and @champion did not move.")
    assert "run the pipeline again" in message and "\n" not in message


def test_other_errors_pass_through_a_registry_step():
    with pytest.raises(ValueError, match="not an outage"), registry_step("http://127.0.0.1:1", "moving @champion", "-"):
        raise ValueError("not an outage")
