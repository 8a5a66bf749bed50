"""Stage ``evaluate``: the SFT policy and every policy this run trained (each policy stage's ``train`` switch) side by side.

For each policy, over ``evaluate.max_prompts`` held-out prompts × ``evaluate.samples_per_prompt``
samples: mean gold reward (when the task has one), mean reward-model score, KL to the reference
(per token and per sequence), win rate against SFT by gold reward and by reward model (sample j
against SFT's sample j of the same prompt, ties ½), response length and distinct-n; each mean and
win rate with its 95% two-level bootstrap interval (prompts, then samples within them:
``rlhf_core.promotion.hierarchical_bootstrap_interval``). Plots of RM score against gold reward and of reward
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
    import torch

    from rlhf_core import metrics as M
    from rlhf_core.compute_clock import compute_seconds
    from rlhf_core.evaluation import evaluate_policy, pairwise_wins, win_rate
    from rlhf_core.models import load_causal_lm, load_reward_model
    from rlhf_core.promotion import hierarchical_bootstrap_interval
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
            samples_per_prompt=cfg.samples_per_prompt,
        )
    metrics: dict[str, Any] = {M.N_PROMPTS: len(prompts), M.SAMPLES_PER_PROMPT: cfg.samples_per_prompt,
                               "n_prompts_too_long": held.n_too_long, **lengths}
    for name, res in results.items():
        metrics.update({f"{name}/{k}": v for k, v in res.metrics.items()})
        per_sample = {M.RM_SCORE: res.rm_scores, M.KL_PER_TOKEN: res.kl_per_token}  # each P·k long, prompt-major
        if res.gold is not None:
            per_sample[M.GOLD_REWARD] = res.gold
        if name != "sft":  # paired: sample j of this policy against SFT's sample j of the same prompt
            sft = results["sft"]
            metrics[f"{name}/{M.WIN_RATE_VS_SFT_RM}"] = win_rate(res.rm_scores, sft.rm_scores)
            per_sample[M.WIN_RATE_VS_SFT_RM] = pairwise_wins(res.rm_scores, sft.rm_scores)
            if res.gold is not None:
                metrics[f"{name}/{M.WIN_RATE_VS_SFT_GOLD}"] = win_rate(res.gold, sft.gold)
                per_sample[M.WIN_RATE_VS_SFT_GOLD] = pairwise_wins(res.gold, sft.gold)
        for key, values in per_sample.items():  # 95% percentile bootstrap: prompts, then samples within each
            low, high = hierarchical_bootstrap_interval(res.by_prompt(values), confidence=0.975, n_bootstrap=2000,
                                                        seed=cfg.seed)  # values as (P, k)
            metrics[f"{name}/{M.ci_low(key)}"], metrics[f"{name}/{M.ci_high(key)}"] = low, high
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    metrics[M.COMPUTE_SECONDS] = round(compute_seconds(), 2)
    k = cfg.samples_per_prompt
    samples = [  # the first n_samples_logged responses of each policy: row i answers prompt i // k (its sample i % k)
        {"policy": name, "prompt": prompts[i // k], "sample": i % k, "response": res.responses[i],
         "rm_score": res.rm_scores[i], "gold_reward": res.gold[i] if res.gold is not None else None,
         "kl": res.kl_per_sequence[i]}
        for name, res in results.items() for i in range(min(cfg.n_samples_logged, len(res.responses)))
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
