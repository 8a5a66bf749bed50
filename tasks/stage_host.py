"""A warm process that starts the stages of one pipeline run: the heavy imports once per run, not once per stage.

Each stage is a fresh ``python -m tasks.launch <stage>`` that DVC runs, and importing torch, transformers, datasets,
accelerate, MLflow and DVC's API cost it 4–7 s on 2 cores before it did anything (the default run has ten stages).
The flow starts one host per run (:func:`hosted`); the host imports those libraries once, then forks a child for each
stage command that asks (:func:`run_hosted`). The child takes over the command's working directory, environment,
arguments and standard streams (passed over a Unix socket) and runs the module as ``python -m`` would.

The command DVC started stays in charge of its stage, so DVC, ``dvc.lock`` and the flow see what they saw before: it
passes Ctrl-C and SIGTERM on to the child and exits with the child's exit status; a child whose command is killed
outright (SIGKILL of its process group) kills itself. The host leaves when the flow that started it does.

The host imports no project code: each child imports ``tasks`` and ``rlhf_core`` afresh from its own working
directory, so an isolated checkout of another commit runs its own code. Without a host (``dvc repro`` by hand, or a
host that refuses: another Python) the command runs the stage itself, as it always did.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

HOST_ENV = "RLHF_STAGE_HOST"
"""The host's socket path, in the environment of the stages of a flow run that has a host."""
PRELOAD = (
    "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.tracking.rest_store",
    "dvc.api", "dvc.repo", "dvc.cli.parser", "dvc.repo.reproduce", "dvc.repo.plots", "dvc.data_cloud",
    "dvc.utils.strictyaml", "dvc_data.hashfile.status", "datasets", "pandas", "pyarrow", "tokenizers",
    "torch", "transformers", "transformers.trainer", "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.llama.modeling_llama", "accelerate", "safetensors.torch", "great_expectations",
    "matplotlib.pyplot",
)
"""What the stages import that takes time: the host imports these once (a missing one is skipped), what every stage
needs first (MLflow, DVC, datasets: ``ingest`` and ``prepare`` come early), the training libraries after."""
PROJECT_PACKAGES = ("tasks", "rlhf_core", "flows")
"""Imported by each child from its own working directory, never kept from the host."""
_HEADER = struct.Struct("!I")


def _send(sock: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
    else:
        sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        buf += chunk
    return buf


def _recv(sock: socket.socket, with_fds: int = 0) -> tuple[dict, list[int]]:
    fds: list[int] = []
    if with_fds:  # the header comes with the file descriptors
        data, ancillary, _, _ = sock.recvmsg(_HEADER.size, socket.CMSG_SPACE(with_fds * struct.calcsize("i")))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"{len(payload) // struct.calcsize('i')}i", payload))
        if not data:
            raise ConnectionError("the other side closed the connection")
        header = data + _recv_exact(sock, _HEADER.size - len(data))
    else:
        header = _recv_exact(sock, _HEADER.size)
    (length,) = _HEADER.unpack(header)
    return json.loads(_recv_exact(sock, length)), fds


# ---- the stage command's side --------------------------------------------------------------------------------------

