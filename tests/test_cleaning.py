"""Row-level cleaning (rlhf_core.data.cleaning): each rule sets aside the right rows, named by their
place in the source file (line of a JSON Lines file, index in a JSON array or Parquet file)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from rlhf_core.data.cleaning import InvalidRowsError, load_clean
from rlhf_core.data.formats import DataFormatError
from rlhf_core.data.loading import DataLoadError
from rlhf_core.data.rows import SOURCE_COLUMNS, read_rows
from rlhf_core.data.rules import RULES

H, A = "\n\nHuman:", "\n\nAssistant:"


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _jsonl(path: Path, lines: list[Any]) -> Path:
    """One line per item: dicts as JSON, strings written as they are (to break the format on purpose)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def _pair(i: int, **change: Any) -> dict[str, Any]:
    return {"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}.", **change}


def _hh(i: int, chosen: str | None = None, rejected: str | None = None) -> dict[str, str]:
    prompt = f"{H} Hi {i}{A} Hello.{H} Tell joke {i}.{A}"
    return {"chosen": chosen if chosen is not None else prompt + " A joke.", "rejected": rejected if rejected is not None else prompt + " No."}


def _invalid(result) -> dict[int, str]:
    return {row.where.row: row.rule for row in result.invalid}


# Lines of one JSON Lines file (line n = item n-1) and the rule each bad line breaks.
PREFERENCE_LINES: list[Any] = [
    _pair(1),
    _pair(2, chosen=""),  # line 2
    '{"prompt": "Question 3?", "chosen": "Good',  # line 3: broken JSON in the middle of the file
    _pair(4, rejected=None),  # line 4
    {"prompt": "Question 5?", "chosen": "Good answer 5."},  # line 5: no rejected
    _pair(6, chosen=42),  # line 6
    _pair(7, prompt="Nul\x00 byte"),  # line 7
    _pair(8, rejected="Good answer 8."),  # line 8
    _pair(1),  # line 9: the same pair as line 1
    '["not", "an", "object"]',  # line 10
    _pair(11, chosen="Tabs\tnew\nlines\r\nare fine."),
    _pair(12, rejected="Escape \x1b[31m red"),  # line 12
    _pair(13, chosen="   \n "),  # line 13
]
PREFERENCE_RULES = {
    2: "blank_text", 3: "unparseable", 4: "missing_field", 5: "missing_field", 6: "not_text", 7: "control_characters",
    8: "chosen_equals_rejected", 9: "duplicate", 10: "unparseable", 12: "control_characters", 13: "blank_text",
}


def test_each_rule_drops_its_rows_named_by_source_line(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "pairs.jsonl", PREFERENCE_LINES)
    result = load_clean(path, "preference", policy="drop")
    assert _invalid(result) == PREFERENCE_RULES
    assert all(row.where.file == str(path) and row.where.unit == "line" for row in result.invalid)
    assert result.rows_read == len(PREFERENCE_LINES)
    assert sorted(result.dataset["source_row"]) == [1, 11]
    assert result.dataset.column_names == ["prompt", "prompt_messages", "chosen", "rejected", *SOURCE_COLUMNS]
    assert result.dataset[1]["chosen"] == "Tabs\tnew\nlines\r\nare fine."
    counts = result.counts()
    assert list(counts) == list(RULES)  # every rule, zeros included
    assert counts["unparseable"] == 2 and counts["blank_text"] == 2 and counts["hh_prompts_differ"] == 0
    broken = next(r for r in result.invalid if r.where.row == 3)
    assert "malformed JSON" in broken.detail and broken.record.startswith('{"prompt": "Question 3?"')
    dup = next(r for r in result.invalid if r.rule == "duplicate")
    assert "line 1" in dup.detail


def test_fail_policy_reports_every_rule_with_source_lines(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "pairs.jsonl", PREFERENCE_LINES)
    with pytest.raises(InvalidRowsError) as err:
        load_clean(path, "preference", policy="fail")
    message = str(err.value)
    assert f"{path}: 11 of 13 rows invalid" in message
    assert f"{path} line 3: malformed JSON" in message
    for rule in set(PREFERENCE_RULES.values()):
        assert f"  {rule}: " in message
    assert "prepare.invalid_rows: drop" in message
    assert isinstance(err.value, DataFormatError)  # stages print it once, without a traceback
    assert len(err.value.result.invalid) == 11


