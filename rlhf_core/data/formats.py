"""Normalise public dataset formats into three record shapes the pipeline uses.

Normalised columns:

* SFT:         ``prompt``, ``prompt_messages``, ``completion``
* preference:  ``prompt``, ``prompt_messages``, ``chosen``, ``rejected``
* prompt-only: ``prompt``, ``prompt_messages``

``prompt_messages`` is the conversation before the final assistant reply, a list of
``{"role": "system"|"user"|"assistant", "content": str}``. ``prompt`` is its plain-text
rendering, used when a tokenizer has no chat template: the user text itself when the
conversation is a single user message, else the HH-RLHF transcript
``"<system>\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:"``.
Completions (``completion``, ``chosen``, ``rejected``) are stripped of surrounding whitespace.

Each input format is a small adapter ``(row, index) -> normalised row`` with its rules;
``detect_format`` picks one from the columns and first row, ``normalize`` applies it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import datasets

from rlhf_core.data.messages import (
    ASSISTANT_TAG,
    HUMAN_TAG,
    Message,
    message_list,
    parse_hh_transcript,
    prompt_fields,
    sharegpt_messages,
    sharegpt_turn,
    split_reply,
    text_field,
    user_prompt,
    with_system,
)
from rlhf_core.data.rules import HH_NO_ASSISTANT_TURN, HH_PROMPTS_DIFFER, RowRuleError

Kind = Literal["sft", "preference", "prompt"]

# Format names (public: params.yaml and callers use these strings).
PROMPT_COMPLETION = "prompt_completion"
ALPACA = "alpaca"
MESSAGES = "messages"
SHAREGPT = "sharegpt"
PROMPT_CHOSEN_REJECTED = "prompt_chosen_rejected"
HH_RLHF = "hh_rlhf"
MESSAGES_PAIR = "messages_pair"
SHAREGPT_DPO = "sharegpt_dpo"
PROMPT = "prompt"

SFT_FORMATS: tuple[str, ...] = (PROMPT_COMPLETION, ALPACA, MESSAGES, SHAREGPT)
PREFERENCE_FORMATS: tuple[str, ...] = (PROMPT_CHOSEN_REJECTED, HH_RLHF, MESSAGES_PAIR, SHAREGPT_DPO)
PROMPT_FORMATS: tuple[str, ...] = (PROMPT, *PREFERENCE_FORMATS, *SFT_FORMATS)
FORMATS_BY_KIND: dict[str, tuple[str, ...]] = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompt": PROMPT_FORMATS}

OUTPUT_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "prompt_messages", "completion"),
    "preference": ("prompt", "prompt_messages", "chosen", "rejected"),
    "prompt": ("prompt", "prompt_messages"),
}

class DataFormatError(ValueError):
    """Records do not match the requested (or any accepted) format; names columns, row and rule."""


# ---------------------------------------------------------------- adapters: row -> normalised row


def _prompt_completion(row: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(row.get("prompt"), list):  # TRL's conversational prompt-completion: two message lists
        messages = message_list(row["prompt"], "'prompt'") + message_list(row.get("completion"), "'completion'")
        prompt_messages, reply = split_reply(messages, "'prompt' + 'completion'")
        return {**prompt_fields(prompt_messages), "completion": reply.strip()}
    return {**prompt_fields(user_prompt(row)), "completion": text_field(row, "completion").strip()}


def _alpaca(row: Mapping[str, Any]) -> dict[str, Any]:
    instruction, extra = text_field(row, "instruction"), row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RowRuleError(f"column 'input' must be a string, got {type(extra).__name__}")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    history: list[Message] = []
    for i, pair in enumerate(row.get("history") or []):  # LLaMA-Factory's optional [[query, response], ...]
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise RowRuleError(f"history[{i}] must be a [query, response] pair of strings")
        history += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages = with_system(row, [*history, {"role": "user", "content": user}])
    return {**prompt_fields(messages), "completion": text_field(row, "output").strip()}


def _messages_sft(row: Mapping[str, Any]) -> dict[str, Any]:
    prompt_messages, reply = split_reply(message_list(row.get("messages"), "'messages'"), "'messages'")
    return {**prompt_fields(prompt_messages), "completion": reply.strip()}


def _sharegpt(row: Mapping[str, Any]) -> dict[str, Any]:
    prompt_messages, reply = split_reply(sharegpt_messages(row), "'conversations'")
    return {**prompt_fields(prompt_messages), "completion": reply.strip()}


def _prompt_chosen_rejected(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **prompt_fields(user_prompt(row)),
        "chosen": text_field(row, "chosen").strip(),
        "rejected": text_field(row, "rejected").strip(),
    }


def _hh_rlhf(row: Mapping[str, Any]) -> dict[str, Any]:
    chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if ASSISTANT_TAG not in text:
            raise RowRuleError(f"{name!r} transcript has no {ASSISTANT_TAG!r} turn", HH_NO_ASSISTANT_TURN)
    # The prompt is the shared prefix cut after its last assistant cue: in a few real rows a
    # reply itself contains "\n\nAssistant:", so the last cue of each transcript would disagree.
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_TAG)
    if cut < 0:
        raise RowRuleError(f"'chosen' and 'rejected' do not share a prefix ending in {ASSISTANT_TAG!r}", HH_PROMPTS_DIFFER)
    prompt = shared[: cut + len(ASSISTANT_TAG)]
    for name, text in (("chosen", chosen), ("rejected", rejected)):  # a later human turn: the histories diverged
        if HUMAN_TAG in text[len(prompt):]:
            raise RowRuleError(f"{name!r} has a {HUMAN_TAG!r} turn after the shared prompt: the conversations differ", HH_PROMPTS_DIFFER)
    return {
        "prompt": prompt,
        "prompt_messages": parse_hh_transcript(prompt),
        "chosen": chosen[len(prompt):].strip(),
        "rejected": rejected[len(prompt):].strip(),
    }


def _messages_pair(row: Mapping[str, Any]) -> dict[str, Any]:
    # A text ``prompt`` beside full conversations (UltraFeedback-binarized and others) only restates the conversations'
    # user turn: the prompt is what they share, as TRL's ``maybe_extract_prompt`` takes it.
    prefix = message_list(row["prompt"], "'prompt'") if row.get("prompt") is not None and not _is_str(row["prompt"]) else []
    chosen = prefix + message_list(row.get("chosen"), "'chosen'")
    rejected = prefix + message_list(row.get("rejected"), "'rejected'")
    chosen_prompt, chosen_reply = split_reply(chosen, "'chosen'")
    rejected_prompt, rejected_reply = split_reply(rejected, "'rejected'")
    if chosen_prompt != rejected_prompt:
        raise RowRuleError("'chosen' and 'rejected' must share every message but the last assistant reply")
    return {**prompt_fields(chosen_prompt), "chosen": chosen_reply.strip(), "rejected": rejected_reply.strip()}


def _sharegpt_dpo(row: Mapping[str, Any]) -> dict[str, Any]:
    prompt_messages = sharegpt_messages(row)
    if prompt_messages[-1]["role"] != "user":
        raise RowRuleError(f"'conversations' must end with a human turn, got {prompt_messages[-1]['role']!r}")
    replies = {}
    for name in ("chosen", "rejected"):
        turn = sharegpt_turn(row.get(name), repr(name))
        if turn["role"] != "assistant":
            raise RowRuleError(f"{name!r} must be a gpt turn, got {turn['role']!r}")
        replies[name] = turn["content"].strip()
    return {**prompt_fields(prompt_messages), **replies}


def _prompt_only(row: Mapping[str, Any]) -> dict[str, Any]:
    value = row.get("prompt")
    if isinstance(value, str):
        return prompt_fields(user_prompt(row))
    messages = message_list(value, "'prompt'")
    if messages[-1]["role"] != "user":
        raise RowRuleError(f"a 'prompt' conversation must end with a user message, got {messages[-1]['role']!r}")
    return prompt_fields(messages)


# ---------------------------------------------------------------- registry and detection


def _all(test: Callable[[Any], bool], *columns: str) -> Callable[[Mapping[str, Any]], bool]:
    return lambda row: all(test(row[c]) for c in columns)


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_hh(row: Mapping[str, Any]) -> bool:
    return "prompt" not in row and _is_str(row["chosen"]) and HUMAN_TAG in row["chosen"]


@dataclass(frozen=True)
class _Format:
    adapter: Callable[[Mapping[str, Any]], dict[str, Any]]
    required: tuple[str, ...]
    """Columns the format needs (shown in errors)."""
    matches: Callable[[Mapping[str, Any]], bool]
    """Does a first row that has the required columns look like this format (value types)?"""
    optional: tuple[str, ...] = ()


_FORMATS: dict[str, _Format] = {
    PROMPT_COMPLETION: _Format(
        _prompt_completion,
        ("prompt", "completion"),
        lambda r: _all(_is_str, "prompt", "completion")(r) or _all(_is_list, "prompt", "completion")(r),
        ("system",),
    ),
    ALPACA: _Format(_alpaca, ("instruction", "output"), _all(_is_str, "instruction"), ("input", "system", "history")),
    MESSAGES: _Format(_messages_sft, ("messages",), _all(_is_list, "messages")),
    SHAREGPT: _Format(_sharegpt, ("conversations",), _all(_is_list, "conversations"), ("system",)),
    PROMPT_CHOSEN_REJECTED: _Format(
        _prompt_chosen_rejected, ("prompt", "chosen", "rejected"), _all(_is_str, "prompt", "chosen", "rejected"), ("system",)
    ),
    HH_RLHF: _Format(_hh_rlhf, ("chosen", "rejected"), _is_hh),
    MESSAGES_PAIR: _Format(_messages_pair, ("chosen", "rejected"), _all(_is_list, "chosen", "rejected"), ("prompt",)),
    SHAREGPT_DPO: _Format(
        _sharegpt_dpo, ("conversations", "chosen", "rejected"), _all(_is_list, "conversations"), ("system",)
    ),
    PROMPT: _Format(_prompt_only, ("prompt",), lambda r: _is_str(r["prompt"]) or _is_list(r["prompt"]), ("system",)),
}

# Detection order: most specific first (sharegpt_dpo before sharegpt, a plain prompt first for prompts).
_DETECTION_ORDER: dict[str, tuple[str, ...]] = {
    "sft": (MESSAGES, SHAREGPT, ALPACA, PROMPT_COMPLETION),
    "preference": (SHAREGPT_DPO, MESSAGES_PAIR, PROMPT_CHOSEN_REJECTED, HH_RLHF),
    "prompt": (PROMPT, SHAREGPT_DPO, MESSAGES_PAIR, HH_RLHF, MESSAGES, SHAREGPT, ALPACA),
}


def _describe(kind: str) -> str:
    parts = []
    for name in FORMATS_BY_KIND[kind]:
        spec = _FORMATS[name]
        cols = ", ".join(spec.required) + "".join(f"[, {c}]" for c in spec.optional)
        parts.append(f"{name} ({cols})")
    return "; ".join(parts)


def _check_kind(kind: str) -> None:
    if kind not in FORMATS_BY_KIND:
        raise ValueError(f"kind must be one of {tuple(FORMATS_BY_KIND)}, got {kind!r}")


def detect_format(data: datasets.Dataset | tuple[Sequence[str], Mapping[str, Any]], kind: Kind) -> str:
    """The format name of ``data`` for ``kind``, from its column names and first row.

    Args:
        data: a dataset, or ``(column_names, first_row)``.
        kind: ``"sft"``, ``"preference"`` or ``"prompt"``.

    Raises:
        DataFormatError: no accepted format matches; the message lists the columns found and
            the formats (with their columns) accepted for ``kind``.
    """
    _check_kind(kind)
    if isinstance(data, datasets.Dataset):
        if len(data) == 0:
            raise DataFormatError("the dataset has no rows, so its format cannot be detected")
        columns, first = list(data.column_names), data[0]
    else:
        columns, first = list(data[0]), data[1]
    for name in _DETECTION_ORDER[kind]:
        spec = _FORMATS[name]
        if all(c in columns for c in spec.required) and spec.matches(first):
            return name
    types = ", ".join(f"{c}: {type(first.get(c)).__name__}" for c in columns)
    raise DataFormatError(
        f"cannot recognise {kind} data with columns {columns} (first row types: {types}). "
        f"Accepted {kind} formats: {_describe(kind)}. Rename the columns (params.yaml: prepare.{kind}_columns), or pass the format explicitly."
    )


def normalize(dataset: datasets.Dataset, kind: Kind, format: str = "auto") -> datasets.Dataset:
    """Records of ``dataset`` in the normalised ``kind`` shape (only those columns, same row order).

    Args:
        dataset: raw records (e.g. from ``load_records``).
        kind: ``"sft"``, ``"preference"`` or ``"prompt"``.
        format: a format name accepted for ``kind`` (see ``FORMATS_BY_KIND``), or ``"auto"``.

    Raises:
        DataFormatError: unknown/unaccepted format, missing columns, or a row that breaks a
            format rule (the message names the row index and the rule).
    """
    _check_kind(kind)
    name = detect_format(dataset, kind) if format == "auto" else format
    if name not in FORMATS_BY_KIND[kind]:
        raise DataFormatError(f"format {name!r} is not accepted for {kind} data. Accepted {kind} formats: {_describe(kind)}")
    spec = _FORMATS[name]
    missing = [c for c in spec.required if c not in dataset.column_names]
    if missing:
        raise DataFormatError(f"format {name!r} needs columns {list(spec.required)}; missing {missing}; found {dataset.column_names}")
    keep = OUTPUT_COLUMNS[kind]

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            record = spec.adapter(row)
        except RowRuleError as err:
            raise DataFormatError(f"row {index} ({name} format): {err} [rule {err.rule}]") from None
        return {column: record[column] for column in keep}

    return dataset.map(
        convert, with_indices=True, remove_columns=dataset.column_names, features=_features(kind), desc=f"normalise {name}"
    )


def _features(kind: str) -> datasets.Features:
    message = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    types = {"prompt": datasets.Value("string"), "prompt_messages": datasets.List(message)}
    types.update({c: datasets.Value("string") for c in ("completion", "chosen", "rejected")})
    return datasets.Features({c: types[c] for c in OUTPUT_COLUMNS[kind]})
