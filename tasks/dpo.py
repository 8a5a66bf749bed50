"""Stage ``dpo``: offline preference optimisation of the SFT model (``dpo.method``: DPO with the SFT model as
reference, or SimPO, ORPO, KTO); trained when ``dpo.train`` is true."""

from __future__ import annotations

from typing import Any

from tasks.workspace import Workspace

STAGE = "dpo"


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    from rlhf_core.models import load_causal_lm
    from rlhf_core.trainers.dpo import DPOConfig, train_dpo
    from tasks.policies import selected, without_switch, write_not_selected
    from tasks.training_io import run_training_stage

    if not selected(params, STAGE):
        return write_not_selected(ws, STAGE)
    return run_training_stage(
        STAGE, without_switch(params, STAGE), ws, tracker, config_cls=DPOConfig, train_fn=train_dpo,
        make_model=lambda tokenizer, cfg: load_causal_lm(str(ws.model("sft"))),
        train_split="pref_train", eval_split="pref_test",
        inputs=[ws.split("pref_train"), ws.split("pref_test"), ws.model("sft")],
    )


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