def test_sft_rules_and_first_duplicate_is_kept(tmp_path: Path) -> None:
    lines = [
        {"prompt": "Say a.", "completion": "a"},
        {"prompt": "Say b.", "completion": " "},  # line 2
        {"prompt": "Say a.", "completion": "a "},  # line 3: the same once normalised (completions are stripped)
        {"prompt": "Say c.", "completion": "c\x7f"},  # line 4: DEL
        {"prompt": "Say d.", "completion": "d\u0085d"},  # line 5: a C1 control (NEL)
        {"prompt": "Say e.", "completion": "e"},
    ]
    result = load_clean(_jsonl(tmp_path / "sft.jsonl", lines), "sft")
    assert _invalid(result) == {2: "blank_text", 3: "duplicate", 4: "control_characters", 5: "control_characters"}
    assert result.dataset["source_row"] == [1, 6]


def test_prompt_data_may_repeat_prompts(tmp_path: Path) -> None:
    result = load_clean(_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q"}, {"prompt": "Q"}, {"prompt": ""}]), "prompt")
    assert _invalid(result) == {3: "blank_text"}


def test_hh_rules(tmp_path: Path) -> None:
    diverged = {"chosen": f"{H} Hi{A} Hello.{H} Joke?{A} Ha.", "rejected": f"{H} Hi{A} Go away.{H} Joke?{A} No."}
    truncated = {"chosen": f"{H} Hi{A} Hello.{H} Joke?{A} Ha.", "rejected": f"{H} Hi{A} Hello."}
    lines = [
        _hh(1),
        {"chosen": f"{H} no cue here", "rejected": f"{H} none here either"},  # line 2
        diverged,  # line 3: the replies differ before the last human turn
        truncated,  # line 4: rejected stops a turn early
        _hh(5, chosen=f"{H} Hi 5{A} Hello.{H} Tell joke 5.{A} "),  # line 5: empty chosen reply, as in HH-RLHF
        {"chosen": "Hi without a tag", "rejected": "Hi without a tag either"},  # line 6: no assistant turn at all
        _hh(7),
    ]
    result = load_clean(_jsonl(tmp_path / "hh.jsonl", lines), "preference", "hh_rlhf")
    assert _invalid(result) == {
        2: "hh_no_assistant_turn", 3: "hh_prompts_differ", 4: "hh_prompts_differ", 5: "blank_text", 6: "hh_no_assistant_turn",
    }


def test_other_format_rules_are_malformed(tmp_path: Path) -> None:
    lines = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},  # line 2
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "b"}]},  # line 3
    ]
    result = load_clean(_jsonl(tmp_path / "m.jsonl", lines), "sft")
    assert _invalid(result) == {2: "malformed", 3: "missing_field"}


def test_json_array_and_parquet_rows_are_named_by_index(tmp_path: Path) -> None:
    rows = [_pair(0), _pair(1, chosen=""), _pair(2), _pair(0)]
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps(rows, indent=2))
    result = load_clean(array, "preference")
    assert [(str(r.where), r.rule) for r in result.invalid] == [(f"{array} index 1", "blank_text"), (f"{array} index 3", "duplicate")]
    parquet = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    result = load_clean(parquet, "preference")
    assert [(r.where.row, r.where.unit) for r in result.invalid] == [(1, "index"), (3, "index")]
    assert result.dataset["source_row"] == [0, 2]


def test_non_object_array_element_is_unparseable_and_a_broken_array_fails_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([_pair(0), "text", _pair(2)]))
    assert _invalid(load_clean(path, "preference")) == {1: "unparseable"}
    path.write_text('[\n {"prompt": "a"},\n {"prompt": "b"\n]\n')
    with pytest.raises(DataLoadError, match=r"a\.json: malformed JSON at line 4"):
        load_clean(path, "preference")


def test_gzip_bom_crlf_and_non_utf8_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl.gz"
    body = b"\xef\xbb\xbf" + json.dumps(_pair(1)).encode() + b"\r\n" + b'{"prompt": "\xff"}\r\n\r\n' + json.dumps(_pair(4)).encode()
    with gzip.open(path, "wb") as handle:
        handle.write(body)
    result = load_clean(path, "preference")
    assert _invalid(result) == {2: "unparseable"}
    assert "not UTF-8" in result.invalid[0].detail
    assert result.dataset["source_row"] == [1, 4]


def test_a_line_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [_pair(1, chosen="one\u2028two"), _pair(2)])
    result = load_clean(path, "preference")
    assert result.invalid == [] and result.dataset["source_row"] == [1, 2]


