"""The warm stage host (``tasks.stage_host``): a stage command run through it behaves as the command run by itself.

Each test runs a real host process and real commands (``python -c`` calling ``run_hosted``, as ``tasks.launch``
does) against a throw-away ``tasks`` package in a temporary folder: the child must use that folder's code, not the
host's, with the command's arguments, environment, working directory and standard streams.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.stage_host import HOST_ENV, hosted, is_ready

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ("import sys; from tasks.stage_host import run_hosted; status = run_hosted('tasks.probe', sys.argv[1:]); "
          "print('hosted' if status is not None else 'not hosted', file=sys.stderr); "
          "sys.exit(3 if status is None else status)")
PROBE = """
import os, sys, time
print("cwd", os.getcwd(), "args", sys.argv[1:], "env", os.environ.get("PROBE_VALUE"), "pid", os.getpid(), flush=True)
print("host env seen:", os.environ.get("RLHF_STAGE_HOST"), flush=True)
print("version", VERSION, flush=True)
if sys.argv[1:] == ["sleep"]:
    try:
        print("sleeping", flush=True)  # inside the try: an interrupt from now on is the stage's to handle
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
sys.exit(int(sys.argv[1]) if sys.argv[1:] and sys.argv[1].isdigit() else 0)
"""

RELAY = f"""
import os, signal, subprocess, sys
proc = subprocess.Popen([sys.executable, "-c", {CLIENT!r}, *sys.argv[1:]])
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `dvc repro` does while its stage's command runs
print("relay pid", os.getpid(), flush=True)
sys.exit(proc.wait())
"""
"""What ``dvc repro`` is to a stage: a hosted command whose own child (the stage's command) asks the host in turn."""


def _package(where: Path, version: str) -> Path:
    (where / "tasks").mkdir(parents=True)
    (where / "tasks" / "__init__.py").write_text("")
    (where / "tasks" / "probe.py").write_text(f"VERSION = {version!r}\n" + textwrap.dedent(PROBE))
    (where / "tasks" / "relay.py").write_text(RELAY)
    (where / "tasks" / "stage_host.py").write_text((ROOT / "tasks" / "stage_host.py").read_text())
    return where


def _command(cwd: Path, host: dict, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, **host, "PROBE_VALUE": f"from-{cwd.name}"}
    return subprocess.Popen([sys.executable, "-c", CLIENT, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@pytest.fixture
def host():
    with hosted(preload=("json",)) as env:  # a cheap preload: the mechanics, not the import savings, are tested here
        assert env[HOST_ENV]
        yield env


def test_the_child_runs_the_commands_own_code_arguments_environment_and_exit_status(tmp_path, host):
    one, two = _package(tmp_path / "one", "1"), _package(tmp_path / "two", "2")
    for cwd, version, code in ((one, "1", "0"), (two, "2", "7"), (one, "1", "5")):
        proc = _command(cwd, host, code)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == int(code), err
        assert "hosted" in err and "not hosted" not in err
        assert f"cwd {cwd}" in out and f"args ['{code}']" in out and f"env from-{cwd.name}" in out
        assert f"version {version}" in out  # each folder's own tasks package, never one kept from an earlier child
        assert "host env seen: None" in out  # the child runs the stage; it does not ask the host again
        assert f"pid {proc.pid}" not in out  # it ran in the host's child, not in the command's process


def test_ctrl_c_reaches_the_stage_and_its_exit_status_comes_back(tmp_path, host):
    proc = _command(_package(tmp_path / "ws", "1"), host, "sleep")
    _wait_for_line(proc, "sleeping")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in out


def test_a_command_killed_with_its_process_group_takes_the_stage_with_it(tmp_path, host):
    proc = _command(_package(tmp_path / "ws", "1"), host, "sleep", start_new_session=True)
    child = int(_wait_for_line(proc, "cwd").split("pid ")[1])
    os.killpg(proc.pid, signal.SIGKILL)  # what `rlhf` does to a stage's `dvc repro` group after its grace period
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_hosted_command_whose_child_asks_the_host_again_passes_exit_status_ctrl_c_and_kill_through(tmp_path, host):
    ws = _package(tmp_path / "ws", "1")  # `python -m tasks.stage_host run dvc repro ...` -> stage command -> stage

    def relay(*args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tasks.stage_host", "run", "tasks.relay", *args], cwd=ws, text=True,
                                env={**os.environ, **host, "PROBE_VALUE": "relayed"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **kwargs)

    proc = relay("7")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 7 and "env relayed" in out and "version 1" in out
    assert "hosted" in err and "not hosted" not in err  # the stage's command found the host through the relay
    assert f"relay pid {proc.pid}" not in out  # the relay ran in the host's child too

    proc = relay("sleep", start_new_session=True)
    _wait_for_line(proc, "sleeping")
    os.killpg(proc.pid, signal.SIGINT)  # what `rlhf` sends a stage's `dvc repro` group on Ctrl-C
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in out  # the relay ignored it; the innermost stage got it

    proc = relay("sleep", start_new_session=True)
    pids = [int(_wait_for_line(proc, prefix).rsplit(" ", 1)[1]) for prefix in ("relay pid", "cwd")]
    os.killpg(proc.pid, signal.SIGKILL)  # after the grace period: the command's group, outright
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(map(_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_alive, pids))  # the hosted relay, its stage command and the hosted stage


def test_dvc_goes_through_a_host_once_it_has_imported_everything(tmp_path):
    from tasks.dvc_ops import dvc_command

    assert dvc_command("status", env={HOST_ENV: str(tmp_path / "nobody-listens.sock")}) == ["dvc", "status"]
    for preload in (("json", "csv"), ()):  # a host with nothing to import is ready at once
        with hosted(preload=preload) as env:
            deadline = time.monotonic() + 30
            while not is_ready(env[HOST_ENV]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert dvc_command("status", env=env) == [sys.executable, "-m", "tasks.stage_host", "run", "dvc", "status"]
    assert not is_ready(env[HOST_ENV]) and dvc_command("status", env=env) == ["dvc", "status"]  # gone with its host


def test_without_a_host_or_with_another_python_the_command_runs_the_stage_itself(tmp_path):
    ws = _package(tmp_path / "ws", "1")
    proc = _command(ws, {HOST_ENV: str(tmp_path / "nobody-listens.sock")})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 3 and "not hosted" in err
    proc = subprocess.run([sys.executable, "-m", "tasks.stage_host", "run", "tasks.relay"], cwd=ws, text=True, timeout=30,
                          capture_output=True, env={**os.environ, HOST_ENV: "off"})
    assert proc.returncode == 3 and "not hosted" in proc.stderr and "relay pid" in proc.stdout  # run by a fresh interpreter
    with hosted(preload=()) as env:
        other = tmp_path / "python"
        other.symlink_to(sys.executable)  # the same interpreter under another name: the host refuses it
        proc = subprocess.run([str(other), "-c", CLIENT], cwd=ws, env={**os.environ, **env}, text=True, capture_output=True,
                              timeout=30)
        assert proc.returncode == 3 and "not hosted" in proc.stderr


def test_the_host_leaves_with_the_process_that_started_it(tmp_path):
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tasks.stage_host import hosted\n"
              "with hosted(preload=()) as env:\n    print(env['RLHF_STAGE_HOST'], flush=True); time.sleep(60)\n")
    starter = subprocess.Popen([sys.executable, "-c", script, str(ROOT)], stdout=subprocess.PIPE, text=True)
    sock = starter.stdout.readline().strip()
    hosts = _host_pids(sock)
    assert len(hosts) == 1
    starter.kill()  # the flow killed outright: no chance to stop its host
    starter.wait()
    deadline = time.monotonic() + 10
    while _alive(hosts[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(hosts[0])


def _wait_for_line(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r}; stderr: {proc.stderr.read()}")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _host_pids(sock: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline_has(p, sock)]


def _cmdline_has(proc_dir: Path, text: str) -> bool:
    try:
        return text in (proc_dir / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
