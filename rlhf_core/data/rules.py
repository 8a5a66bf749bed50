"""Names of the row rules that make a raw record invalid (``prepare.invalid_rows`` acts on them).

The names are stable: they key the per-rule counts in ``metrics/prepare.json``, the quarantine
file and the reports. The format adapters (``formats``) raise ``RowRuleError`` with one of
them; the cleaning step (``cleaning``) checks the others on normalised rows.
"""

from __future__ import annotations

from typing import Any

UNPARSEABLE = "unparseable"
MISSING_FIELD = "missing_field"
NOT_TEXT = "not_text"
BLANK_TEXT = "blank_text"
CONTROL_CHARACTERS = "control_characters"
CHOSEN_EQUALS_REJECTED = "chosen_equals_rejected"
DUPLICATE = "duplicate"
HH_NO_ASSISTANT_TURN = "hh_no_assistant_turn"
HH_PROMPTS_DIFFER = "hh_prompts_differ"
MALFORMED = "malformed"

RULES: dict[str, str] = {
    UNPARSEABLE: "the row cannot be read: not valid JSON, not UTF-8, not an object, or a CSV record with extra fields",
    MISSING_FIELD: "a field the format needs is missing or null",
    NOT_TEXT: "a text field holds something other than a string",
    BLANK_TEXT: "a text field is empty or only whitespace",
    CONTROL_CHARACTERS: "text holds NUL or another control character (tab, newline and carriage return are fine)",
    CHOSEN_EQUALS_REJECTED: "the chosen and rejected replies are the same",
    DUPLICATE: "the same example or pair as an earlier row (the first is kept)",
    HH_NO_ASSISTANT_TURN: "an HH-RLHF transcript has no assistant turn",
    HH_PROMPTS_DIFFER: "the chosen and rejected HH-RLHF transcripts do not share the conversation before the reply",
    MALFORMED: "the row breaks another rule of its format (roles, message lists, turn order)",
}
"""Every rule, in the order rows are checked, with what it means."""


class RowRuleError(Exception):
    """One row breaks ``rule``; the message says how (the caller adds where)."""

    def __init__(self, message: str, rule: str = MALFORMED) -> None:
        super().__init__(message)
        self.rule = rule


def type_rule(value: Any) -> str:
    """The rule a value that should be a string breaks: missing (``None``) or not text."""
    return MISSING_FIELD if value is None else NOT_TEXT