def test_source_name_is_what_reports_show(tmp_path: Path) -> None:
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    _jsonl(snapshot / "train.jsonl", [_pair(1), _pair(1)])
    result = load_clean(snapshot, "preference", source_name="s3://bucket/train.jsonl")  # a snapshot of one object
    assert str(result.invalid[0].where) == "s3://bucket/train.jsonl line 2"
    assert result.dataset["source_file"] == ["s3://bucket/train.jsonl"]
    _jsonl(snapshot / "more.jsonl", [_pair(3)])
    result = load_clean(snapshot, "preference", source_name="s3://bucket/data/")  # a snapshot of a prefix
    assert sorted(set(result.dataset["source_file"])) == ["s3://bucket/data/more.jsonl", "s3://bucket/data/train.jsonl"]
    with pytest.raises(DataLoadError, match="^s3://bucket/gone.jsonl: no such file"):
        load_clean(tmp_path / "gone.jsonl", "preference", source_name="s3://bucket/gone.jsonl")


def test_format_is_detected_past_broken_first_rows(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", ["{broken", {"prompt": None, "chosen": "x", "rejected": "y"}, _pair(3)])
    result = load_clean(path, "preference")
    assert result.format == "prompt_chosen_rejected"
    assert _invalid(result) == {1: "unparseable", 2: "missing_field"}


def test_no_valid_row_left_fails_even_when_dropping(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [_pair(1, chosen=""), _pair(2, chosen="")])
    with pytest.raises(InvalidRowsError, match="No valid row is left"):
        load_clean(path, "preference", policy="drop")


def test_a_column_no_row_has_is_a_format_error_not_a_row_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    with pytest.raises(DataFormatError, match=r"needs columns \['prompt', 'completion'\]; missing \['completion'\]"):
        load_clean(path, "sft", "prompt_completion")


def test_csv_pairs_are_cleaned_row_by_row_and_named_by_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text(
        'prompt,chosen,rejected\n'
        '"Hi, there","Hello!\nHow can I help?",Go away\n'  # lines 2-3
        "Q2,Good,Bad,extra\n"  # line 4: a field too many
        "Q3,Good\n"  # line 5: no rejected cell
        "Q4,,Bad\n"  # line 6: empty chosen
        "\n"
        'Q5,"Fine, thanks",Worse\n',  # line 8
        encoding="utf-8",
    )
    result = load_clean(path, "preference")
    assert result.format == "prompt_chosen_rejected"
    assert _invalid(result) == {4: "unparseable", 5: "missing_field", 6: "blank_text"}
    assert result.invalid[0].detail == "has 4 fields, the header has 3" and result.invalid[0].record == "Q2,Good,Bad,extra"
    assert [{c: row[c] for c in ("prompt", "chosen", "rejected", "source_row", "source_unit")} for row in result.dataset] == [
        {"prompt": "Hi, there", "chosen": "Hello!\nHow can I help?", "rejected": "Go away", "source_row": 2, "source_unit": "line"},
        {"prompt": "Q5", "chosen": "Fine, thanks", "rejected": "Worse", "source_row": 8, "source_unit": "line"},
    ]


def test_read_rows_keeps_file_order_across_a_folder(tmp_path: Path) -> None:
    _jsonl(tmp_path / "b.jsonl", [_pair(2)])
    _jsonl(tmp_path / "a.jsonl", [_pair(0), "oops"])
    raw = read_rows(tmp_path)
    assert [(Path(r.where.file).name, r.where.row, r.problem is None) for r in raw.rows] == [
        ("a.jsonl", 1, True), ("a.jsonl", 2, False), ("b.jsonl", 1, True),
    ]


# ---------------------------------------------------------------- real public data (tests/fixtures/public)


def test_public_slices(fixtures_dir: Path) -> None:
    """The HH-RLHF slice holds source row 86 (empty chosen reply) as its 18th line; the ShareGPT
    slice's element 15 holds mojibake (UTF-8 read as Latin-1: U+0080); the Alpaca slice is clean."""
    public = fixtures_dir / "public"
    hh = load_clean(public / "hh-rlhf-harmless-base-test.jsonl.gz", "preference")
    assert [(r.where.row, r.where.unit, r.rule) for r in hh.invalid] == [(18, "line", "blank_text")]
    assert len(hh.dataset) == 19
    sharegpt = load_clean(public / "sharegpt-dpo-en-demo.json", "preference")
    assert [(r.where.row, r.rule) for r in sharegpt.invalid] == [(15, "control_characters")]
    assert "U+0080" in sharegpt.invalid[0].detail
    assert load_clean(public / "alpaca-en-demo.json", "sft").invalid == []
