"""Stage ``reward``: a Bradley–Terry reward model, initialised from the SFT model, on preference pairs."""

from __future__ import annotations

import json
from typing import Any

from tasks.workspace import Workspace, write_json

STAGE = "reward"


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    from rlhf_core.models import load_reward_model
    from rlhf_core.trainers.reward_model import RewardConfig, train_reward_model
    from tasks.training_io import run_training_stage

    metrics = run_training_stage(
        STAGE, params, ws, tracker, config_cls=RewardConfig, train_fn=train_reward_model,
        make_model=lambda tokenizer, cfg: load_reward_model(str(ws.model("sft"))),
        train_split="pref_train", eval_split="pref_test",
        inputs=[ws.split("pref_train"), ws.split("pref_test"), ws.model("sft")],
    )
    task_file = ws.prepared / "task.json"
    if task_file.exists():  # synthetic task: how close the RM gets to the labels' noise ceiling
        bayes = json.loads(task_file.read_text()).get("bayes_accuracy_test")
        if bayes:
            metrics["eval/bayes_accuracy"] = bayes
            metrics["eval/accuracy_over_bayes"] = metrics["eval/accuracy"] / bayes
            write_json(ws.metrics(STAGE), metrics)
    return metrics


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
