"""Stage ``reward``: a Bradley–Terry reward model, initialised from the SFT model, on preference pairs."""

from __future__ import annotations

import json
from typing import Any

from rlhf_core import metrics as M
from tasks.workspace import Workspace

STAGE = "reward"


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    from rlhf_core.models import load_reward_model
    from rlhf_core.trainers.reward_model import RewardConfig, train_reward_model
    from tasks.training_io import run_training_stage

    return run_training_stage(
        STAGE, params, ws, tracker, config_cls=RewardConfig, train_fn=train_reward_model,
        make_model=lambda tokenizer, cfg: load_reward_model(str(ws.model("sft"))),
        train_split="pref_train", eval_split="pref_test",
        inputs=[ws.split("pref_train"), ws.split("pref_test"), ws.model("sft")],
        extra_metrics=lambda metrics: noise_ceiling(ws, metrics),
    )


def noise_ceiling(ws: Workspace, metrics: dict[str, Any]) -> dict[str, float]:
    """On the synthetic task: the Bayes accuracy of the test labels (the best any reward model can
    reach under their label noise) and how close this one gets; elsewhere nothing."""
    task_file = ws.prepared / "task.json"
    bayes = json.loads(task_file.read_text()).get("bayes_accuracy_test") if task_file.exists() else None
    if not bayes:
        return {}
    return {M.key(M.EVAL, M.BAYES_ACCURACY): bayes,
            M.key(M.EVAL, M.ACCURACY_OVER_BAYES): metrics[M.key(M.EVAL, M.ACCURACY)] / bayes}


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
