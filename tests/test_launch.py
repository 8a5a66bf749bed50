"""``tasks.launch``: how many processes a training stage gets, the command and environment that start them, and how
a launched worker follows its launcher. No training here (``tests/test_multiprocess.py`` runs the launches)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import tasks.launch as launch
from tests.workspace_factory import PROJECT


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("RLHF_NUM_PROCESSES", "RLHF_NUM_GPUS", "ACCELERATE_CONFIG_FILE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "_cuda_gpus", lambda: 0)
    return monkeypatch


def test_processes_come_from_rlhf_num_processes_then_the_legacy_gpu_count_then_the_gpus(clean_env):
    assert launch.configured_processes() == 1  # no GPU, nothing set: in this process
    clean_env.setattr(launch, "_cuda_gpus", lambda: 4)
    assert launch.configured_processes() == 4
    clean_env.setenv("RLHF_NUM_GPUS", "2")
    assert launch.configured_processes() == 2
    clean_env.setenv("RLHF_NUM_PROCESSES", "3")
    assert launch.configured_processes() == 3
    for bad in ("0", "two"):
        clean_env.setenv("RLHF_NUM_PROCESSES", bad)
        with pytest.raises(SystemExit, match="RLHF_NUM_PROCESSES"):
            launch.configured_processes()


def test_cpu_and_gpu_processes_start_with_the_same_command_and_differ_only_in_the_backend_flag(clean_env):
    assert launch.launch_command("sft", 1) is None
    cmd = launch.launch_command("ppo", 2)
    assert cmd[:3] == ["accelerate", "launch", "--multi_gpu"] and cmd[-2:] == ["-m", "tasks.ppo"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and cmd[cmd.index("--main_process_port") + 1] == "0"  # a free port
    base = {"PATH": "/bin"}
    cpu, gpu = launch.launch_env(2, cpu=True, environ=base), launch.launch_env(2, cpu=False, environ=base)
    assert cpu == {**gpu, "ACCELERATE_USE_CPU": "true"}
    assert int(gpu["OMP_NUM_THREADS"]) >= 1
    assert launch.launch_env(2, cpu=True, environ={"OMP_NUM_THREADS": "3"})["OMP_NUM_THREADS"] == "3"
    clean_env.setenv("ACCELERATE_CONFIG_FILE", "/cfg/fsdp.yaml")  # its distributed type (FSDP...) decides
    cmd = launch.launch_command("sft", 4)
    assert "--multi_gpu" not in cmd and cmd[cmd.index("--config_file") + 1] == "/cfg/fsdp.yaml"


class Replaced(Exception):
    """The launcher process became ``accelerate launch``."""


def test_the_stage_entry_point_execs_accelerate_launch_when_processes_are_configured(clean_env):
    started: list = []

    def execvpe(file, args, env):  # the real one replaces the process: it never returns
        started.append((file, args, env))
        raise Replaced

    clean_env.setattr(launch.os, "execvpe", execvpe)
    clean_env.setattr(launch.importlib, "import_module", lambda name: pytest.fail(f"{name} ran in-process"))
    clean_env.setenv("RLHF_NUM_PROCESSES", "2")
    with pytest.raises(Replaced):
        launch.main(["dpo"])
    (file, args, env), = started
    assert file == "accelerate" and args[-2:] == ["-m", "tasks.dpo"] and env["ACCELERATE_USE_CPU"] == "true"

    clean_env.setattr(launch, "_cuda_gpus", lambda: 1)  # more processes than GPUs: a clear error, nothing started
    with pytest.raises(SystemExit, match="2 training processes need 2 GPUs, 1 visible"):
        launch.main(["dpo"])
    assert len(started) == 1


WORKER = textwrap.dedent("""
    import os, sys, time
    from tasks.launch import follow_launcher
    follow_launcher()
    try:  # the pid line tells the test to signal: from here on the interrupt lands inside the try
        print(os.getpid(), flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
""")


def _worker(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER], cwd=PROJECT, env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE)


def test_a_launched_worker_turns_sigterm_into_keyboard_interrupt():
    worker = _worker({"LOCAL_RANK": "0"})
    worker.stdout.readline()  # follow_launcher has run
    worker.send_signal(signal.SIGTERM)
    assert worker.communicate(timeout=30)[0].strip() == "interrupted"


def test_a_launched_worker_dies_with_its_launcher(tmp_path):
    # A launcher (here a shell) starts the worker and is killed outright: the kernel kills the worker too.
    script = f"{sys.executable} -c '{WORKER}' & wait"
    launcher = subprocess.Popen(["sh", "-c", script], cwd=PROJECT, env={**os.environ, "LOCAL_RANK": "0"}, text=True,
                                stdout=subprocess.PIPE, start_new_session=True)
    pid = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 10
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the worker outlived its launcher")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
