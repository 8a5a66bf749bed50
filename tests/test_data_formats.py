"""normalize/detect_format: each adapter, detection, forcing, errors, and slices of real public files."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import datasets
import pytest

from rlhf_core.data.formats import (
    FORMATS_BY_KIND,
    OUTPUT_COLUMNS,
    DataFormatError,
    detect_format,
    normalize,
)
from rlhf_core.data.messages import render_transcript

A = "\n\nAssistant:"


def _ds(rows: list[dict[str, Any]]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# One hand-written example per format: (format, kind it belongs to, raw row, expected normalised row).
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    (
        "prompt_completion", "sft",
        {"prompt": "Add 2 and 3.", "completion": "  5\n"},
        {"prompt": "Add 2 and 3.", "prompt_messages": _user("Add 2 and 3."), "completion": "5"},
    ),
    (
        "alpaca", "sft",
        {"instruction": "Translate to French.", "input": "cat", "output": "chat ", "system": "Be brief."},
        {
            "prompt": "Be brief.\n\nHuman: Translate to French.\n\ncat\n\nAssistant:",
            "prompt_messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Translate to French.\n\ncat"}],
            "completion": "chat",
        },
    ),
    (
        "messages", "sft",
        {"messages": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": " Blue. "},
        ]},
        {
            "prompt": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:",
            "prompt_messages": [
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a colour."},
            ],
            "completion": "Blue.",
        },
    ),
    (
        "sharegpt", "sft",
        {"conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris."}]},
        {"prompt": "Capital of France?", "prompt_messages": _user("Capital of France?"), "completion": "Paris."},
    ),
    (
        "prompt_chosen_rejected", "preference",
        {"prompt": "2+2?", "chosen": " 4", "rejected": "5 "},
        {"prompt": "2+2?", "prompt_messages": _user("2+2?"), "chosen": "4", "rejected": "5"},
    ),
    (
        "hh_rlhf", "preference",
        {
            "chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell a joke.\n\nAssistant: Why did the chicken cross?",
            "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell a joke.\n\nAssistant: No.",
        },
        {
            "prompt": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Tell a joke.\n\nAssistant:",
            "prompt_messages": [
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Tell a joke."},
            ],
            "chosen": "Why did the chicken cross?",
            "rejected": "No.",
        },
    ),
    (
        "messages_pair", "preference",
        {
            "chosen": [{"role": "user", "content": "Best pet?"}, {"role": "assistant", "content": "A cat."}],
            "rejected": [{"role": "user", "content": "Best pet?"}, {"role": "assistant", "content": "A rock."}],
        },
        {"prompt": "Best pet?", "prompt_messages": _user("Best pet?"), "chosen": "A cat.", "rejected": "A rock."},
    ),
    (
        "sharegpt_dpo", "preference",
        {
            "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi?"}],
            "chosen": {"from": "gpt", "value": "Hello!"},
            "rejected": {"from": "gpt", "value": "Go away."},
        },
        {
            "prompt": "Be kind.\n\nHuman: Hi?\n\nAssistant:",
            "prompt_messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}],
            "chosen": "Hello!",
            "rejected": "Go away.",
        },
    ),
]


@pytest.mark.parametrize("fmt, kind, row, expected", CASES, ids=[c[0] for c in CASES])
def test_adapter_normalises_a_hand_written_row(fmt: str, kind: str, row: dict, expected: dict) -> None:
    out = normalize(_ds([row]), kind, format=fmt)
    assert out.column_names == list(OUTPUT_COLUMNS[kind])
    assert out[0] == expected


@pytest.mark.parametrize("fmt, kind, row, expected", CASES, ids=[c[0] for c in CASES])
def test_each_format_is_detected(fmt: str, kind: str, row: dict, expected: dict) -> None:
    assert detect_format(_ds([row]), kind) == fmt
    assert detect_format((list(row), row), kind) == fmt  # the (columns, first row) form


@pytest.mark.parametrize("fmt, kind, row, expected", CASES, ids=[c[0] for c in CASES])
def test_prompt_kind_keeps_only_the_prompt_of_any_format(fmt: str, kind: str, row: dict, expected: dict) -> None:
    out = normalize(_ds([row]), "prompt")
    assert out[0] == {"prompt": expected["prompt"], "prompt_messages": expected["prompt_messages"]}


def test_plain_prompt_column_as_text_or_messages() -> None:
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    out = normalize(_ds([{"prompt": "Q"}]), "prompt")
    assert out[0] == {"prompt": "Q", "prompt_messages": _user("Q")}
    out = normalize(_ds([{"prompt": conversation}]), "prompt")
    assert out[0] == {"prompt": "S\n\nHuman: Q\n\nAssistant:", "prompt_messages": conversation}


def test_alpaca_with_empty_input_is_the_instruction_alone() -> None:
    out = normalize(_ds([{"instruction": "Say hi.", "input": "", "output": "hi"}]), "sft")
    assert out[0]["prompt"] == "Say hi."
    assert out[0]["prompt_messages"] == _user("Say hi.")


def test_messages_pair_with_explicit_prompt_conversation() -> None:
    row = {
        "prompt": [{"role": "user", "content": "Best pet?"}],
        "chosen": [{"role": "assistant", "content": "A cat."}],
        "rejected": [{"role": "assistant", "content": "A rock."}],
    }
    out = normalize(_ds([row]), "preference", format="messages_pair")
    assert out[0] == {"prompt": "Best pet?", "prompt_messages": _user("Best pet?"), "chosen": "A cat.", "rejected": "A rock."}


def _turns(*texts: str) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


@pytest.mark.parametrize("history", [("Best pet?",), ("Hi.", "Hello!", "Best pet?")], ids=["one-turn", "multi-turn"])
def test_a_text_prompt_beside_full_conversations_takes_their_shared_prompt_as_trl_does(history: tuple[str, ...]) -> None:
    """UltraFeedback-binarized rows: ``prompt`` is the last user text, chosen/rejected the whole conversations."""
    from trl.data_utils import maybe_extract_prompt

    row = {"prompt": history[-1], "chosen": _turns(*history, "A cat."), "rejected": _turns(*history, "A rock."), "score_chosen": 8.0}
    assert detect_format(_ds([row]), "preference") == "messages_pair"
    out = normalize(_ds([row]), "preference")[0]
    trl = maybe_extract_prompt(row)
    assert out["prompt_messages"] == trl["prompt"] == _turns(*history)
    assert [{"role": "assistant", "content": out["chosen"]}] == trl["chosen"]
    assert [{"role": "assistant", "content": out["rejected"]}] == trl["rejected"]


@pytest.mark.parametrize("kind", ["sft", "preference", "prompt"])
def test_a_system_column_goes_before_a_text_prompt(kind: str) -> None:
    """Orca DPO pairs: system, question (renamed to prompt), chosen, rejected; an empty system is no message."""
    reply = {"sft": {"completion": "C"}, "preference": {"chosen": "C", "rejected": "R"}, "prompt": {}}[kind]
    rows = [{"system": "Be brief.", "prompt": "Q", **reply}, {"system": "", "prompt": "Q2", **reply}]
    out = normalize(_ds(rows), kind)
    assert out[0]["prompt_messages"] == [{"role": "system", "content": "Be brief."}, *_user("Q")]
    assert out[0]["prompt"] == "Be brief.\n\nHuman: Q\n\nAssistant:"
    assert out[1]["prompt_messages"] == _user("Q2") and out[1]["prompt"] == "Q2"


def test_conversational_prompt_completion() -> None:
    row = {
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
        "completion": [{"role": "assistant", "content": " A "}],
    }
    assert detect_format(_ds([row]), "sft") == "prompt_completion"
    out = normalize(_ds([row]), "sft")
    assert out[0] == {"prompt": "S\n\nHuman: Q\n\nAssistant:", "prompt_messages": row["prompt"], "completion": "A"}


def test_forcing_a_format_overrides_detection() -> None:
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "prompt": "P", "completion": "C"}
    assert detect_format(_ds([row]), "sft") == "messages"
    forced = normalize(_ds([row]), "sft", format="prompt_completion")
    assert (forced[0]["prompt"], forced[0]["completion"]) == ("P", "C")


def test_forcing_a_format_of_another_kind_is_refused() -> None:
    with pytest.raises(DataFormatError, match=r"'alpaca' is not accepted for preference data.*hh_rlhf"):
        normalize(_ds([{"instruction": "x", "output": "y"}]), "preference", format="alpaca")


def test_forced_format_with_missing_columns_names_them() -> None:
    with pytest.raises(DataFormatError, match=r"missing \['completion'\]"):
        normalize(_ds([{"prompt": "x"}]), "sft", format="prompt_completion")


def test_unrecognised_format_names_columns_and_accepted_formats() -> None:
    with pytest.raises(DataFormatError) as err:
        normalize(_ds([{"question": "q", "answer": "a"}]), "sft")
    message = str(err.value)
    assert "['question', 'answer']" in message
    for fmt in FORMATS_BY_KIND["sft"]:
        assert fmt in message
    assert "instruction, output" in message  # each accepted format shows its columns


@pytest.mark.parametrize(
    "kind, rows, rule",
    [
        ("preference", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
                        {"chosen": "\n\nHuman: a b", "rejected": "\n\nHuman: a c"}], "no '\\\\n\\\\nAssistant:' turn"),
        ("sft", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                 {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}],
         "must end with an assistant message"),
        ("sft", [{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                 {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}], "'from' must be one of"),
        ("preference", [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                         "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]},
                        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                         "rejected": [{"role": "user", "content": "X"}, {"role": "assistant", "content": "c"}]}],
         "must share every message but the last"),
        ("sft", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}], "'completion' must be a string"),
    ],
    ids=["hh-without-assistant", "messages-not-ending-with-assistant", "sharegpt-unknown-sender", "pair-prompts-differ", "null-completion"],
)
def test_row_breaking_a_rule_is_named_with_its_index(kind: str, rows: list[dict], rule: str) -> None:
    with pytest.raises(DataFormatError, match=rf"row 1 \(.*\): .*{rule}"):
        normalize(_ds(rows), kind)


def test_render_transcript_of_a_single_user_message_is_its_text() -> None:
    assert render_transcript(_user("just this")) == "just this"
    assert render_transcript([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]) == (
        "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    )


# ---------------------------------------------------------------- real public data (tests/fixtures/public)


def test_hh_rlhf_slice(fixtures_dir: Path) -> None:
    path = fixtures_dir / "public" / "hh-rlhf-harmless-base-test.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh]
    out = normalize(datasets.Dataset.from_list(raw), "preference")
    assert detect_format(datasets.Dataset.from_list(raw), "preference") == "hh_rlhf"
    assert len(out) == len(raw) == 20
    for src, rec in zip(raw, out):
        prompt = rec["prompt"]
        # the prompt is a prefix of both transcripts, ends with the assistant cue, and the rest is the reply
        assert prompt.endswith(A)
        assert src["chosen"].startswith(prompt) and src["rejected"].startswith(prompt)
        assert src["chosen"][len(prompt):].strip() == rec["chosen"]
        assert src["rejected"][len(prompt):].strip() == rec["rejected"]
        # and no later cue is shared by both transcripts
        assert A not in os.path.commonprefix([src["chosen"], src["rejected"]])[len(prompt):]
        messages = rec["prompt_messages"]
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "user"
        assert len(messages) == prompt.count("\n\nHuman:") + prompt.count(A) - 1


def test_hh_rlhf_prompt_is_the_shared_prefix_when_a_reply_contains_the_cue(fixtures_dir: Path) -> None:
    """Row 1254 of the source: the chosen reply itself contains '\\n\\nAssistant:'."""
    with gzip.open(fixtures_dir / "public" / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as fh:
        raw = [json.loads(line) for line in fh]
    src = raw[18]
    assert src["chosen"].count(A) > src["rejected"].count(A)  # the quirk this test is about
    rec = normalize(datasets.Dataset.from_list([src]), "preference")[0]
    naive = src["chosen"][: src["chosen"].rfind(A) + len(A)]
    assert rec["prompt"] != naive
    assert rec["prompt"] == src["rejected"][: src["rejected"].rfind(A) + len(A)]
    assert A in rec["chosen"] or "Human:" in rec["chosen"]


def test_sharegpt_dpo_slice(fixtures_dir: Path) -> None:
    raw = json.loads((fixtures_dir / "public" / "sharegpt-dpo-en-demo.json").read_text(encoding="utf-8"))
    ds = datasets.Dataset.from_list(raw)
    assert detect_format(ds, "preference") == "sharegpt_dpo"
    out = normalize(ds, "preference")
    assert len(out) == 20
    role = {"human": "user", "gpt": "assistant", "system": "system"}
    for src, rec in zip(raw, out):
        assert [(m["role"], m["content"]) for m in rec["prompt_messages"]] == [(role[t["from"]], t["value"]) for t in src["conversations"]]
        assert rec["chosen"] == src["chosen"]["value"].strip()
        assert rec["rejected"] == src["rejected"]["value"].strip()
        if len(src["conversations"]) == 1:
            assert rec["prompt"] == src["conversations"][0]["value"]
        else:
            assert rec["prompt"].endswith(A) and src["conversations"][-1]["value"] in rec["prompt"]
    assert any(m[0]["role"] == "system" for m in out["prompt_messages"])  # the slice covers system prompts
    assert any(len(m) > 2 for m in out["prompt_messages"])  # and multi-turn ones


def test_alpaca_slice(fixtures_dir: Path) -> None:
    raw = json.loads((fixtures_dir / "public" / "alpaca-en-demo.json").read_text(encoding="utf-8"))
    ds = datasets.Dataset.from_list(raw)
    assert detect_format(ds, "sft") == "alpaca"
    out = normalize(ds, "sft")
    assert len(out) == 20
    with_input = 0
    for src, rec in zip(raw, out):
        assert rec["completion"] == src["output"].strip()
        if src["input"]:
            with_input += 1
            assert rec["prompt"] == src["instruction"] + "\n\n" + src["input"]
        else:
            assert rec["prompt"] == src["instruction"]
        assert rec["prompt_messages"] == _user(rec["prompt"])
    assert with_input > 0
