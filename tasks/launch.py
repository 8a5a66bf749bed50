"""How ``dvc.yaml`` starts a stage: in the flow's warm stage host, in this process, or as several processes.

``python -m tasks.launch <stage>`` hands the stage to the flow's stage host when there is one
(``tasks.stage_host``: the libraries imported once per pipeline run, not once per stage). Otherwise
``python -m tasks.launch sft`` runs ``tasks.sft`` in this process when one process is configured, and
replaces itself with ``accelerate launch --multi_gpu --num_processes N --main_process_port 0 -m tasks.sft``
when ``N > 1``. N is, in this order:

- ``$RLHF_NUM_PROCESSES``: training processes, on CPU or GPUs;
- ``$RLHF_NUM_GPUS``: the older name, the same meaning (kept working);
- one process per visible CUDA GPU (none: one process).

Where CUDA is available the processes run one per GPU (NCCL); N may not exceed the visible GPUs.
Elsewhere they run on CPU (gloo, ``ACCELERATE_USE_CPU=true``); ``CUDA_VISIBLE_DEVICES=`` trains on CPU
on a GPU machine. The command is the same in both cases: ``--multi_gpu`` is Accelerate's name for its
torchrun launcher (``accelerate launch --cpu`` starts one process, or needs MPI); ``--main_process_port
0`` picks a free port on 127.0.0.1, so the stages of concurrent runs do not collide. Unless
``$OMP_NUM_THREADS`` is set, each process gets an equal share of the cores but one.
``$ACCELERATE_CONFIG_FILE`` (``accelerate config``: FSDP, DeepSpeed) is passed on and then decides the
distributed type.

Batch sizes in ``params.yaml`` are per process: N processes train on N times the batch of one, each on
its share (the result matches one process given the whole batch: ``tests/test_multiprocess.py``). Only
rank 0 (:func:`is_main_process`) tracks in MLflow, saves the model and writes metrics, curves and
reports; the others train, and write only their own files inside the stage's checkpoints.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

TRAINING_STAGES = ("sft", "reward", "ppo", "dpo", "grpo")
STAGES = ("ingest", "prepare", "validate", *TRAINING_STAGES, "evaluate", "promote")
"""Every stage ``dvc.yaml`` starts through this module; the training ones may run as several processes."""
PROCESSES_ENV = "RLHF_NUM_PROCESSES"
LEGACY_GPUS_ENV = "RLHF_NUM_GPUS"
PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal a process gets when its parent dies."""


def _cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def configured_processes() -> int:
    """N: ``$RLHF_NUM_PROCESSES``, else ``$RLHF_NUM_GPUS``, else the visible CUDA GPUs (at least 1)."""
    for name in (PROCESSES_ENV, LEGACY_GPUS_ENV):
        value = os.environ.get(name)
        if value:
            try:
                n = int(value)
            except ValueError:
                raise SystemExit(f"[rlhf] ${name} must be a whole number of processes, got {value!r}") from None
            if n < 1:
                raise SystemExit(f"[rlhf] ${name} must be >= 1, got {n}")
            return n
    return max(1, _cuda_gpus())


def accelerate_command(n_processes: int, target: list[str]) -> list[str]:
    """``accelerate launch`` of ``target`` (``["-m", "tasks.sft"]`` or a script and its arguments) on N processes."""
    cmd = ["accelerate", "launch", "--num_processes", str(n_processes), "--main_process_port", "0"]
    if os.environ.get("ACCELERATE_CONFIG_FILE"):  # its distributed type (FSDP, DeepSpeed) applies, not --multi_gpu's
        return cmd + ["--config_file", os.environ["ACCELERATE_CONFIG_FILE"], *target]
    # Accelerate's defaults, stated so that it does not warn about each; the trainers set their own precision.
    defaults = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd[:2] + ["--multi_gpu"] + cmd[2:] + defaults + target


def launch_command(stage: str, n_processes: int) -> list[str] | None:
    """The ``accelerate launch`` command for ``stage`` on ``n_processes``, or ``None`` to run in-process."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"{stage!r} is not a training stage ({', '.join(TRAINING_STAGES)})")
    if n_processes <= 1:
        return None
    return accelerate_command(n_processes, ["-m", f"tasks.{stage}"])


def launch_env(n_processes: int, *, cpu: bool, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment: ``environ`` (default ``os.environ``) plus the CPU backend and a thread share."""
    env = dict(os.environ if environ is None else environ)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"  # every process's Accelerator/Trainer: gloo on CPU (else no process group)
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, ((os.cpu_count() or 2) - 1) // n_processes))
    return env


def is_main_process() -> bool:
    """True on the process that tracks and saves (rank 0; the only process without a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait until every process of the launch gets here (a no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def follow_launcher() -> None:
    """In a process started by ``accelerate launch``: stop when the launcher is stopped.

    torchrun starts each worker in a session of its own, so a signal to the launcher's process group
    (Ctrl-C, ``rlhf`` stopping a stage) reaches only the launcher. It passes SIGINT/SIGTERM on to the
    workers; SIGTERM becomes ``KeyboardInterrupt`` here, as SIGINT is, so ``stage_main`` marks the MLflow
    run killed. A launcher killed outright (SIGKILL) cannot pass anything on: the kernel then kills the
    workers (Linux's parent-death signal), so none goes on training and writing checkpoints that a
    resumed run would share.
    """
    if "LOCAL_RANK" not in os.environ:
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the launcher died before the line above
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in STAGES:
        raise SystemExit(f"usage: python -m tasks.launch <{'|'.join(STAGES)}>")
    stage = args[0]
    from tasks.stage_host import run_hosted

    status = run_hosted("tasks.launch", args)  # the flow's warm host runs it: the libraries are imported already
    if status is not None:
        sys.exit(status)
    n = configured_processes() if stage in TRAINING_STAGES else 1  # the other stages always run as one process
    if n > 1:
        cmd = launch_command(stage, n)
        gpus = _cuda_gpus()
        if gpus and n > gpus:
            raise SystemExit(f"[rlhf] {n} training processes need {n} GPUs, {gpus} visible "
                             f"(set ${PROCESSES_ENV}, or CUDA_VISIBLE_DEVICES= to train on CPU)")
        env = launch_env(n, cpu=gpus == 0)
        print(f"[rlhf] {stage}: {' '.join(cmd)} ({'GPU' if gpus else 'CPU'})", flush=True)
        os.execvpe(cmd[0], cmd, env)
    importlib.import_module(f"tasks.{stage}").main()


if __name__ == "__main__":
    main()
