"""Stage ``grpo``: GRPO or RLOO of the SFT policy on programmatic rewards and/or the reward model.

``grpo.rewards`` names the reward functions (``rlhf_core.reward_registry``: ``gold`` on the
synthetic task, ``rouge_l``/``bleu`` against the data's reference answers, ``format``, ``length``,
or ``package.module:function``) with their weights; ``grpo.reward_model_weight`` adds the learned
reward model (loaded in any case: its score is the proxy of the over-optimisation curve,
``plots/grpo/overoptimization.*``). The policy trains only when ``grpo.train`` is true (off by
default: ``rlhf run --set grpo.train=true``); otherwise the stage records that and writes no model,
and ``evaluate`` leaves it out.
"""

from __future__ import annotations

import time
from typing import Any

from tasks.params import ParamsError, group, typed
from tasks.workspace import Workspace

STAGE = "grpo"
STAGE_KEYS = ("rewards",)  # read by this stage; the rest of the group is rlhf_core's GRPOConfig
DEFAULT_REWARDS = [{"name": "gold", "weight": 1.0}]
"""``grpo.rewards`` when the key is absent: the synthetic task's gold reward, a verifiable reward."""


def reward_functions(specs: Any, ws: Workspace) -> tuple[dict[str, Any], dict[str, float]]:
    """``grpo.rewards`` -> named reward functions and their weights; references come from the prepared data."""
    from rlhf_core.reward_registry import NEEDS_REFERENCES, build_reward
    from tasks.training_io import gold_reward_fn, load_split

    if specs is None:
        return {}, {}
    if not isinstance(specs, list) or not all(isinstance(s, dict) and "name" in s for s in specs):
        raise ParamsError("params.yaml: grpo.rewards must be a list of {name: ..., weight: ..., <settings>} entries")
    fns: dict[str, Any] = {}
    weights: dict[str, float] = {}
    references: dict[str, str] | None = None
    for spec in specs:
        spec = dict(spec)
        name, weight = spec.pop("name"), float(spec.pop("weight", 1.0))
        label = str(spec.pop("label", name.rsplit(":", 1)[-1]))
        if name == "gold" and gold_reward_fn(ws) is None:
            raise ParamsError("params.yaml: grpo.rewards 'gold' needs the synthetic task (prepare.*_data null)")
        if name in NEEDS_REFERENCES and references is None:
            references = {}
            for split, column in (("sft_train", "completion"), ("pref_train", "chosen")):
                if ws.split(split).exists():
                    ds = load_split(ws, split)
                    references.update(zip(ds["prompt"], ds[column]))
        try:
            fns[label] = build_reward(name, spec, references=references)
        except ValueError as err:
            raise ParamsError(f"params.yaml: grpo.rewards: {err}") from err
        weights[label] = weight
    return fns, weights


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    from rlhf_core.compute_clock import compute_seconds
    from rlhf_core.metrics import COMPUTE_SECONDS
    from rlhf_core.models import load_causal_lm, load_reward_model
    from rlhf_core.trainers.grpo import GRPOConfig, train_grpo
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
    inputs = [ws.split("pref_train"), ws.split("prompts"), ws.model("sft"), ws.model("reward")]
    ckpt = checkpoint_dir(ws, STAGE, params, inputs)
    cfg = typed({STAGE: {k: v for k, v in options.items() if k not in STAGE_KEYS}}, STAGE, GRPOConfig, output_dir=str(ckpt))
    fns, weights = reward_functions(options.get("rewards", DEFAULT_REWARDS), ws)
    if not fns and cfg.reward_model_weight == 0:
        raise ParamsError("params.yaml: grpo has nothing to optimise: give grpo.rewards or a reward_model_weight > 0")

    started = time.perf_counter()
    tokenizer = load_tokenizer(ws)
    reward_model = load_reward_model(str(ws.model("reward")))  # also the proxy of the over-optimisation curve at weight 0
    curves = CurveRecorder(log_fn_of(tracker))
    gold = gold_reward_fn(ws)
    result = train_grpo(
        load_causal_lm(str(ws.model("sft"))), load_causal_lm(str(ws.model("sft"))), reward_model, tokenizer,
        distinct_prompts(load_split(ws, "pref_train")), load_split(ws, "prompts"), cfg,
        reward_fns=fns, reward_weights=weights, monitor_fn=gold, log_fn=curves,
    )
    barrier()  # every process is done with the checkpoints (best weights included) before rank 0 saves and removes them
    if not is_main_process():
        return result.metrics
    metrics = {**result.metrics, **lengths, "trained": 1, "updates": result.updates, "seconds": round(time.perf_counter() - started, 2),
               COMPUTE_SECONDS: round(compute_seconds(), 2)}
    metrics.update(write_overoptimization(STAGE, curves, ws.plots(STAGE)))
    return finish_online_stage(STAGE, ws, tracker, result, tokenizer, curves, ckpt, metrics)

def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
