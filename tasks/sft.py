"""Stage ``sft``: supervised fine-tuning of the base model on the prepared demonstrations."""

from __future__ import annotations

from typing import Any

from tasks.workspace import Workspace

STAGE = "sft"


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    from rlhf_core.trainers.sft import SFTConfig, train_sft
    from tasks.training_io import base_causal_lm, run_training_stage

    return run_training_stage(
        STAGE, params, ws, tracker, config_cls=SFTConfig, train_fn=train_sft,
        make_model=lambda tokenizer, cfg: base_causal_lm(params, tokenizer, seed=cfg.seed),
        train_split="sft_train", eval_split="sft_test",
        inputs=[ws.split("sft_train"), ws.split("sft_test"), ws.tokenizer],
    )


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
