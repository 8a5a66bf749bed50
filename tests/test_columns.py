"""Renaming a source's columns (``prepare.<role>_columns``): StackExchange-paired and Orca DPO pairs read as they are
published, the quarantine keeps each record as the file has it, and bad mappings are refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_core.data.cleaning import load_clean
from rlhf_core.data.columns import check_columns, check_mapping, renamed
from rlhf_core.data.formats import DataFormatError

STACK_EXCHANGE = {"question": "prompt", "response_j": "chosen", "response_k": "rejected"}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_renamed_columns_are_detected_and_cleaned_and_the_quarantine_keeps_the_file_s_names(tmp_path: Path) -> None:
    rows = [{"qid": i, "question": f"Q{i}?", "response_j": f"good {i}", "response_k": f"bad {i}"} for i in range(4)]
    rows[2]["response_k"] = rows[2]["response_j"]  # chosen equals rejected
    result = load_clean(_jsonl(tmp_path / "se.jsonl", rows), "preference", columns=STACK_EXCHANGE)
    assert result.format == "prompt_chosen_rejected"
    assert result.dataset["prompt"] == ["Q0?", "Q1?", "Q3?"] and result.dataset["chosen"] == ["good 0", "good 1", "good 3"]
    [bad] = result.invalid
    assert bad.rule == "chosen_equals_rejected" and bad.where.row == 3 and bad.record == rows[2]  # as in the file


def test_without_the_mapping_the_same_file_is_not_recognised(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "se.jsonl", [{"question": "Q?", "response_j": "a", "response_k": "b"}])
    with pytest.raises(DataFormatError, match="cannot recognise preference data with columns"):
        load_clean(path, "preference")


def test_orca_pairs_keep_their_system_message(tmp_path: Path) -> None:
    rows = [{"system": "You are an AI assistant.", "question": "2+2?", "chosen": "4", "rejected": "5"}]
    result = load_clean(_jsonl(tmp_path / "orca.jsonl", rows), "preference", columns={"question": "prompt"})
    assert result.dataset[0]["prompt_messages"] == [
        {"role": "system", "content": "You are an AI assistant."}, {"role": "user", "content": "2+2?"}]


@pytest.mark.parametrize("mapping, message", [
    ({"nope": "prompt"}, r"cannot rename \['nope'\]: no such column; found \['question', 'chosen', 'rejected'\]"),
    ({"question": "chosen"}, "renaming 'question' -> 'chosen' would collide with a column"),
])
def test_a_mapping_that_does_not_fit_the_data_names_the_file_and_columns(tmp_path: Path, mapping, message) -> None:
    path = _jsonl(tmp_path / "pairs.jsonl", [{"question": "Q?", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataFormatError, match=f"{path}: {message}"):
        load_clean(path, "preference", columns=mapping)


def test_swapping_two_columns_is_not_a_collision() -> None:
    mapping = check_mapping({"chosen": "rejected", "rejected": "chosen"})
    check_columns(["prompt", "chosen", "rejected"], mapping, "f.jsonl")
    assert renamed({"prompt": "p", "chosen": "a", "rejected": "b"}, mapping) == {"prompt": "p", "rejected": "a", "chosen": "b"}


@pytest.mark.parametrize("mapping, message", [
    ({"a": "prompt", "b": "prompt"}, "both 'a' and 'b' are renamed to 'prompt'"),
    ({"a": 3}, "every entry must map a column name to a column name"),
    (["question"], "expected a mapping"),
])
def test_bad_mappings_are_refused_by_the_prepare_config(mapping, message) -> None:
    from rlhf_core.config import config_from_dict
    from tasks.prepare import PrepareConfig

    with pytest.raises(ValueError, match=f"prepare.preference_columns.*{message}"):
        config_from_dict(PrepareConfig, {"preference_columns": mapping}, section="prepare")


def test_prepare_reads_a_source_through_its_mapping_set_on_the_command_line(tmp_path: Path) -> None:
    """``--set prepare.preference_columns={...}`` (YAML flow mapping, as ``rlhf run --set`` writes it), then the stage."""
    import tasks.prepare
    from tests.test_cleaning_stages import _split_rows, _workspace

    rows = [{"question": f"Question {i}?", "response_j": f"good {i}.", "response_k": f"bad {i}."} for i in range(40)]
    ws, data, params = _workspace(tmp_path, [], "prepare.preference_columns={question: prompt, response_j: chosen, response_k: rejected}")
    _jsonl(data, rows)
    assert params["prepare"]["preference_columns"] == STACK_EXCHANGE
    tasks.prepare.run(params, ws)
    prepared = _split_rows(ws, "pref_train") + _split_rows(ws, "pref_test")
    assert sorted(r["prompt"] for r in prepared) == sorted(r["question"] for r in rows)
    assert all(r["chosen"] == r["prompt"].replace("Question", "good").replace("?", ".") for r in prepared)
