"""Stage ``promote``: register the new policy and move ``@champion`` to it only when it wins.

The challenger (``promote.policy``, default DPO) and the registry's current ``@champion`` answer
the same held-out prompts in this run, with the ``evaluate`` group's sampling (its
``samples_per_prompt`` responses per prompt, paired sample by sample), and are judged
by this run's judge (``promote.metric``: the gold reward where the task has one, else this run's
reward model), since the data may have changed since the champion was crowned. Each policy
uses its own tokenizer; responses are judged as text. ``rlhf_core.promotion.decide`` applies
the criteria (paired win rate, significance, KL budget). Without a champion the challenger is
compared with this run's SFT reference instead (the absolute gate for the first crown).

The challenger is registered as a new version (alias ``@challenger``) with its lineage, the
decision and its evidence as tags; ``@champion`` moves only on a win. Outputs:
``metrics/promote.json`` and ``reports/promote/decision.md`` (also on the stage run and the
pipeline's parent run, whose tags ``promotion.*`` give the decision at a glance).

The registry is read and written directly (not through the stage run's journal: a registration
cannot wait for ``rlhf sync``). A tracking server that stops answering fails the stage with one
:class:`~tasks.tracking.outage.TrackingUnavailable` saying which step it was in and what the
registry holds because of it (:func:`registry_step`); running the pipeline again decides afresh.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from tasks.heldout import context_length, evaluate_config, held_out_prompts
from tasks.params import typed
from tasks.workspace import Workspace, write_json

STAGE = "promote"


@dataclass
class PromoteConfig:
    """The ``promote`` group of ``params.yaml`` (the criteria: ``rlhf_core.promotion.PromotionCriteria``)."""

    policy: Literal["dpo", "ppo", "grpo", "sft"] = "dpo"
    """The challenger: the trained policy that would go into service."""
    metric: Literal["auto", "gold_reward", "rm_score"] = "auto"
    """What "better" means; ``auto``: the gold reward where the task has one, else the reward model's score."""
    min_win_rate: float = 0.55
    confidence: float = 0.95
    test: Literal["bootstrap", "sign"] = "bootstrap"
    max_kl: float | None = 1.0
    n_bootstrap: int = 2000
    register: bool = True
    """False: decide and report only (nothing is registered, no alias moves)."""

    def criteria(self, seed: int):
        from rlhf_core.promotion import PromotionCriteria

        return PromotionCriteria(min_win_rate=self.min_win_rate, confidence=self.confidence, test=self.test,
                                 max_kl=self.max_kl, n_bootstrap=self.n_bootstrap, seed=seed)

    def __post_init__(self) -> None:
        self.criteria(0)  # the criteria's own checks, at config time


def _judge(metric: str, gold_fn, reward_model, tokenizer, prompt_ids: list[list[int]], prompts: list[str], batch_size: int):
    """Per-prompt scores of text responses, by the gold reward or this run's reward model."""
    from rlhf_core.evaluation import score_responses

    if metric == "gold_reward":
        return lambda responses: gold_fn(prompts, responses)
    return lambda responses: score_responses(reward_model, tokenizer, prompt_ids, responses, batch_size=batch_size)


