"""`auto` length settings: the percentile, the rules of tasks/lengths.py, and what a stage records."""

from __future__ import annotations

import json

import pytest
import yaml

from rlhf_core.data.lengths import percentile, summarise
from tasks.lengths import AUTO, SETTINGS, LengthsError, auto_everywhere, resolve, with_auto_lengths
from tasks.workspace import Workspace
from tests.workspace_factory import PROJECT


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 99) == 99 and percentile(values, 100) == 100 and percentile(values, 50) == 50
    assert percentile([7], 99) == 7 and percentile([3, 1, 2], 34) == 2  # ceil(0.34 * 3) = 2nd smallest
    with pytest.raises(ValueError):
        percentile([], 99)
    with pytest.raises(ValueError):
        percentile([1], 0)
    assert summarise({"prompt": [1, 2, 3, 10]}, 50) == {"prompt": {"n": 4, "p": 2, "max": 10, "mean": 4.0}}


def _stats(context: int | None, *, prompt=20, completion=30, total=45, held_out_prompt=25) -> dict:
    def kind(parts):
        return {"percentile": 99.0, "context_length": context, "parts": {k: {"p": v} for k, v in parts.items()}}
    return {
        "sft": kind({"prompt": prompt, "completion": completion, "total": total}),
        "preference": kind({"prompt": prompt, "completion": completion, "total": total + 5}),
        "prompt": kind({"prompt": held_out_prompt}),
    }


def test_auto_rules_uncapped_follow_the_data():
    everything = auto_everywhere(_stats(1000))
    assert everything == {
        "validate.max_prompt_tokens": 25,  # the kind with the longest prompts
        "sft.max_length": 45, "sft.max_prompt_length": 20,
        "reward.max_length": 50, "reward.max_prompt_length": 20,
        "dpo.max_length": 50, "dpo.max_prompt_length": 20,
        "ppo.max_new_tokens": 30, "ppo.max_length": 25 + 30,  # the longest prompts generated from + the responses
        "grpo.max_new_tokens": 30, "grpo.max_length": 25 + 30,  # the same rules as PPO
        "evaluate.max_new_tokens": 30,
    }
    assert set(everything) == {f"{stage}.{key}" for stage, keys in SETTINGS.items() for key in keys}
    assert auto_everywhere(_stats(None)) == everything  # no context length stated: nothing to cap


def test_auto_rules_are_capped_by_the_context_length():
    capped = auto_everywhere(_stats(40))
    assert capped["sft.max_length"] == 40 and capped["dpo.max_length"] == 40
    assert capped["sft.max_prompt_length"] == 20  # below max_length - 1: the data's value
    assert capped["validate.max_prompt_tokens"] == 25
    assert capped["ppo.max_new_tokens"] == 15 and capped["evaluate.max_new_tokens"] == 15  # the room prompts leave: 40 - 25
    assert capped["ppo.max_length"] == 40
    tight = auto_everywhere(_stats(28))
    assert tight["ppo.max_new_tokens"] == 7  # prompts leave 3 tokens: a quarter of the context instead
    assert tight["validate.max_prompt_tokens"] == 25 and auto_everywhere(_stats(20))["validate.max_prompt_tokens"] == 19


def test_explicit_numbers_are_kept_and_used_by_the_rules_that_build_on_them():
    stats = _stats(1000)
    assert resolve("ppo", {"max_new_tokens": 8, "max_length": AUTO}, stats) == {"max_length": 25 + 8}
    assert resolve("sft", {"max_length": 32, "max_prompt_length": AUTO}, stats) == {"max_prompt_length": 20}
    assert resolve("sft", {"max_length": 16, "max_prompt_length": AUTO}, stats) == {"max_prompt_length": 15}
    assert resolve("sft", {"max_length": 64}, stats) == {}


def test_with_auto_lengths_reads_the_stage_files_and_names_what_it_used(tmp_path):
    ws = Workspace(tmp_path)
    params = {"sft": {"max_length": AUTO, "learning_rate": 0.1}, "dpo": {"max_length": 64}}
    assert with_auto_lengths(params, ws, "dpo") == (params, {})  # nothing auto: untouched, nothing read
    with pytest.raises(LengthsError, match="data/prepared/lengths/sft.json"):
        with_auto_lengths(params, ws, "sft")
    (ws.prepared / "lengths").mkdir(parents=True)
    (ws.prepared / "lengths" / "sft.json").write_text(json.dumps(_stats(1000)["sft"]))
    resolved, used = with_auto_lengths(params, ws, "sft")
    assert resolved["sft"] == {"max_length": 45, "learning_rate": 0.1} and used == {"lengths/sft.max_length": 45}
    assert params["sft"]["max_length"] == AUTO  # the caller's params are not changed


def test_the_default_run_keeps_its_numbers():
    """`auto` is opt-in: params.yaml's explicit lengths stay the default run's."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert all(params[stage].get(key) != AUTO for stage, keys in SETTINGS.items() for key in keys)
    assert params["prepare"]["length_percentile"] == 99
