"""Expectation suites in code, one per data kind (``sft``, ``preference``, ``prompt``).

Every expectation carries ``meta={"rule": <short human rule name>}``; the gate's summary and
JSON report name failures by it. Rules per kind (text columns are every normalised column but
``prompt_messages``):

* ``enough rows``                        row count >= ``min_rows``
* ``<col> column present``               each normalised column exists
* ``<col> not null``                     no missing values
* ``<col> is text``                      values are ``str``
* ``<col> length within limits``         ``min_chars <= len(value) <= max_chars``
* ``<col> not blank``                    not empty / whitespace only (regex ``^\\s*$``)
* ``<col> has no control characters``    no NUL or other C0/C1 control character but tab, newline, CR
* ``prompt_messages is a chat``          non-empty list of {role, content} messages
* ``chosen differs from rejected``       preference only (custom column-pair expectation)
* ``no duplicate pairs``                 unique (prompt, completion) for SFT, (prompt, chosen, rejected)
  for preference; dropped when ``allow_duplicate_pairs``
* ``prompt tokens within max_prompt_tokens``  when the frame has ``prompt_tokens`` and
  ``max_prompt_tokens`` is set: at most ``max_truncation_drop_fraction`` of rows exceed it (GX ``mostly``)

Expectations whose columns are absent are not built (their ``column present`` rule fails
instead) and are returned as skipped, so a missing column is one clear failure, not a cascade.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

KINDS: tuple[str, ...] = ("sft", "preference", "prompt")
RULE_KEY = "rule"  # key of the human rule name in each expectation's ``meta``
CHAT_COLUMN = "prompt_messages"
TOKENS_COLUMN = "prompt_tokens"
BLANK_REGEX = r"^\s*$"
CONTROL_REGEX = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"  # as rlhf_core.data.cleaning.CONTROL_CHARS

# Rule names that tests, the summary and callers can refer to.
ENOUGH_ROWS = "enough rows"
CHOSEN_DIFFERS = "chosen differs from rejected"
NO_DUPLICATE_PAIRS = "no duplicate pairs"
PROMPT_TOKENS_FIT = "prompt tokens within max_prompt_tokens"

# Which columns are unique together per kind (the "pair" of allow_duplicate_pairs).
_UNIQUE_TOGETHER: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
}


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the data gate (``params.yaml`` group ``validate``).

    Attributes:
        min_rows: fewest rows a dataset may have.
        min_chars: shortest allowed text value, per text column (characters).
        max_chars: longest allowed text value, per text column (characters).
        max_prompt_tokens: longest prompt (tokens) the trainers keep; ``None`` disables the check.
        max_truncation_drop_fraction: largest share of rows whose ``prompt_tokens`` may exceed
            ``max_prompt_tokens`` (those rows are dropped at tokenisation).
        allow_duplicate_pairs: if True, duplicate (prompt, completion) / (prompt, chosen, rejected)
            rows are accepted.
        max_invalid_fraction: largest share of a source's rows that ``prepare`` may have dropped as
            invalid (``prepare.invalid_rows: drop``); more means the source, not a few rows, is broken.
    """

    min_rows: int = 50
    min_chars: int = 1
    max_chars: int = 20000
    max_prompt_tokens: int | None = 48
    max_truncation_drop_fraction: float = 0.05
    allow_duplicate_pairs: bool = False
    max_invalid_fraction: float = 0.05

    def __post_init__(self) -> None:
        for name in ("min_rows", "min_chars", "max_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"validate.{name}: must be a non-negative integer, got {value!r}")
        if self.max_chars < self.min_chars:
            raise ValueError(f"validate.max_chars ({self.max_chars}) must be >= validate.min_chars ({self.min_chars})")
        tokens = self.max_prompt_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"validate.max_prompt_tokens: must be a positive integer or null, got {tokens!r}")
        for name in ("max_truncation_drop_fraction", "max_invalid_fraction"):
            fraction = getattr(self, name)
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
                raise ValueError(f"validate.{name}: must be in [0, 1], got {fraction!r}")
        if not isinstance(self.allow_duplicate_pairs, bool):
            raise ValueError(f"validate.allow_duplicate_pairs: must be true or false, got {self.allow_duplicate_pairs!r}")