def run(params: dict[str, Any], ws: Workspace, tracker: Any = None) -> dict[str, Any]:
    import torch

    from rlhf_core.compute_clock import compute_seconds
    from rlhf_core.data.tokenize import encode_prompts
    from rlhf_core.evaluation import evaluate_policy, sample_responses
    from rlhf_core.metrics import COMPUTE_SECONDS
    from rlhf_core.models import load_causal_lm, load_reward_model
    from rlhf_core.models import load_tokenizer as load_tokenizer_from
    from rlhf_core.promotion import decide
    from tasks.policies import is_trained
    from tasks.registry import CHAMPION, downloaded_model, version_by_alias
    from tasks.stage_main import StageError
    from tasks.tracking.client import connect
    from tasks.training_io import gold_reward_fn, load_tokenizer

    cfg = typed(params, STAGE, PromoteConfig)
    if cfg.policy != "sft" and not is_trained(ws, cfg.policy):
        raise StageError(f"promote.policy is {cfg.policy!r}, which this run did not train ({cfg.policy}.train is false); "
                         f"promote a trained one or set {cfg.policy}.train=true")
    ev, _ = evaluate_config(params, ws)  # the same prompts and sampling as evaluate (auto lengths resolved alike)
    started = time.perf_counter()
    gold_fn = gold_reward_fn(ws)
    metric = ("gold_reward" if gold_fn is not None else "rm_score") if cfg.metric == "auto" else cfg.metric
    if metric == "gold_reward" and gold_fn is None:
        raise StageError("promote.metric is gold_reward, but this task has no gold reward (use rm_score or auto)")
    torch.manual_seed(ev.seed)
    tokenizer = load_tokenizer(ws)
    reference = load_causal_lm(str(ws.model("sft"))).eval()
    held = held_out_prompts(ws, ev, tokenizer, context_length(reference))
    reward_model = load_reward_model(str(ws.model("reward"))).eval()
    k = ev.samples_per_prompt  # k responses per prompt and policy, prompt-major rows (g·k … g·k + k − 1)
    judge = _judge(metric, gold_fn, reward_model, tokenizer, [ids for ids in held.ids for _ in range(k)],
                   [p for p in held.prompts for _ in range(k)], ev.batch_size)
    sampling = dict(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature, batch_size=ev.batch_size, seed=ev.seed,
                    samples_per_prompt=k)

    challenger = load_causal_lm(str(ws.model(cfg.policy))).eval()
    own = evaluate_policy(challenger, reference, reward_model, tokenizer, held.prompts, held.ids, gold_fn=gold_fn, **sampling)
    challenger_scores = judge(own.responses)

    store = connect(ws.root, params.get("tracking"))
    client, name = store.client, store.registered_model
    untouched = "nothing was registered and @champion did not move"
    with registry_step(store.uri, "reading the champion", untouched):
        champion = version_by_alias(client, name, CHAMPION)
    if champion is not None:
        with registry_step(store.uri, f"downloading the champion (version {champion.version})", untouched), \
                downloaded_model(client, name, champion.version) as (model_dir, tokenizer_dir):
            champ_tok = load_tokenizer_from(str(tokenizer_dir))
            champ_model = load_causal_lm(str(model_dir)).eval()
            champ_ids = encode_prompts(champ_tok, held.prompts, held.messages)
            baseline_scores = judge(sample_responses(champ_model, champ_tok, champ_ids, **sampling))
        against = "champion"
    else:  # the first crown: the absolute gate against this run's SFT reference
        baseline_scores = judge(sample_responses(reference, tokenizer, held.ids, **sampling))
        against = "reference"
    decision = decide(challenger_scores, baseline_scores, own.metrics["kl_per_token"], cfg.criteria(ev.seed), against=against,
                      samples_per_prompt=k)

    record = {
        "metric": metric, "policy": cfg.policy, "against": against, "promoted": int(decision.promote),
        "decision": "promoted" if decision.promote else "kept",
        "reasons": decision.reasons, "n_prompts": decision.n, "samples_per_prompt": k, "win_rate": decision.win_rate,
        "mean_diff": decision.mean_diff, "ci_low": decision.ci_low, "ci_high": decision.ci_high,
        "p_value": decision.p_value, "kl_per_token": decision.kl,
        "challenger_score": sum(challenger_scores) / len(challenger_scores),
        "baseline_score": sum(baseline_scores) / len(baseline_scores),
        "previous_champion": champion.version if champion is not None else None,
        "seconds": round(time.perf_counter() - started, 2),
        COMPUTE_SECONDS: round(compute_seconds(), 2),
    }
    if tracker is not None and cfg.register:
        record.update(_register(params, ws, tracker, client, name, cfg.policy, tokenizer, record, store.uri))
    report = ws.reports(STAGE) / "decision.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(decision_report(record, cfg, name))
    write_json(ws.metrics(STAGE), record)
    print(f"[promote] {record['decision']}: " + ("; ".join(decision.reasons) or f"{cfg.policy} beats the {against}"), flush=True)
    if tracker is not None:
        tracker.log_artifact(report)
        champion_now = f"version {record['champion_version']}" if record.get("champion_version") else "no version"
        registered = (f"version {record['challenger_version']} of {name} is registered (@challenger) and @champion points at "
                      f"{champion_now}" if record.get("challenger_version") else "nothing was registered (promote.register is false)")
        with registry_step(store.uri, "tagging the pipeline's parent run with the decision",
                           f"{registered}, as decided; the parent run lacks its promotion.* tags"):
            _tag_parent(client, report, record)
    return {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextmanager
def registry_step(uri: str, doing: str, state: str) -> Iterator[None]:
    """A step of promote that talks to the registry: a tracking server that stops answering during it
    (:func:`~tasks.tracking.outage.is_outage`) becomes one :class:`~tasks.tracking.outage.TrackingUnavailable` naming
    the server, the step and ``state``, what the registry holds because of it. Other errors pass through."""
    from tasks.tracking.outage import TrackingUnavailable, is_outage, outage_reason

    try:
        yield
    except Exception as err:
        if not is_outage(err):
            raise
        raise TrackingUnavailable(
            f"the MLflow tracking server {uri} stopped answering ({outage_reason(err)}) while promote was {doing}: {state}. "
            "Once it answers, run the pipeline again: promote runs again, decides afresh against the champion then in "
            "service and registers a new version (`rlhf sync` sends what the stage run itself could not log).") from err


def _register(params, ws: Workspace, tracker, client, name: str, policy: str, tokenizer, record: dict,
              uri: str = "") -> dict[str, Any]:
    """Register the challenger (``@challenger``); on a win, point ``@champion`` at it. Returns the version facts."""
    from rlhf_core.models import load_causal_lm
    from tasks.registry import CHAMPION, register_model, set_alias
    from tasks.tracking.client import PARENT_RUN_ENV
    from tasks.tracking.dvc_hash import dvc_md5
    from tasks.tracking.gitinfo import git_info
    from tasks.tracking.values import params_hash

    git = git_info(ws.root)
    lineage = {
        "policy": policy, "git.commit": str(git.get("commit")), "git.dirty": str(git.get("dirty")),
        "data.digest": dvc_md5(ws.prepared, ws.root), "params.hash": params_hash(params),
        "pipeline.run_id": os.environ.get(PARENT_RUN_ENV, "") or tracker.run_id,
    }
    # Lineage and the decision with its evidence go on the version as it is created (one request).
    previous = f"version {record['previous_champion']}" if record["previous_champion"] else "no version"
    with registry_step(uri, "registering the challenger",
                       f"@champion did not move (it points at {previous}); the challenger may be partly registered: a "
                       f"model logged on the promote run {tracker.run_id}, perhaps a version of {name} without the "
                       f"@challenger alias (its tag pipeline.run_id is {lineage['pipeline.run_id']})"):
        version = register_model(client, tracker.run_id, load_causal_lm(str(ws.model(policy))), tokenizer, name,
                                 {**lineage, **promotion_tags(record)})
    if record["promoted"]:
        with registry_step(uri, f"moving @champion to version {version.version}",
                           f"version {version.version} of {name} is registered (@challenger) and tagged as promoted, but "
                           f"@champion may still point at {previous}"):
            set_alias(client, name, CHAMPION, version.version)
    return {"challenger_version": version.version,
            "champion_version": version.version if record["promoted"] else record["previous_champion"]}


def _tag_parent(client, report, record: dict[str, Any]) -> None:
    """The decision at a glance on the pipeline's parent run (when the flow runs this stage)."""
    from tasks.tracking.client import PARENT_RUN_ENV

    parent = os.environ.get(PARENT_RUN_ENV, "").strip()
    if not parent:
        return
    from mlflow.entities import RunTag

    client.log_batch(parent, tags=[RunTag(k, v) for k, v in promotion_tags(record).items()])
    client.log_artifact(parent, str(report), "promotion")


def promotion_tags(record: dict[str, Any]) -> dict[str, str]:
    """``promotion.*`` tags of a decision: on the registered version and on the pipeline's parent run."""
    tags = {"promotion.decision": record["decision"], "promotion.against": record["against"],
            "promotion.metric": record["metric"], "promotion.win_rate": f"{record['win_rate']:.4f}",
            "promotion.ci_low": f"{record['ci_low']:.4f}", "promotion.reasons": "; ".join(record["reasons"]) or "-",
            "promotion.previous_champion": str(record["previous_champion"] or "-")}  # versions: int or str by store
    for key in ("challenger_version", "champion_version"):
        if record.get(key):
            tags[f"promotion.{key}"] = str(record[key])
    return tags


def decision_report(record: dict[str, Any], cfg: PromoteConfig, name: str) -> str:
    """A page a person reads: the decision, the evidence, the criteria."""
    verdict = "PROMOTED to @champion" if record["promoted"] else "KEPT the current champion" if record["against"] == "champion" \
        else "NOT CROWNED (no champion yet)"
    lines = [
        f"# Promotion decision: {verdict}", "",
        f"- model: `{name}`; challenger: `{cfg.policy}`" + (f" (version {record['challenger_version']})" if record.get("challenger_version") else ""),
        f"- compared with: the {record['against']}" + (f" (version {record['previous_champion']})" if record["previous_champion"] else " (this run's SFT policy: first crown)"),
        f"- judge: `{record['metric']}` on {record['n_prompts']} held-out prompts × {record['samples_per_prompt']} sample(s), "
        "both policies sampled in this run (sample j against sample j of the same prompt)", "",
        "| evidence | value | criterion |", "|---|---|---|",
        f"| paired win rate | {record['win_rate']:.3f} | >= {cfg.min_win_rate} |",
        f"| mean gain (challenger − {record['against']}) | {record['mean_diff']:+.4f} | |",
        f"| bootstrap interval of the gain ({cfg.confidence:.0%} one-sided bounds) | [{record['ci_low']:+.4f}, {record['ci_high']:+.4f}] | "
        + (f"lower > 0 ({cfg.test})" if cfg.confidence > 0 else "off") + " |",
        f"| sign-test p-value | {record['p_value']:.4f} | " + (f"< {1 - cfg.confidence:.3f} (sign)" if cfg.test == "sign" else "reported") + " |",
        f"| KL to the reference (nats/token) | {record['kl_per_token']:.4f} | " + (f"<= {cfg.max_kl}" if cfg.max_kl is not None else "no budget") + " |",
        f"| mean score: challenger / {record['against']} | {record['challenger_score']:.4f} / {record['baseline_score']:.4f} | |",
        "",
    ]
    if record["reasons"]:
        lines += ["Why not:", *[f"- {r}" for r in record["reasons"]], ""]
    lines.append("Override: `rlhf promote <PIPELINE_RUN_ID> --force` (recorded as forced).")
    return "\n".join(lines) + "\n"


def main() -> None:
    from tasks.stage_main import stage_main

    stage_main(STAGE, run)


if __name__ == "__main__":
    main()
