"""Stage ``dpo``: offline preference optimisation of the SFT model (``dpo.method``: DPO with the SFT model as
reference, or SimPO, ORPO, KTO); trained when ``dpo.train`` is true.

Each evaluation also samples held-out prompts and scores them with the reward model, the gold reward (synthetic
task) and the KL to the SFT model: the over-optimisation curve (``plots/dpo/overoptimization.*``, ``dpo.overopt_*``).
"""

from __future__ import annotations

from typing import Any

from tasks.workspace import Workspace

STAGE = "dpo"


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    from rlhf_core.models import load_causal_lm, load_reward_model
    from rlhf_core.trainers.dpo import DPOConfig, train_dpo
    from tasks.launch import is_main_process
    from tasks.overoptimization import write_overoptimization
    from tasks.policies import selected, without_switch, write_not_selected
    from tasks.training_io import gold_reward_fn, run_training_stage

    if not selected(params, STAGE):  # one process writes the stand-in outputs (the others would race it)
        return write_not_selected(ws, STAGE) if is_main_process() else {"trained": 0}

    def curve_inputs(tokenizer, cfg) -> dict:  # the proxy and gold rewards of the over-optimisation curve
        if not cfg.overopt_prompts:
            return {}
        return {"reward_model": load_reward_model(str(ws.model("reward"))), "monitor_fn": gold_reward_fn(ws)}

    return run_training_stage(
        STAGE, without_switch(params, STAGE), ws, tracker, config_cls=DPOConfig, train_fn=train_dpo,
        make_model=lambda tokenizer, cfg: load_causal_lm(str(ws.model("sft"))),
        train_split="pref_train", eval_split="pref_test",
        inputs=[ws.split("pref_train"), ws.split("pref_test"), ws.model("sft"), ws.model("reward")],
        train_kwargs=curve_inputs, after_curves=lambda curves: write_overoptimization(STAGE, curves, ws.plots(STAGE)),
    )


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
