"""Stage ``evaluate``: the SFT policy and every policy this run trained (each policy stage's ``train`` switch) side by side.

For each policy: mean gold reward (when the task has one), mean reward-model score, KL to the
reference (per token and per sequence), win rate against SFT by gold reward and by reward
model, response length and distinct-n. Plots of RM score against gold reward and of reward
against KL; a samples table. (Registering the policy for service is ``promote``'s job.)
"""

from __future__ import annotations

import json
import time
from typing import Any

from tasks.heldout import context_length, evaluate_config, held_out_prompts
from tasks.workspace import Workspace, write_json

STAGE = "evaluate"


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    import numpy as np
    import torch

    from rlhf_core import metrics as M
    from rlhf_core.evaluation import evaluate_policy, pairwise_wins, win_rate
    from rlhf_core.models import load_causal_lm, load_reward_model
    from rlhf_core.promotion import bootstrap_mean_interval
    from tasks.evaluation_report import write_plots
    from tasks.policies import trained_policies
    from tasks.training_io import gold_reward_fn, load_tokenizer

    cfg, lengths = evaluate_config(params, ws)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(ws)
    reference = load_causal_lm(str(ws.model("sft"))).eval()
    held = held_out_prompts(ws, cfg, tokenizer, context_length(reference))
    prompts, prompt_ids = held.prompts, held.ids
    reward_model = load_reward_model(str(ws.model("reward"))).eval()
    gold_fn = gold_reward_fn(ws)
    results = {}
    for name in ["sft", *trained_policies(ws)]:
        policy = reference if name == "sft" else load_causal_lm(str(ws.model(name))).eval()
        results[name] = evaluate_policy(
            policy, reference, reward_model, tokenizer, prompts, prompt_ids, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, batch_size=cfg.batch_size, seed=cfg.seed, gold_fn=gold_fn,
        )
    metrics: dict[str, Any] = {"n_prompts": len(prompts), "n_prompts_too_long": held.n_too_long, **lengths}
    for name, res in results.items():
        metrics.update({f"{name}/{k}": v for k, v in res.metrics.items()})
        per_prompt = {M.RM_SCORE: res.rm_scores, M.KL_PER_TOKEN: res.kl_per_token}
        if res.gold is not None:
            per_prompt[M.GOLD_REWARD] = res.gold
        if name != "sft":
            sft = results["sft"]
            metrics[f"{name}/{M.WIN_RATE_VS_SFT_RM}"] = win_rate(res.rm_scores, sft.rm_scores)
            per_prompt[M.WIN_RATE_VS_SFT_RM] = pairwise_wins(res.rm_scores, sft.rm_scores)
            if res.gold is not None:
                metrics[f"{name}/{M.WIN_RATE_VS_SFT_GOLD}"] = win_rate(res.gold, sft.gold)
                per_prompt[M.WIN_RATE_VS_SFT_GOLD] = pairwise_wins(res.gold, sft.gold)
        for key, values in per_prompt.items():  # 95% percentile bootstrap over prompts (paired for win rates)
            low, high = bootstrap_mean_interval(np.asarray(values, dtype=np.float64), confidence=0.975, n_bootstrap=2000,
                                                seed=cfg.seed)
            metrics[f"{name}/{M.ci_low(key)}"], metrics[f"{name}/{M.ci_high(key)}"] = low, high
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    samples = [
        {"policy": name, "prompt": prompts[i], "response": res.responses[i], "rm_score": res.rm_scores[i],
         "gold_reward": res.gold[i] if res.gold is not None else None, "kl": res.kl_per_sequence[i]}
        for name, res in results.items() for i in range(min(cfg.n_samples_logged, len(prompts)))
    ]
    reports = ws.reports(STAGE)
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    plot_files = write_plots(results, ws.plots(STAGE))
    write_json(ws.metrics(STAGE), metrics)
    if tracker is not None:
        tracker.log_table(samples, "samples.json")
        for path in plot_files:
            tracker.log_artifact(str(path), "plots")
    return metrics


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