def run_hosted(module: str, args: list[str], *, pass_host: bool = False) -> int | None:
    """Run ``python -m module *args`` in the host named by ``$RLHF_STAGE_HOST`` and return its exit status, or
    ``None`` when there is no host to run it (the caller then runs it itself). ``pass_host``: the child keeps
    ``$RLHF_STAGE_HOST`` (``dvc repro``, whose stage command asks the host in turn); else it runs the stage itself."""
    path = os.environ.get(HOST_ENV)
    if not path or path == "off":
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        env = {k: v for k, v in os.environ.items() if pass_host or k != HOST_ENV}
        _send(sock, {"module": module, "args": args, "cwd": os.getcwd(), "env": env, "executable": sys.executable},
              [0, 1, 2])
        reply, _ = _recv(sock)
    except OSError:
        sock.close()
        return None
    if "pid" not in reply:  # refused: run it here
        sock.close()
        return None
    pid = reply["pid"]

    def forward(signum: int, _frame) -> None:  # to the child's group, as a terminal's Ctrl-C reaches a foreground job
        with suppress(ProcessLookupError):
            os.killpg(pid, signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        status, _ = _recv(sock)
    except (OSError, ConnectionError):
        print(f"[rlhf] the stage host ended before the stage did ({module} {' '.join(args)})", file=sys.stderr)
        return 1
    finally:
        sock.close()
    return int(status["exit"])


def ready_marker(host: str) -> str:
    """A file beside the host's socket once it has imported everything: until then a request waits for the import in
    progress (a few seconds for torch or transformers), longer than a short command takes to start by itself."""
    return host + ".ready"


def is_ready(host: str | None) -> bool:
    return bool(host) and host != "off" and Path(ready_marker(host)).exists()


# ---- the host's side -----------------------------------------------------------------------------------------------

def _import(name: str) -> None:
    import importlib

    with suppress(Exception):  # an optional library: the stage that needs it says so itself
        importlib.import_module(name)


def _fresh_random_state() -> None:
    """The random state a new process would start with, not the host's: Python's, numpy's and torch's generators from
    fresh entropy (stages that want reproducible numbers seed themselves)."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _child(conn: socket.socket, listener: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become ``python -m module *args`` of the request, then exit with its status."""
    import runpy
    import threading
    import traceback

    listener.close()
    os.setpgid(0, 0)  # a group of its own: a signal meant for the host (or another stage) does not reach it
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    for name in [n for n in sys.modules if n.split(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]
    import importlib

    importlib.invalidate_caches()
    sys.argv = [request["module"], *request["args"]]
    _fresh_random_state()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)

    def watch() -> None:  # the stage's command gone (killed with its process group): the stage goes too, with its group
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="stage-command-watch").start()
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        import atexit

        atexit._run_exitfuncs()  # what the interpreter runs at exit (MLflow's and torch's handlers)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(path: str, parent: int, preload: tuple[str, ...] = PRELOAD) -> None:
    """Listen on ``path`` and fork a child per request, importing :data:`PRELOAD` one module at a time while no
    request waits (a stage that asks before the imports are done imports the rest itself); leave when ``parent``
    is gone."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    to_import = list(preload)
    children: dict[int, socket.socket] = {}
    announced = False  # the ready marker written
    exits: set[int] = set()  # a pidfd per child, readable once it has exited: its status goes back at once
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        ready = selector.select(timeout=0 if to_import else 0.2)
        if not ready and to_import:
            _import(to_import.pop(0))
        if not to_import and not announced:  # also a host with nothing to import: ready at once
            Path(ready_marker(path)).touch()
            announced = True
        for key, _ in ready:
            if key.fileobj is not listener:  # a child has exited: reaped below
                selector.unregister(key.fileobj)
                exits.discard(key.fd)
                os.close(key.fd)
                continue
            conn, _ = listener.accept()
            try:
                request, fds = _recv(conn, with_fds=3)
            except (OSError, ConnectionError, ValueError):
                conn.close()
                continue
            if request.get("executable") != sys.executable or len(fds) != 3:
                with suppress(OSError):  # a command that has gone already
                    _send(conn, {"refused": f"the host runs {sys.executable}"})
                conn.close()
                for fd in fds:
                    os.close(fd)
                continue
            gc.freeze()  # what is loaded stays out of the children's collections: fewer pages copied on write
            pid = os.fork()
            if pid == 0:
                selector.close()
                for other in children.values():
                    other.close()
                for fd in exits:
                    os.close(fd)
                _child(conn, listener, request, fds)
            for fd in fds:
                os.close(fd)
            children[pid] = conn
            with suppress(OSError, AttributeError):  # no pidfd (Linux < 5.3, not Linux): the 0.2 s poll reaps it
                exits.add(fd := os.pidfd_open(pid))
                selector.register(fd, selectors.EVENT_READ)
            with suppress(OSError):  # its command has gone already: the child's watch ends it
                _send(conn, {"pid": pid})
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                code = os.waitstatus_to_exitcode(status)
                with suppress(OSError):  # killed by signal N: 128 + N, as a shell says
                    _send(conn, {"exit": code if code >= 0 else 128 - code})
                conn.close()
        if os.getppid() != parent:  # the flow is gone: so is the host (a running stage ends with its command)
            return


@contextmanager
def hosted(env: dict[str, str] | None = None, preload: tuple[str, ...] = PRELOAD, *,
           export: bool = False) -> Iterator[dict[str, str]]:
    """Start a host for the stages run inside the block; yields the environment entry that points them at it.

    ``env``: the host's environment (default ``os.environ``), the same the stages get. ``RLHF_STAGE_HOST=off`` in it:
    no host, each stage command imports what it needs itself; the socket of a host already running (``rlhf run`` starts
    one before the Prefect server, so both start at once): that host serves. ``export``: also set the entry in
    ``os.environ`` inside the block (for a flow started in this process).
    """
    given = (env or os.environ).get(HOST_ENV)
    if given == "off" or (given and Path(given).exists()):
        yield {} if given == "off" else {HOST_ENV: given}
        return
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-host-"))
    path = scratch / "host.sock"
    proc = subprocess.Popen([sys.executable, "-m", "tasks.stage_host", str(path), str(os.getpid()), ",".join(preload)],
                            env={**(env or os.environ), "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL,
                            start_new_session=True)  # the terminal's Ctrl-C reaches the flow, which stops the stage
    previous = os.environ.get(HOST_ENV)
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        entry = {HOST_ENV: str(path)} if path.exists() else {}
        if export:
            os.environ.update(entry)
        yield entry
    finally:
        if export and previous is None:
            os.environ.pop(HOST_ENV, None)
        elif export:
            os.environ[HOST_ENV] = previous
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        path.unlink(missing_ok=True)
        Path(ready_marker(str(path))).unlink(missing_ok=True)
        scratch.rmdir()


def run_command(module: str, args: list[str]) -> None:
    """``python -m tasks.stage_host run <module> *args``: ``python -m module *args`` in the host when there is one
    (its own children, e.g. a stage ``dvc repro`` starts, may ask the host too), else in a fresh interpreter."""
    code = run_hosted(module, args, pass_host=True)
    if code is None:
        os.execv(sys.executable, [sys.executable, "-m", module, *args])
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run_command(sys.argv[2], sys.argv[3:])
    else:
        serve(sys.argv[1], int(sys.argv[2]), tuple(filter(None, sys.argv[3].split(","))) if len(sys.argv) > 3 else PRELOAD)
