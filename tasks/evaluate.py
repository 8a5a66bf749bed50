"""Stage ``evaluate``: SFT, PPO and DPO policies side by side on held-out prompts.

For each policy: mean gold reward (when the task has one), mean reward-model score, KL to the
reference (per token and per sequence), win rate against SFT by gold reward and by reward
model, response length and distinct-n. Plots of RM score against gold reward and of reward
against KL; a samples table. The final policy is registered in the MLflow Model Registry.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from tasks.params import typed
from tasks.workspace import Workspace, write_json

STAGE = "evaluate"
POLICIES = ("sft", "ppo", "dpo")


@dataclass
class EvaluateConfig:
    """The ``evaluate`` group of ``params.yaml``."""

    seed: int = 0
    max_prompts: int = 200
    max_new_tokens: int = 16
    temperature: float = 1.0
    """Sampling temperature; at 1.0 the KL estimate is the KL of the policy itself."""
    batch_size: int = 64
    n_samples_logged: int = 24
    final_policy: Literal["ppo", "dpo", "sft"] = "dpo"
    """The policy registered in the Model Registry."""
    register: bool = True

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def gold_reward_fn(ws: Workspace):
    """The synthetic task's gold reward when the prepared data is the synthetic task, else ``None``."""
    if not (ws.prepared / "task.json").exists():
        return None
    from rlhf_core.synthetic import GoldReward

    return GoldReward()


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    import torch

    from rlhf_core.data.tokenize import encode_prompts
    from rlhf_core.evaluation import evaluate_policy, win_rate
    from rlhf_core.models import load_causal_lm, load_reward_model
    from tasks.evaluation_report import write_plots
    from tasks.training_io import load_split, load_tokenizer

    cfg = typed(params, STAGE, EvaluateConfig)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(ws)
    prompts_ds = load_split(ws, "prompts")
    prompts_ds = prompts_ds.select(range(min(cfg.max_prompts, len(prompts_ds))))
    reference = load_causal_lm(str(ws.model("sft"))).eval()
    config = reference.config
    max_length = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))
    # Prompts that leave no room for a response within the models' length are left out (and counted).
    encoded = encode_prompts(tokenizer, list(prompts_ds["prompt"]), list(prompts_ds["prompt_messages"]))
    keep = [i for i, ids in enumerate(encoded) if len(ids) + cfg.max_new_tokens <= max_length]
    if not keep:
        from tasks.stage_main import StageError

        raise StageError(f"every held-out prompt is longer than {max_length - cfg.max_new_tokens} tokens")
    prompt_ids = [encoded[i] for i in keep]
    prompts = [prompts_ds[i]["prompt"] for i in keep]
    reward_model = load_reward_model(str(ws.model("reward"))).eval()
    gold_fn = gold_reward_fn(ws)
    results = {}
    for name in POLICIES:
        policy = reference if name == "sft" else load_causal_lm(str(ws.model(name))).eval()
        results[name] = evaluate_policy(
            policy, reference, reward_model, tokenizer, prompts, prompt_ids, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, batch_size=cfg.batch_size, seed=cfg.seed, gold_fn=gold_fn,
        )
    metrics: dict[str, Any] = {"n_prompts": len(prompts), "n_prompts_too_long": len(encoded) - len(keep)}
    for name, res in results.items():
        metrics.update({f"{name}/{k}": v for k, v in res.metrics.items()})
        if name != "sft":
            metrics[f"{name}/win_rate_vs_sft/rm"] = win_rate(res.rm_scores, results["sft"].rm_scores)
            if res.gold is not None:
                metrics[f"{name}/win_rate_vs_sft/gold"] = win_rate(res.gold, results["sft"].gold)
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
        if cfg.register:
            register_final_policy(params, ws, tracker, cfg.final_policy, tokenizer)
    return metrics


def register_final_policy(params: dict[str, Any], ws: Workspace, tracker: Any, policy: str, tokenizer) -> None:
    """Register the final policy with lineage tags (git commit, data digest, params hash)."""
    from rlhf_core.models import load_causal_lm
    from tasks.tracking import dvc_md5, git_info, params_hash, register_model

    git = git_info(ws.root)
    tags = {
        "policy": policy,
        "git.commit": str(git.get("commit")),
        "git.dirty": str(git.get("dirty")),
        "data.digest": dvc_md5(ws.prepared),
        "params.hash": params_hash(params),
    }
    model = load_causal_lm(str(ws.model(policy)))
    name = (params.get("tracking") or {}).get("registered_model", "rlhf-policy")
    register_model(tracker.run_id, model, tokenizer, name, tags)


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
