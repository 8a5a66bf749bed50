"""Shared test set-up: offline, quiet, deterministic, small.

Every test runs without network access beyond 127.0.0.1 and without ../shared
(fixtures cut from the shared datasets live in tests/fixtures with their origin).
"""

from __future__ import annotations

import os

# Offline and telemetry-free before any library import reads these.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "WANDB_DISABLED": "true",
    # Tiny models on 2 shared cores: one thread per process avoids oversubscription (the tests
    # run servers and DVC stage processes beside the test process); also inherited by subprocesses.
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_key, _value)

import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# A suite started in the background of a non-interactive shell (`pytest &`) inherits SIGINT ignored, and so would every
# process the tests start (an ignored signal stays ignored across exec): the Ctrl-C tests would then send a signal no
# process can receive. They test Ctrl-C as a terminal delivers it.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Subprocesses (dvc, python -m tasks.<stage>) must use this environment's executables.
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"

pytest_plugins = ["tests.learning_fixtures", "tests.servers"]


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store per test module (created once; stages run in process track to it)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


LONGEST_FIRST = (
    "test_recurring.py", "test_flow.py", "test_pipeline_dvc.py", "test_interrupts.py", "test_outages.py",
    "test_multiprocess.py", "test_offline_methods.py", "test_real_data.py", "test_ppo.py", "test_trainers.py",
    "test_tracking.py", "test_validate_stage.py", "test_pretrained_pipeline.py", "test_ingest.py", "test_grpo.py",
)
"""Test files that take longest (whole pipeline runs, learning tests), measured on 2 cores: handed to the xdist
workers first (``--no-loadscope-reorder`` in pyproject.toml keeps this order; xdist's default puts files with many
tests first, which left the longest file to start last and run alone at the end)."""


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Longest files first; everything else keeps pytest-randomly's shuffled order (a stable sort)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test starts with no Accelerate state: a test that trains in mixed precision in this process (the GPU
    benchmark's tiny bf16 run) would otherwise leave its settings to the next one's ``Accelerator``, which refuses
    different ones. A stage process starts fresh in the same way."""
    yield
    state = sys.modules.get("accelerate.state")
    if state is not None:
        state.AcceleratorState._reset_state(reset_partial_state=True)
