"""``--set`` overrides: a minimal edit of params.yaml (every other byte kept), rejected forms named, nothing written on error."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tasks.params import ParamsError, apply_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def params(tmp_path: Path) -> Path:
    dest = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", dest)
    return dest


def _changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    a, b = before.splitlines(), after.splitlines()
    assert len(a) == len(b)
    return [(x, y) for x, y in zip(a, b) if x != y]


def test_only_the_overridden_values_change_comments_and_nulls_stay(params):
    before = params.read_text()
    changed = apply_overrides(params, ["dpo.beta=0.25", "model.tiny.n_layer=3", "prepare.max_rows=100"])
    assert changed == {"dpo.beta": (0.1, 0.25), "model.tiny.n_layer": (2, 3), "prepare.max_rows": (None, 100)}
    diff = _changed_lines(before, params.read_text())
    assert [(x.strip(), y.strip()) for x, y in diff] == [
        ("n_layer: 2", "n_layer: 3"), ("max_rows: null", "max_rows: 100"), ("beta: 0.1", "beta: 0.25")]
    assert "name_or_path: null          # a local folder" in params.read_text()  # untouched nulls and comments
    loaded = yaml.safe_load(params.read_text())
    assert loaded["dpo"]["beta"] == 0.25 and loaded["model"]["tiny"]["n_layer"] == 3


def test_a_commented_value_keeps_its_comment_and_strings_round_trip(params):
    apply_overrides(params, ["tracking.uri=http://127.0.0.1:5000", "dpo.loss_type='ipo'"])
    text = params.read_text()
    assert "uri: http://127.0.0.1:5000" in text and "# null: $MLFLOW_TRACKING_URI" in text
    assert "loss_type: ipo" in text and "# dpo only:" in text
    loaded = yaml.safe_load(text)
    assert loaded["tracking"]["uri"] == "http://127.0.0.1:5000" and loaded["dpo"]["loss_type"] == "ipo"


def test_a_key_the_group_lacks_is_added_as_one_line_at_the_groups_end(params):
    before = params.read_text()
    apply_overrides(params, ["dpo.simpo_gamma=1.5"])
    after = params.read_text()
    assert len(after.splitlines()) == len(before.splitlines()) + 1
    assert yaml.safe_load(after)["dpo"]["simpo_gamma"] == 1.5
    assert after.replace("  simpo_gamma: 1.5\n", "", 1) == before


@pytest.mark.parametrize("override,message", [
    ("dpo=0.2", "dpo is a group"),
    ("nonexistent.key=1", "nonexistent is not a group"),
    ("dpo.beta", "expected KEY=VALUE"),
    ("model.tiny=3", "nested group"),
    ("model.tiny.arch.x=1", "not a group"),
    ("dpo.beta=[1,", "not valid YAML"),
])
def test_bad_override_forms_are_named_and_nothing_is_written(params, override, message):
    before = params.read_text()
    with pytest.raises(ParamsError, match=message):
        apply_overrides(params, ["dpo.beta=0.3", override])
    assert params.read_text() == before


def test_a_failing_check_writes_nothing(params):
    before = params.read_text()

    def check(values):
        if values["dpo"]["beta"] <= 0:
            raise ParamsError("dpo.beta must be > 0")

    with pytest.raises(ParamsError, match="beta must be > 0"):
        apply_overrides(params, ["dpo.beta=-1"], check=check)
    assert params.read_text() == before


def test_lists_are_replaced_as_one_flow_value_block_or_flow(params):
    before = params.read_text()
    apply_overrides(params, ["evaluate.max_prompts=[1, 2]", "grpo.rewards=[{name: length, target: 4}]"])
    after = params.read_text()
    loaded = yaml.safe_load(after)
    assert loaded["evaluate"]["max_prompts"] == [1, 2]
    assert loaded["grpo"]["rewards"] == [{"name": "length", "target": 4}]
    assert "# rlhf_core.reward_registry" in after  # the block list's comment stays on its key line
    assert len(after.splitlines()) == len(before.splitlines()) - 1  # the one item line folded into the key line
    assert loaded["grpo"]["max_updates"] == yaml.safe_load(before)["grpo"]["max_updates"]
