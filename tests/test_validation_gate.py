"""The data gate: clean sets pass; each malformed set fails exactly the rule that names its defect.

All malformed datasets go through one ``validate_frames`` call (module-scoped fixture), so GX is
imported and run once for them; the clean sets through another.
"""

from __future__ import annotations

import copy
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tasks.validation import ValidationConfig, ValidationReport, validate_frames

N = 12
CFG = ValidationConfig(min_rows=10, max_chars=200, max_prompt_tokens=32, max_truncation_drop_fraction=0.1)
TOPICS = ["tides", "rust", "bread", "owls", "chess", "rain", "glass", "bees", "maps", "ice", "jazz", "salt", "moss", "kites"]


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt}]


def sft_records(n: int = N) -> list[dict[str, Any]]:
    prompts = [f"Explain {TOPICS[i % len(TOPICS)]} in one line ({i})." for i in range(n)]
    return [
        {"prompt": p, "prompt_messages": _messages(p), "completion": f"A short answer about item {i}."}
        for i, p in enumerate(prompts)
    ]


def pref_records(n: int = N) -> list[dict[str, Any]]:
    return [
        {**{k: r[k] for k in ("prompt", "prompt_messages")}, "chosen": f"Helpful reply {i}.", "rejected": f"Unhelpful reply {i}."}
        for i, r in enumerate(sft_records(n))
    ]


def prompt_records(n: int = N) -> list[dict[str, Any]]:
    return [{k: r[k] for k in ("prompt", "prompt_messages")} for r in sft_records(n)]




def _set(rows: list[dict[str, Any]], index: int, **values: Any) -> list[dict[str, Any]]:
    rows = copy.deepcopy(rows)
    rows[index].update(values)
    return rows


