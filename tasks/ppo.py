"""Stage ``ppo``: PPO of the SFT policy against the reward model (Ziegler et al. 2019 / Ouyang et al. 2022).

The policy and the frozen reference are the SFT model; the value model starts from the reward
model. With ``ppo.reward_fn: gold`` (synthetic task only) the gold reward is optimised beside
(``reward_model_weight`` > 0) or instead of the learned one. On the synthetic task the gold
reward is always monitored, so over-optimisation of the proxy shows in the curves
(``plots/ppo/overoptimization.*``: proxy and gold against sqrt(KL), with the fitted R(d)).
"""

from __future__ import annotations

import time
from typing import Any

from tasks.params import ParamsError, group, typed
from tasks.workspace import Workspace

STAGE = "ppo"
STAGE_KEYS = ("reward_fn",)  # read by this stage; the rest of the group is rlhf_core's PPOConfig


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    from rlhf_core.compute_clock import compute_seconds
    from rlhf_core.metrics import COMPUTE_SECONDS
    from rlhf_core.models import load_causal_lm, load_reward_model
    from rlhf_core.trainers.ppo import PPOConfig, train_ppo
    from tasks.launch import barrier, is_main_process
    from tasks.lengths import with_auto_lengths
    from tasks.overoptimization import write_overoptimization
    from tasks.policies import selected, without_switch, write_not_selected
    from tasks.training_io import (
        CurveRecorder,
        checkpoint_dir,
        distinct_prompts,
        finish_online_stage,
        gold_reward_fn,
        load_split,
        load_tokenizer,
        log_fn_of,
    )

    if not selected(params, STAGE):
        return write_not_selected(ws, STAGE) if is_main_process() else {"trained": 0}
    params, lengths = with_auto_lengths(without_switch(params, STAGE), ws, STAGE)  # max_new_tokens / max_length: auto
    options = group(params, STAGE)
    reward_fn_name = options.get("reward_fn")
    inputs = [ws.split("pref_train"), ws.split("prompts"), ws.model("sft"), ws.model("reward")]
    ckpt = checkpoint_dir(ws, STAGE, params, inputs)
    cfg = typed({STAGE: {k: v for k, v in options.items() if k not in STAGE_KEYS}}, STAGE, PPOConfig, output_dir=str(ckpt))
    gold = gold_reward_fn(ws)
    if reward_fn_name not in (None, "gold"):
        raise ParamsError(f"params.yaml: ppo.reward_fn must be null or 'gold', got {reward_fn_name!r}")
    if reward_fn_name == "gold" and gold is None:
        raise ParamsError("params.yaml: ppo.reward_fn 'gold' needs the synthetic task (prepare.*_data null)")

    started = time.perf_counter()
    tokenizer = load_tokenizer(ws)
    policy = load_causal_lm(str(ws.model("sft")))
    reference = load_causal_lm(str(ws.model("sft")))
    reward_model = load_reward_model(str(ws.model("reward")))
    value_model = load_reward_model(str(ws.model("reward")))  # value head initialised from the RM
    curves = CurveRecorder(log_fn_of(tracker))
    result = train_ppo(
        policy, reference, reward_model, tokenizer, distinct_prompts(load_split(ws, "pref_train")), load_split(ws, "prompts"), cfg,
        value_model=value_model, reward_fn=gold if reward_fn_name == "gold" else None, monitor_fn=gold,
        log_fn=curves,
    )
    barrier()  # every process is done with the checkpoints (best weights included) before rank 0 saves and removes them
    if not is_main_process():
        return result.metrics
    metrics = {**result.metrics, **lengths, "updates": result.updates, "seconds": round(time.perf_counter() - started, 2),
               COMPUTE_SECONDS: round(compute_seconds(), 2)}
    metrics.update({f"reward_norm/{k}": v for k, v in result.reward_norm.items()})
    metrics.update(write_overoptimization(STAGE, curves, ws.plots(STAGE)))
    return finish_online_stage(STAGE, ws, tracker, result, tokenizer, curves, ckpt, metrics)

def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
