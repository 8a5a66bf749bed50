"""Training stages as ``RLHF_NUM_PROCESSES=2`` starts them: ``accelerate launch``, two processes on CPU (gloo).

Starting processes costs most here, so the module launches twice, with ``tasks.launch``'s command and
environment, and ``tests/multiprocess_driver.py`` runs several stages per launch through ``stage_main``:

1. GRPO, stopped by SIGTERM right after its first checkpoint (as torchrun passes a SIGTERM or Ctrl-C of the launcher
   on), then SFT, paused right after its first checkpoint and killed there: SIGKILL to the launcher's process group;
2. SFT, reward, DPO, PPO and GRPO, each in a workspace of its own, then the two stopped runs again (they resume).

The reference is one process, trained in the test process on the same inputs with twice the per-process batch sizes
(the same global batch); its SFT and reward models are the inputs of the two-process stages, so each stage is
compared on its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.launch import accelerate_command, launch_env
from tests.workspace_factory import PROJECT, TINY, TINY_GRPO, TINY_PPO, run_in_process, stage_workspace

pytestmark = pytest.mark.slow

N = 2
STAGES = ("sft", "reward", "dpo", "ppo", "grpo")
INPUT_MODELS = {"sft": (), "reward": ("sft",), "dpo": ("sft", "reward"), "ppo": ("sft", "reward"), "grpo": ("sft", "reward")}
COMMON = [
    *TINY, *TINY_PPO, *TINY_GRPO, "grpo.train=true", *(f"{s}.progress=false" for s in STAGES),
    "sft.max_steps=6", "sft.save_steps=3", "sft.eval_steps=3", "sft.logging_steps=3",
    "reward.max_steps=4", "reward.save_steps=2", "reward.eval_steps=2",
    "dpo.max_steps=4", "dpo.save_steps=2", "dpo.eval_steps=2", "dpo.overopt_prompts=8",
    # One optimizer step per update: N processes group a batch's rows into mini-batches differently than one does.
    # Rollouts sample in `generate` calls of 4 rows: a process's 8 prompts (GRPO: 2 × 4 responses) are whole calls.
    "ppo.ppo_epochs=1", "ppo.forward_batch_size=4", "grpo.forward_batch_size=4",
]
PER_PROCESS = {
    "sft.per_device_train_batch_size": 8, "reward.per_device_train_batch_size": 8, "dpo.per_device_train_batch_size": 8,
    "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 8, "grpo.prompts_per_update": 2, "grpo.mini_batch_size": 8,
}
STOPPED = {"grpo": (1, "sigterm"), "sft": (3, "pause")}
"""Stage: (the checkpoint after which it is stopped, how), in launch order."""
RELATIVE_TOLERANCE = 1e-2


def _params(n_processes: int) -> list[str]:
    return COMMON + [f"{key}={value * N // n_processes}" for key, value in PER_PROCESS.items()]


def _workspace(dest: Path, stage: str, reference: Path) -> Path:
    """A DVC project (``stage_main`` reads params through DVC) with the two-process params and the inputs of ``stage``
    that the one-process reference used: its data, tokenizer and input models."""
    ws, _ = stage_workspace(dest, _params(N))
    shutil.copytree(reference / ".dvc", ws.root / ".dvc")
    shutil.copytree(reference / "data", ws.root / "data")
    for model in INPUT_MODELS[stage]:
        shutil.copytree(reference / "models" / model, ws.root / "models" / model)
    return ws.root


@contextlib.contextmanager
def _launched(jobs: list[dict], tmp: Path, name: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """``accelerate launch`` of the driver in a process group of its own (killed on the way out if still running); its
    MLflow store is ``<name>.db``, its output ``<name>.log``, the driver's reports in ``report-<name>/``."""
    report = tmp / f"report-{name}"
    report.mkdir()
    plan = tmp / f"{name}.json"
    plan.write_text(json.dumps({"jobs": jobs, "report_dir": str(report)}))
    env = launch_env(N, cpu=True, environ={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / f'{name}.db'}"})
    with (tmp / f"{name}.log").open("w") as log:
        proc = subprocess.Popen(accelerate_command(N, ["-m", "tests.multiprocess_driver", str(plan)]), cwd=PROJECT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, report
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_for(condition, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, log.read_text()[-6000:]
        assert time.monotonic() < deadline, log.read_text()[-6000:]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    reference, params = stage_workspace(tmp / "one", _params(1))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=reference.root, check=True)
    run_in_process(params, reference, ("prepare", *STAGES))

    stopped = {s: _workspace(tmp / "stopped" / s, s, reference.root) for s in STOPPED}
    jobs = [{"workspace": str(stopped[s]), "stage": s, "stop_after": step, "stop": how} for s, (step, how) in STOPPED.items()]
    with _launched(jobs, tmp, "stopped") as (proc, report):
        _wait_for(lambda: all((report / f"paused.{r}").exists() for r in range(N)), proc, tmp / "stopped.log", 300)
        workers = [int((report / f"pid.{r}").read_text()) for r in range(N)]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 20
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [p for p in workers if _alive(p)]
    for p in survivors:  # never leave them running, whatever the test says
        os.kill(p, signal.SIGKILL)
    left = {s: sorted(str(p.relative_to(stopped[s])) for p in (stopped[s] / "checkpoints").rglob("checkpoint*[-_][0-9]*"))
            for s in STOPPED}
    outputs_left = [s for s in STOPPED if (stopped[s] / "models" / s).exists()]

    two = {s: _workspace(tmp / "two" / s, s, reference.root) for s in STAGES}
    jobs = [{"workspace": str(two[s]), "stage": s} for s in STAGES] + [{"workspace": str(stopped[s]), "stage": s} for s in STOPPED]
    with _launched(jobs, tmp, "main") as (proc, report):
        assert proc.wait(timeout=600) == 0, (tmp / "main.log").read_text()[-6000:]
    return {"one": reference.root, "two": two, "stopped": stopped, "survivors": survivors, "left": left,
            "outputs_left": outputs_left, "tmp": tmp, "params": params, "jobs": jobs,
            "reports": [json.loads((report / f"rank{r}.json").read_text()) for r in range(N)]}


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _starting_weights(runs: dict, stage: str) -> dict:
    """The weights ``stage`` starts from: the seeded from-scratch model (SFT), the SFT model with a seeded head (reward),
    the SFT model (the policies)."""
    from rlhf_core.models import load_reward_model
    from tasks.training_io import base_causal_lm, load_tokenizer
    from tasks.workspace import Workspace

    ws = Workspace(runs["one"])
    if stage == "sft":
        return base_causal_lm(runs["params"], load_tokenizer(ws), seed=runs["params"]["sft"]["seed"]).state_dict()
    if stage == "reward":
        return load_reward_model(str(ws.model("sft"))).state_dict()
    return _weights(ws.model("sft"))


def _distance(a: dict, b: dict) -> float:
    """L2 distance over the tensors both hold (a saved model leaves out tied copies)."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a.keys() & b.keys()))


def _eval_metrics(ws: Path, stage: str) -> dict[str, float]:
    metrics = json.loads((ws / "metrics" / f"{stage}.json").read_text())
    return {k: v for k, v in metrics.items() if k.startswith("eval/") and isinstance(v, float)}


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_train_as_one_process_given_the_whole_batch(runs, stage):
    """Two processes of B examples (prompts) each end where one process of 2B does, up to float rounding.

    Tolerance: the distance between the two final models is at most 1% of how far the reference moved from its
    starting weights (observed: below 0.2%), and each held-out metric agrees to 1% (relative, or 1e-3 absolute). Exact
    equality cannot be asked for: sums are taken in another order (per process, then across), padding widths differ,
    and Adam scales each gradient by its running RMS, so a parameter whose gradient is float noise in both runs (the
    reward model's final LayerNorm bias: it shifts both scores of a pair alike) moves by noise of the learning rate's
    size. What a broken data-parallel setup does (processes not averaging gradients, training on the same or on other
    examples, token means per process, repeated evaluation examples, rollouts sampled per process) moves the models
    and metrics apart by a large fraction of the update.
    """
    one, two = _weights(runs["one"] / "models" / stage), _weights(runs["two"][stage] / "models" / stage)
    moved = _distance(one, _starting_weights(runs, stage))
    assert moved > 0
    assert _distance(one, two) <= RELATIVE_TOLERANCE * moved, (_distance(one, two), moved)
    expected, got = _eval_metrics(runs["one"], stage), _eval_metrics(runs["two"][stage], stage)
    assert expected.keys() == got.keys() and len(expected) >= 3
    far = {k: (expected[k], got[k]) for k in expected
           if not math.isclose(expected[k], got[k], rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-3)}
    assert not far


def test_only_rank_zero_tracks_and_writes_the_stage_outputs(runs):
    from mlflow import MlflowClient

    rank0, rank1 = (set(r["writes"]) for r in runs["reports"])
    assert rank1 == set()  # not a file in any workspace (outside checkpoints/), no SQLite database: no MLflow run
    for job in runs["jobs"]:  # ... while the audit saw rank 0 write every output and track
        ws, stage = job["workspace"], job["stage"]
        assert f"os.rename {ws}/models/{stage}" in rank0 or f"os.replace {ws}/models/{stage}" in rank0
        assert f"open {ws}/metrics/{stage}.json.tmp" in rank0
    assert f"sqlite3.connect {runs['tmp'] / 'main.db'}" in rank0

    client = MlflowClient(f"sqlite:///{runs['tmp'] / 'main.db'}")
    tracked = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.data.tags["stage"] for r in tracked) == sorted(job["stage"] for job in runs["jobs"])
    assert {r.info.status for r in tracked} == {"FINISHED"}
    killed = MlflowClient(f"sqlite:///{runs['tmp'] / 'stopped.db'}")
    stopped = {r.data.tags["stage"]: r.info.status
               for r in killed.search_runs([e.experiment_id for e in killed.search_experiments()])}
    assert stopped == {"grpo": "KILLED", "sft": "RUNNING"}  # SIGTERM: marked by rank 0; SIGKILL: nothing can mark it


def test_a_stopped_launch_leaves_no_worker_and_resumes_to_the_uninterrupted_weights(runs):
    assert runs["survivors"] == []  # the workers died with their SIGKILLed launcher
    assert runs["outputs_left"] == []  # stopped mid-training...
    assert [p.split("/")[-1] for p in runs["left"]["sft"]] == ["checkpoint-3"]  # ...right after a checkpoint
    assert [p.split("/")[-1] for p in runs["left"]["grpo"]] == ["checkpoint_1"]
    log = (runs["tmp"] / "main.log").read_text()
    for stage in STOPPED:
        assert f"{runs['stopped'][stage]}/checkpoints/{stage}/" in log  # "resuming ... from <its checkpoint>"
        resumed, uninterrupted = _weights(runs["stopped"][stage] / "models" / stage), _weights(runs["two"][stage] / "models" / stage)
        assert resumed.keys() == uninterrupted.keys()
        assert all(resumed[k].equal(uninterrupted[k]) for k in resumed), stage  # the same arithmetic: bitwise


def test_sft_with_gradient_accumulation_trains_as_one_process_given_the_whole_batch(runs, tmp_path):
    """2 accumulated batches of 8 per step end where 16 per step do, and log the same loss: the SFT loss is the NLL over
    the step's scored tokens (as for N processes). Tolerance as above, for the same reasons."""
    from rlhf_core.trainers.sft import SFTConfig, train_sft
    from tasks.training_io import base_causal_lm, load_split, load_tokenizer
    from tasks.workspace import Workspace

    ws = Workspace(runs["one"])
    tokenizer, train, held_out = load_tokenizer(ws), load_split(ws, "sft_train"), load_split(ws, "sft_test")

    def trained(batch: int, accumulation: int) -> tuple[dict, dict[int, float]]:
        logged: dict[int, float] = {}
        cfg = SFTConfig(output_dir=str(tmp_path / str(batch)), max_steps=3, per_device_train_batch_size=batch,
                        gradient_accumulation_steps=accumulation, logging_steps=1, eval_steps=100, save_steps=100,
                        progress=False)
        result = train_sft(base_causal_lm(runs["params"], tokenizer, seed=0), tokenizer, train, held_out, cfg,
                           log_fn=lambda m, step: logged.update({step: m["train/loss"]} if "train/loss" in m else {}))
        return {k: v.detach().clone() for k, v in result.model.state_dict().items()}, logged

    (whole, whole_losses), (accumulated, accumulated_losses) = trained(16, 1), trained(8, 2)
    moved = _distance(whole, base_causal_lm(runs["params"], tokenizer, seed=0).state_dict())
    assert _distance(whole, accumulated) <= RELATIVE_TOLERANCE * moved, (_distance(whole, accumulated), moved)
    assert whole_losses.keys() == accumulated_losses.keys() == {1, 2, 3}
    assert all(math.isclose(whole_losses[s], accumulated_losses[s], rel_tol=1e-4) for s in whole_losses), (
        whole_losses, accumulated_losses)
