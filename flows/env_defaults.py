"""Environment defaults for offline, quiet runs (set only where the user has not set them)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

QUIET_OFFLINE = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # The temporary Prefect server can take longer than Prefect's 20 s default on 2 busy cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # S3 (a DVC remote, an s3:// source): 3 attempts per request instead of botocore's 5, so a dead
    # endpoint fails a push in seconds. Timeouts per remote: `dvc remote modify NAME connect_timeout 10`.
    "AWS_MAX_ATTEMPTS": "3",
}


def apply(project_dir: Path) -> None:
    for key, value in QUIET_OFFLINE.items():
        os.environ.setdefault(key, value)
    # `dvc` and the stages' `python -m tasks.<stage>` must be this environment's, also when
    # `.venv/bin/rlhf` is called without activating the virtual environment.
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if not os.environ.get("PREFECT_API_URL"):
        # Embedded default: a temporary Prefect server whose SQLite database lives in the project.
        os.environ.setdefault("PREFECT_HOME", str(project_dir / ".prefect"))
