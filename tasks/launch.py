"""How ``dvc.yaml`` starts a training stage: directly, or through ``accelerate launch`` on several GPUs.

``python -m tasks.launch sft`` runs ``tasks.sft`` in this process when there is at most one GPU,
and replaces itself with ``accelerate launch --multi_gpu --num_processes N -m tasks.sft`` when
``N > 1`` GPUs are configured (``$RLHF_NUM_GPUS``, else the visible CUDA devices). Accelerate's
own config (``accelerate config``; FSDP or DeepSpeed) is honoured through ``$ACCELERATE_CONFIG_FILE``.
"""

from __future__ import annotations

import importlib
import os
import sys

TRAINING_STAGES = ("sft", "reward", "ppo", "dpo", "grpo")


def configured_gpus() -> int:
    if os.environ.get("RLHF_NUM_GPUS"):
        return int(os.environ["RLHF_NUM_GPUS"])
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_command(stage: str, n_gpus: int) -> list[str] | None:
    """The ``accelerate launch`` command for ``stage`` on ``n_gpus``, or ``None`` to run in-process."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"{stage!r} is not a training stage ({', '.join(TRAINING_STAGES)})")
    if n_gpus <= 1:
        return None
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(n_gpus)]
    if os.environ.get("ACCELERATE_CONFIG_FILE"):
        cmd += ["--config_file", os.environ["ACCELERATE_CONFIG_FILE"]]
    return cmd + ["-m", f"tasks.{stage}"]


def is_main_process() -> bool:
    """True on the process that tracks and saves (rank 0; the only process without a launcher)."""
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: python -m tasks.launch <{'|'.join(TRAINING_STAGES)}>")
    stage = args[0]
    cmd = launch_command(stage, configured_gpus())
    if cmd is not None:
        print(f"[rlhf] {stage}: {' '.join(cmd)}", flush=True)
        os.execvp(cmd[0], cmd)
    importlib.import_module(f"tasks.{stage}").main()


if __name__ == "__main__":
    main()
