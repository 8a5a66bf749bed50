"""Chat messages and transcripts: the role/content messages every normalised record carries, read from a format's
fields (each checked, a broken one raising :class:`~rlhf_core.data.rules.RowRuleError` with its rule), and the
plain-text HH-RLHF transcript a prompt is rendered as when a tokenizer has no chat template."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_core.data.rules import RowRuleError, type_rule

Message = dict[str, str]

HUMAN_TAG = "\n\nHuman:"
ASSISTANT_TAG = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")
_SAME_ROLES: dict[str, str] = {role: role for role in ROLES}
SHAREGPT_ROLES: dict[str, str] = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def render_transcript(messages: Sequence[Mapping[str, str]]) -> str:
    """Plain-text prompt: the user text for one user message, else the HH transcript ending in the assistant cue."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = "".join(
        f"{HUMAN_TAG if m['role'] == 'user' else ASSISTANT_TAG} {m['content']}" for m in messages if m["role"] != "system"
    )
    return f"{system}{turns}{ASSISTANT_TAG}"


def parse_hh_transcript(prompt: str) -> list[Message]:
    """Turns of an HH prompt (``"\\n\\nHuman: a\\n\\nAssistant: b ... \\n\\nAssistant:"``), without the final cue."""
    parts = re.split(r"\n\n(Human|Assistant):", prompt)  # [head, tag, text, tag, text, ...]
    if parts[0].strip():
        raise RowRuleError(f"text before the first {HUMAN_TAG!r}: {parts[0][:60]!r}")
    messages = [
        {"role": "user" if tag == "Human" else "assistant", "content": text.strip()}
        for tag, text in zip(parts[1::2], parts[2::2])
    ]
    messages.pop()  # the empty assistant turn the prompt ends with
    if not messages:
        raise RowRuleError(f"no {HUMAN_TAG!r} turn before the final {ASSISTANT_TAG!r}")
    return messages


def text_field(row: Mapping[str, Any], column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise RowRuleError(f"column {column!r} must be a string, got {type(value).__name__}", type_rule(value))
    return value


def message_list(value: Any, where: str) -> list[Message]:
    """Validated role/content messages (extra keys dropped)."""
    if not isinstance(value, list) or not value:
        raise RowRuleError(f"{where} must be a non-empty list of role/content messages")
    return [_turn(message, f"{where}[{i}]", "role", "content", _SAME_ROLES) for i, message in enumerate(value)]


def sharegpt_turn(turn: Any, where: str) -> Message:
    return _turn(turn, where, "from", "value", SHAREGPT_ROLES)


def _turn(item: Any, where: str, role_key: str, text_key: str, roles: Mapping[str, str]) -> Message:
    """One message from ``item``'s ``role_key`` (one of ``roles``, mapped to its role) and ``text_key`` (a string)."""
    role = item.get(role_key) if isinstance(item, Mapping) else None
    text = item.get(text_key) if isinstance(item, Mapping) else None
    if role not in roles:
        raise RowRuleError(f"{where} {role_key!r} must be one of {tuple(roles)}, got {role!r}")
    if not isinstance(text, str):
        raise RowRuleError(f"{where} {text_key!r} must be a string, got {type(text).__name__}", type_rule(text))
    return {"role": roles[role], "content": text}


def sharegpt_messages(row: Mapping[str, Any]) -> list[Message]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowRuleError("'conversations' must be a non-empty list of {from, value} turns")
    messages = [sharegpt_turn(t, f"conversations[{i}]") for i, t in enumerate(turns)]
    return with_system(row, messages)


def with_system(row: Mapping[str, Any], messages: list[Message]) -> list[Message]:
    """Prepend the optional ``system`` column (ignored when empty or null)."""
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise RowRuleError(f"column 'system' must be a string, got {type(system).__name__}")
    return [{"role": "system", "content": system}, *messages] if system and system.strip() else messages


def split_reply(messages: list[Message], where: str) -> tuple[list[Message], str]:
    """(conversation before the final assistant reply, that reply)."""
    if messages[-1]["role"] != "assistant":
        raise RowRuleError(f"{where} must end with an assistant message, got {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise RowRuleError(f"{where} has no message before the final assistant reply")
    return messages[:-1], messages[-1]["content"]


def prompt_fields(prompt_messages: list[Message]) -> dict[str, Any]:
    return {"prompt": render_transcript(prompt_messages), "prompt_messages": prompt_messages}


def user_prompt(row: Mapping[str, Any]) -> list[Message]:
    """A text ``prompt`` as one user message, after the optional ``system`` column (Orca DPO pairs have one)."""
    return with_system(row, [{"role": "user", "content": text_field(row, "prompt")}])
