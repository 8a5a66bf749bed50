"""Services that die mid-run (issue 14 item 2): `rlhf run` in a tiny workspace against real servers.

- The tracking server (a real ``mlflow server``) killed by PID while SFT trains: SFT finishes and
  keeps its model (dvc.lock records it), nothing after it runs, the run ends within about a minute
  of the kill with one message naming the server and the stage, and what could not be logged is
  kept on disk; with the server back, ``rlhf sync`` sends it: the SFT run then holds its metrics,
  curves and output hashes and is FINISHED, the parent run FAILED.
- The DVC remote (moto's S3) up when the run starts (the preflight checks it) and stopped once the
  run is under way, before the push: the run fails with one message naming the remote, and the
  MLflow parent run is FINISHED with its summary, tagged ``dvc.push=failed``, so ``rlhf compare``
  lists it.
- A Prefect server the run was pointed at (``PREFECT_API_URL``) killed while SFT trains: the stages go on (Prefect
  reports task states as events, which it only warns about), the MLflow parent run ends FINISHED, and the run ends
  with one message naming the server, no traceback, with SFT in dvc.lock.

The only wall-time assertion is a generous bound that a hang (MLflow's default ~4 min of retries
per call, as before) would break.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml

from tests.run_watch import parent_run, rlhf, runs, wait_for_stage_run
from tests.servers import free_port, running_mlflow_server, running_prefect_server
from tests.workspace_factory import make_workspace, run

pytestmark = pytest.mark.slow

ENDS_WITHIN_S = 120.0  # "within about a minute" of the outage (~20 s here); a hang takes minutes


def test_a_tracking_server_killed_mid_stage_keeps_the_model_and_sync_completes_the_runs(tmp_path):
    store = tmp_path / "server"
    store.mkdir()
    port = free_port()
    with running_mlflow_server(store, port) as (uri, server):
        # Short per-request bounds: the test is about what happens, not the default bound (33 s a call, README).
        # SFT long enough for the server to die in the middle of it (the tiny default's 12 steps can end first).
        ws = make_workspace(tmp_path / "ws", [f"tracking.uri={uri}", "tracking.timeout_s=3", "tracking.max_retries=1",
                                              "sft.max_steps=300", "sft.eval_steps=150", "sft.save_steps=150"])
        proc = rlhf(ws, "run", "--no-push")
        wait_for_stage_run(store / "mlflow.db", proc, "sft")
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, as a crash would
        died = time.monotonic()
        out, err = proc.communicate(timeout=600)
    assert time.monotonic() - died < ENDS_WITHIN_S, err[-3000:]
    assert proc.returncode == 1, err[-3000:]
    message = err[err.index("[rlhf] the MLflow tracking server"):]
    assert uri in message and "during stage 'sft'" in message and "rlhf sync" in message, message
    assert err.count("[rlhf] the MLflow tracking server") == 1 and "Traceback" not in out + err, err[-3000:]
    assert "Retrying" not in err  # MLflow's bounded retries are not shown one by one
    # SFT's model is kept and recorded; nothing after it ran
    assert (ws / "models" / "sft" / "model.safetensors").exists()
    assert yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["sft"]["outs"]
    assert not (ws / "models" / "reward").exists()
    pending = sorted(p.name.split("-")[0] for p in (ws / ".rlhf" / "tracking_pending").iterdir())
    assert pending == ["pipeline", "sft"]

    with running_mlflow_server(store, port) as (uri, _):  # the server is back, on the same store
        sync = rlhf(ws, "sync")
        out, err = sync.communicate(timeout=300)
        assert sync.returncode == 0, err[-3000:]
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        sft = client.get_run(runs(store / "mlflow.db")["sft"][1])
        assert sft.info.status == "FINISHED"
        written = json.loads((ws / "metrics" / "sft.json").read_text())
        assert {k for k, v in written.items() if isinstance(v, (int, float))} <= set(sft.data.metrics)
        assert "dvc.hash.models/sft" in sft.data.tags
        assert {"plots/train.csv", "plots/eval.csv"} <= {a.path for a in client.list_artifacts(sft.info.run_id, "plots")}
        assert [m.step for m in client.get_metric_history(sft.info.run_id, "train/loss")]  # the curve, not just the end
        status, parent = parent_run(store / "mlflow.db")
        assert status == "FAILED" and client.get_run(parent).data.tags["prefect.flow_run_id"]
    assert not list((ws / ".rlhf" / "tracking_pending").iterdir())


def test_a_remote_down_at_the_push_fails_the_run_but_its_record_is_complete(tmp_path):
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    import boto3

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", **{k.lower(): v for k, v in aws.items() if "KEY" in k},
                 region_name="us-east-1").create_bucket(Bucket="remote")
    try:
        ws = make_workspace(tmp_path / "ws")
        run(["dvc", "remote", "add", "-d", "-f", "s3", "s3://remote/rlhf"], ws)
        run(["dvc", "remote", "modify", "s3", "endpointurl", f"http://127.0.0.1:{port}"], ws)
        proc = rlhf(ws, "run", "--stage", "ingest", env=aws)
        # The preflight found the remote answering; it goes away once the run is under way (its parent run
        # exists: the ingest stage and the push are still ahead).
        deadline = time.monotonic() + 300
        while not any(name.startswith("pipeline-") for name in runs(ws / "mlflow.db")):
            assert proc.poll() is None, f"rlhf run ended early:\n{proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "the pipeline's parent run did not appear within 300 s"
            time.sleep(0.1)
    finally:
        moto.stop()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    assert err.count("[rlhf] pushing the outputs to the DVC remote 's3'") == 1 and "Traceback" not in out + err, err[-3000:]
    assert f"127.0.0.1:{port}" in err and "`dvc push`" in err

    from mlflow import MlflowClient

    from tasks.compare import pipeline_runs

    status, parent = parent_run(ws / "mlflow.db")
    assert status == "FINISHED"
    record = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}").get_run(parent)
    assert record.data.tags["dvc.push"] == "failed" and "ingest/seconds" in record.data.metrics
    assert parent in [r.info.run_id for r in pipeline_runs(ws, None, last=5)]  # what `rlhf compare` lists


def test_a_prefect_server_that_goes_away_mid_run_ends_it_with_one_message_and_keeps_what_ran(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    with running_prefect_server(home) as (api, server):
        ws = make_workspace(tmp_path / "ws", ["sft.max_steps=100", "sft.eval_steps=50", "sft.save_steps=50"])
        # No client retries: the engine's last call (the flow run's final state) fails at once instead of after ~80 s.
        proc = rlhf(ws, "run", "--no-push", *("--stage", "ingest", "--stage", "prepare", "--stage", "validate", "--stage", "sft"),
                    env={"PREFECT_API_URL": api, "PREFECT_CLIENT_MAX_RETRIES": "0"})
        wait_for_stage_run(ws / "mlflow.db", proc, "sft")
        os.killpg(server.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    message = err[err.index("[rlhf] the Prefect server"):]
    assert api in message and "stopped answering" in message and "What ran is kept" in message, message
    assert "Traceback" not in out + err, err[-3000:]
    assert yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["sft"]["outs"]  # SFT finished and is recorded
    assert runs(ws / "mlflow.db")["sft"][0] == "FINISHED" and parent_run(ws / "mlflow.db")[0] == "FINISHED"