def _frame(rows: list[dict[str, Any]], drop: str | None = None, tokens: list[int] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if drop is not None:
        frame = frame.drop(columns=[drop])
    if tokens is not None:
        frame["prompt_tokens"] = tokens
    return frame


# name -> (kind, frame, the rules that must fail: no more, no fewer)
TOO_LONG = "y" * (CFG.max_chars + 1)
MALFORMED: dict[str, tuple[str, pd.DataFrame, set[str]]] = {
    "missing_chosen": ("preference", _frame(pref_records(), drop="chosen"), {"chosen column present"}),
    "null_completion": ("sft", _frame(_set(sft_records(), 3, completion=None)), {"completion not null"}),
    # "" is both shorter than min_chars and blank.
    "empty_prompt": ("sft", _frame(_set(sft_records(), 2, prompt="")), {"prompt length within limits", "prompt not blank"}),
    "whitespace_completion": ("sft", _frame(_set(sft_records(), 4, completion=" \n\t ")), {"completion not blank"}),
    "too_long_rejected": (
        "preference",
        _frame([{**r, "rejected": TOO_LONG + str(i)} if i < 7 else r for i, r in enumerate(pref_records())]),
        {"rejected length within limits"},
    ),
    "int_chosen": ("preference", _frame(_set(pref_records(), 6, chosen=42)), {"chosen is text"}),
    # A list cell is not hashable, so the uniqueness rule cannot be evaluated either (and says so).
    "list_chosen": ("preference", _frame(_set(pref_records(), 6, chosen=["a", "list"])), {"chosen is text", "no duplicate pairs"}),
    "chosen_equals_rejected": (
        "preference",
        _frame(_set(pref_records(), 5, chosen="Same words.", rejected="Same words.")),
        {"chosen differs from rejected"},
    ),
    "duplicate_pairs": ("preference", _frame(_set(pref_records(), 8, **pref_records()[1])), {"no duplicate pairs"}),
    "duplicate_sft_rows": ("sft", _frame(_set(sft_records(), 9, **sft_records()[0])), {"no duplicate pairs"}),
    "too_few_rows": ("prompt", _frame(prompt_records(CFG.min_rows - 1)), {"enough rows"}),
    # 2 of 12 prompts (16.7%) exceed max_prompt_tokens, more than the 10% allowed.
    "overlong_prompts": (
        "prompt",
        _frame(prompt_records(), tokens=[40, 33] + [32] * (N - 2)),
        {"prompt tokens within max_prompt_tokens"},
    ),
    "missing_prompt": ("prompt", _frame(prompt_records(), drop="prompt"), {"prompt column present"}),
    "bad_prompt_messages": (
        "sft",
        _frame(_set(sft_records(), 1, prompt_messages=[{"role": "robot", "content": "hi"}])),
        {"prompt_messages is a chat"},
    ),
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> ValidationReport:
    frames = {name: (kind, frame) for name, (kind, frame, _) in MALFORMED.items()}
    return validate_frames(frames, CFG, tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> ValidationReport:
    boundary = pref_records()
    boundary[0]["chosen"] = "z" * CFG.max_chars  # exactly at the limit
    frames = {
        "sft_train": ("sft", _frame(sft_records())),
        "pref_train": ("preference", _frame(boundary)),
        # 1 of 12 prompts (8.3%) too long: within the 10% allowed.
        "prompts": ("prompt", _frame(prompt_records(), tokens=[99] + [5] * (N - 1))),
    }
    return validate_frames(frames, CFG, tmp_path_factory.mktemp("good"))


def test_clean_sets_pass(good: ValidationReport) -> None:
    assert good.success, good.summary()
    assert good.failures == []
    lines = good.summary().splitlines()
    for name in ("sft_train", "pref_train", "prompts"):
        assert [line for line in lines if name in line and "OK" in line], good.summary()
    # The token rule ran (and tolerated the one long prompt) rather than being left out.
    rules = {r.rule: r for r in good.datasets["prompts"].rules}
    assert rules["prompt tokens within max_prompt_tokens"].unexpected_count == 1
    assert "chosen differs from rejected" in {r.rule for r in good.datasets["pref_train"].rules}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_set_fails_the_right_rule(bad: ValidationReport, name: str) -> None:
    expected = MALFORMED[name][2]
    failed = {f.rule for f in bad.failures if f.dataset == name}
    assert failed == expected
    assert not bad.datasets[name].success
    block = _summary_block(bad.summary(), name)
    for rule in expected:
        assert f"- {rule} [" in block, block


def _summary_block(summary: str, name: str) -> str:
    """The summary lines of one dataset: its FAIL header up to the next dataset header."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(("FAIL", "OK")) and f" {name} (" in line)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith(("FAIL", "OK", "Report:"))), len(lines))
    return "\n".join(lines[start:end])


def _failure(report: ValidationReport, dataset: str, rule: str):
    (failure,) = [f for f in report.failures if f.dataset == dataset and f.rule == rule]
    return failure


def test_failures_carry_counts_and_example_rows(bad: ValidationReport) -> None:
    same = _failure(bad, "chosen_equals_rejected", "chosen differs from rejected")
    assert same.unexpected_count == 1 and same.column == "chosen, rejected"
    assert same.examples == [{"row": 5, "chosen": "Same words.", "rejected": "Same words."}]
    assert "row 5: chosen='Same words.'" in bad.summary()

    null = _failure(bad, "null_completion", "completion not null")
    assert null.unexpected_count == 1 and [e["row"] for e in null.examples] == [3]

    dup = _failure(bad, "duplicate_pairs", "no duplicate pairs")
    assert sorted(e["row"] for e in dup.examples) == [1, 8]

    long = _failure(bad, "too_long_rejected", "rejected length within limits")
    assert long.unexpected_count == 7
    assert len(long.examples) == 5  # capped
    assert all(len(e["rejected"]) < len(TOO_LONG) for e in long.examples)  # long texts are cut

    tokens = _failure(bad, "overlong_prompts", "prompt tokens within max_prompt_tokens")
    assert tokens.unexpected_count == 2 and "10.0% allowed" in tokens.detail

    rows = _failure(bad, "too_few_rows", "enough rows")
    assert str(CFG.min_rows - 1) in rows.detail and str(CFG.min_rows) in rows.detail

    unhashable = _failure(bad, "list_chosen", "no duplicate pairs")
    assert "could not be evaluated" in unhashable.detail


def test_missing_column_skips_its_rules_instead_of_crashing(bad: ValidationReport) -> None:
    skipped = bad.datasets["missing_chosen"].skipped
    assert {"chosen not null", "chosen is text", "chosen differs from rejected", "no duplicate pairs"} <= set(skipped)
    assert "rejected not null" not in skipped
    assert "column 'chosen' is missing" in _failure(bad, "missing_chosen", "chosen column present").detail


def test_json_and_data_docs_written_on_failure(bad: ValidationReport) -> None:
    data = json.loads((bad.report_dir / "validation.json").read_text())
    assert data["success"] is False
    assert set(data["datasets"]) == set(MALFORMED)
    assert data["failed_rules"] == len(bad.failures)
    assert data["config"]["max_chars"] == CFG.max_chars
    entry = data["datasets"]["chosen_equals_rejected"]
    assert entry["success"] is False and entry["kind"] == "preference" and entry["rows"] == N
    (rule,) = [r for r in entry["rules"] if r["rule"] == "chosen differs from rejected"]
    assert rule["expectation_type"] == "expect_column_pair_values_to_differ"
    assert rule["columns"] == ["chosen", "rejected"]
    assert rule["success"] is False and rule["unexpected_count"] == 1
    assert rule["unexpected_percent"] == pytest.approx(100 / N)
    assert rule["examples"][0]["row"] == 5
    docs = bad.report_dir / "data_docs"
    assert (docs / "index.html").is_file()
    pages = list((docs / "validations").rglob("*.html"))
    assert len(pages) == len(MALFORMED)
    assert "chosen_equals_rejected" in (docs / "index.html").read_text()
    assert bad.to_dict() == data


def test_json_and_data_docs_written_on_success(good: ValidationReport) -> None:
    data = json.loads((good.report_dir / "validation.json").read_text())
    assert data["success"] is True and data["failed_rules"] == 0
    assert (good.report_dir / "data_docs" / "index.html").is_file()


def test_allow_duplicate_pairs_drops_the_rule(tmp_path: Path) -> None:
    kind, frame, _ = MALFORMED["duplicate_pairs"]
    report = validate_frames({"dups": (kind, frame)}, ValidationConfig(min_rows=10, allow_duplicate_pairs=True), tmp_path)
    assert report.success, report.summary()


def test_real_hh_rlhf_slice_flags_its_empty_chosen_reply(fixtures_dir: Path, tmp_path: Path) -> None:
    """The public HH-RLHF slice holds one pair with an empty chosen reply (source row 86, position 17)."""
    import datasets

    from rlhf_core.data.formats import normalize

    with gzip.open(fixtures_dir / "public" / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as handle:
        rows = [json.loads(line) for line in handle]
    frame = normalize(datasets.Dataset.from_list(rows), "preference", "hh_rlhf").to_pandas()
    report = validate_frames({"hh": ("preference", frame)}, ValidationConfig(min_rows=10), tmp_path)
    assert {f.rule for f in report.failures} == {"chosen length within limits", "chosen not blank"}
    assert all([e["row"] for e in f.examples] == [17] for f in report.failures)


def test_bad_calls_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'x'.*unknown kind 'pairs'"):
        validate_frames({"x": ("pairs", _frame(sft_records()))}, CFG, tmp_path)
    with pytest.raises(TypeError, match="'x'.*DataFrame"):
        validate_frames({"x": ("sft", sft_records())}, CFG, tmp_path)
    with pytest.raises(ValueError, match="no datasets"):
        validate_frames({}, CFG, tmp_path)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"min_rows": -1}, "min_rows"),
        ({"min_chars": 10, "max_chars": 5}, "max_chars"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
        ({"max_truncation_drop_fraction": 1.5}, "max_truncation_drop_fraction"),
        ({"allow_duplicate_pairs": "no"}, "allow_duplicate_pairs"),
    ],
)
def test_config_rejects_bad_values(values: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ValidationConfig(**values)


def test_package_import_does_not_load_great_expectations() -> None:
    code = "import sys, tasks.validation; sys.exit('great_expectations' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0