def required_columns(kind: str) -> tuple[str, ...]:
    """The normalised columns of ``kind`` (from ``rlhf_core.data.formats.OUTPUT_COLUMNS``)."""
    from rlhf_core.data.formats import OUTPUT_COLUMNS

    if kind not in OUTPUT_COLUMNS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {sorted(OUTPUT_COLUMNS)}")
    return tuple(OUTPUT_COLUMNS[kind])


def build_expectations(kind: str, cfg: ValidationConfig, columns: Collection[str]) -> tuple[list[Any], list[str]]:
    """The suite's expectations for a ``kind`` dataset whose frame has ``columns``.

    Returns (GX expectation objects, names of rules skipped because a column they need is absent).
    """
    import great_expectations.expectations as gxe

    from tasks.validation import expectations as custom

    required = required_columns(kind)
    present = set(columns)
    built: list[Any] = []
    skipped: list[str] = []

    def add(rule: str, needs: Collection[str], make: Any, **kwargs: Any) -> None:
        if not set(needs) <= present:
            skipped.append(rule)
            return
        built.append(make(**kwargs, meta={RULE_KEY: rule}))

    add(ENOUGH_ROWS, (), gxe.ExpectTableRowCountToBeBetween, min_value=cfg.min_rows)
    for col in required:
        add(f"{col} column present", (), gxe.ExpectColumnToExist, column=col)
    for col in required:
        add(f"{col} not null", (col,), gxe.ExpectColumnValuesToNotBeNull, column=col)
        if col == CHAT_COLUMN:
            add(
                f"{col} is a chat",
                (col,),
                custom.ExpectColumnValuesToBeChatMessages,
                column=col,
                description=f"{col}: each value is a non-empty list of {{role, content}} messages",
            )
            continue
        add(f"{col} is text", (col,), gxe.ExpectColumnValuesToBeOfType, column=col, type_="str")
        add(
            f"{col} length within limits",
            (col,),
            gxe.ExpectColumnValueLengthsToBeBetween,
            column=col,
            min_value=cfg.min_chars,
            max_value=cfg.max_chars,
        )
        add(f"{col} not blank", (col,), gxe.ExpectColumnValuesToNotMatchRegex, column=col, regex=BLANK_REGEX)
        add(
            f"{col} has no control characters", (col,), gxe.ExpectColumnValuesToNotMatchRegex, column=col, regex=CONTROL_REGEX
        )
    if kind == "preference":
        add(
            CHOSEN_DIFFERS,
            ("chosen", "rejected"),
            custom.ExpectColumnPairValuesToDiffer,
            column_A="chosen",
            column_B="rejected",
            description="chosen must differ from rejected in every row",
        )
    if kind in _UNIQUE_TOGETHER and not cfg.allow_duplicate_pairs:
        unique = _UNIQUE_TOGETHER[kind]
        add(NO_DUPLICATE_PAIRS, unique, gxe.ExpectCompoundColumnsToBeUnique, column_list=list(unique))
    if cfg.max_prompt_tokens is not None and TOKENS_COLUMN in present:
        add(
            PROMPT_TOKENS_FIT,
            (TOKENS_COLUMN,),
            gxe.ExpectColumnValuesToBeBetween,
            column=TOKENS_COLUMN,
            max_value=cfg.max_prompt_tokens,
            mostly=1.0 - cfg.max_truncation_drop_fraction,
        )
    return built, skipped


def build_suite(name: str, kind: str, cfg: ValidationConfig, columns: Collection[str]) -> tuple[Any, list[str]]:
    """A ``gx.ExpectationSuite`` named ``name`` (not yet added to a context) and the skipped rule names."""
    import great_expectations as gx

    expectations, skipped = build_expectations(kind, cfg, columns)
    return gx.ExpectationSuite(name=name, expectations=expectations, meta={"kind": kind}), skipped
