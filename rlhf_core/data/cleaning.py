"""Row-level cleaning: normalise a source row by row, and set aside the rows that break a rule.

Real datasets hold a few broken rows (duplicates, empty replies, a truncated line); one of
them must not make a whole source unusable, nor may it slip into training unseen. ``clean``
applies the rules of ``rlhf_core.data.rules`` to every row, in this order, and gives each
invalid row the first rule it breaks:

1. ``unparseable``: the row could not be read (``read_rows``).
2. the format's own rules (``formats``): ``missing_field``, ``not_text``, ``hh_no_assistant_turn``,
   ``hh_prompts_differ``, ``malformed``.
3. on the normalised row: ``blank_text`` (prompt and replies), ``control_characters``,
   ``chosen_equals_rejected``, then ``duplicate`` (same (prompt, completion) or
   (prompt, chosen, rejected) as an earlier valid row; the first is kept; prompt-only data may
   repeat prompts).

The kept rows carry ``SOURCE_COLUMNS`` so that later reports name a row's place in its file;
``InvalidRow`` records say where each dropped row was and why. What to do with them (drop and
quarantine, or stop) is the caller's policy; ``load_clean`` raises for ``fail``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets

from rlhf_core.data import rules
from rlhf_core.data.columns import check_columns, check_mapping, renamed
from rlhf_core.data.formats import (
    _FORMATS,
    FORMATS_BY_KIND,
    OUTPUT_COLUMNS,
    DataFormatError,
    _check_kind,
    _describe,
    _features,
    detect_format,
)
from rlhf_core.data.rows import SOURCE_COLUMNS, RawRows, SourceRow, read_rows

POLICIES: tuple[str, ...] = ("drop", "fail")
"""``prepare.invalid_rows``: ``drop`` quarantines invalid rows and goes on; ``fail`` stops."""

TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}
UNIQUE_TOGETHER: dict[str, tuple[str, ...]] = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected")}
# C0 controls but tab, newline and carriage return; DEL; C1 controls (U+0080-U+009F: mostly
# mojibake, UTF-8 read as Latin-1). They corrupt tokenisation and display, and NUL ends C strings.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
EXAMPLES_PER_RULE = 3


@dataclass(frozen=True)
class InvalidRow:
    """A row set aside: where it was, the rule it broke, how, and the raw record (or line text)."""

    where: SourceRow
    rule: str
    detail: str
    record: Any

    def to_dict(self) -> dict[str, Any]:
        return {**self.where.columns(), "rule": self.rule, "detail": self.detail, "record": self.record}


@dataclass
class CleanResult:
    """Outcome of cleaning one source: the kept rows (normalised + source columns) and the invalid ones."""

    source: str
    kind: str
    format: str
    rows_read: int
    dataset: datasets.Dataset
    invalid: list[InvalidRow]

    def counts(self) -> dict[str, int]:
        """Invalid rows per rule, every rule listed (zeros too, so runs compare key by key)."""
        found = Counter(row.rule for row in self.invalid)
        return {rule: found.get(rule, 0) for rule in rules.RULES}

    @property
    def invalid_fraction(self) -> float:
        return len(self.invalid) / self.rows_read if self.rows_read else 0.0

    def report(self, limit: int = EXAMPLES_PER_RULE) -> str:
        """What was found, per rule with a few example rows, e.g. for a stage's log or error."""
        if not self.invalid:
            return f"{self.source}: all {self.rows_read} rows valid ({self.format} format)"
        lines = [
            f"{self.source}: {len(self.invalid)} of {self.rows_read} rows invalid "
            f"({100 * self.invalid_fraction:.1f}%, {self.format} format)"
        ]
        for rule, count in self.counts().items():
            if not count:
                continue
            lines.append(f"  {rule}: {count} row(s) ({rules.RULES[rule]})")
            examples = [row for row in self.invalid if row.rule == rule][:limit]
            lines.extend(f"    {row.where}: {row.detail}" for row in examples)
            if count > limit:
                lines.append(f"    ... and {count - limit} more")
        return "\n".join(lines)


class InvalidRowsError(DataFormatError):
    """A source has invalid rows and the policy is ``fail`` (or no valid row is left); ``result`` has them all."""

    def __init__(self, message: str, result: CleanResult) -> None:
        super().__init__(message)
        self.result = result


def load_clean(
    source: str | Path,
    kind: str,
    format: str = "auto",  # the name params.yaml and normalize use
    *,
    policy: str = "drop",
    source_name: str | None = None,
    split: str = "train",
    storage_options: dict[str, Any] | None = None,
    columns: dict[str, str] | None = None,
) -> CleanResult:
    """Read ``source`` (shown as ``source_name``), rename its ``columns`` (``rlhf_core.data.columns``), normalise it as
    ``kind`` and clean it.

    Raises:
        InvalidRowsError: ``policy="fail"`` and some row is invalid, or no valid row is left;
            the message lists the counts per rule and example rows with their place in the file.
        DataLoadError, DataFormatError: the source cannot be read or its format is not recognised.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    raw = read_rows(source, source_name=source_name, split=split, storage_options=storage_options)
    result = clean(raw, kind, format, columns=columns)
    if result.invalid and policy == "fail":
        raise InvalidRowsError(
            f"{result.report()}\nFix these rows in the source, or set prepare.invalid_rows: drop to set them aside "
            "(they are written to data/prepared/quarantine.jsonl).",
            result,
        )
    if len(result.dataset) == 0:
        raise InvalidRowsError(f"{result.report()}\nNo valid row is left.", result)
    return result


def clean(raw: RawRows, kind: str, format: str = "auto", columns: dict[str, str] | None = None) -> CleanResult:
    """Normalise and check every row of ``raw`` (see the module docstring for the rules and their order), its
    columns first renamed by ``columns`` ``{column in the data: column the format expects}``."""
    _check_kind(kind)
    mapping = check_mapping(columns)
    original = raw
    if mapping:  # the formats see renamed records; the quarantine keeps each record as the file has it
        check_columns(raw.columns, mapping, raw.label)
        raw = RawRows(raw.label, [row if row.problem else replace(row, record=renamed(row.record, mapping)) for row in raw.rows])
    columns = raw.columns
    name = _detect(raw, kind, columns) if format == "auto" else format
    if name not in FORMATS_BY_KIND[kind]:
        raise DataFormatError(f"format {name!r} is not accepted for {kind} data. Accepted {kind} formats: {_describe(kind)}")
    spec = _FORMATS[name]
    missing = [c for c in spec.required if c not in columns]
    if missing:  # no row has them: the format is wrong, not the rows
        raise DataFormatError(f"{raw.label}: format {name!r} needs columns {list(spec.required)}; missing {missing}; found {columns}")
    kept: list[dict[str, Any]] = []
    invalid: list[InvalidRow] = []
    first_seen: dict[tuple[str, ...], SourceRow] = {}
    unique = UNIQUE_TOGETHER.get(kind)
    for row, as_read in zip(raw.rows, original.rows):
        if row.problem is not None:
            invalid.append(InvalidRow(row.where, rules.UNPARSEABLE, row.problem, row.record))
            continue
        try:
            record = spec.adapter(row.record)
            _check(record, kind)
            if unique is not None:
                key = tuple(record[c] for c in unique)
                first = first_seen.setdefault(key, row.where)
                if first is not row.where:
                    earlier = f"{first.unit} {first.row}" if first.file == row.where.file else str(first)
                    raise rules.RowRuleError(f"same {', '.join(unique)} as {earlier}", rules.DUPLICATE)
        except rules.RowRuleError as err:
            invalid.append(InvalidRow(row.where, err.rule, str(err), as_read.record))
            continue
        kept.append({**{c: record[c] for c in OUTPUT_COLUMNS[kind]}, **row.where.columns()})
    features = _features(kind)
    features.update(dict(zip(SOURCE_COLUMNS, (datasets.Value("string"), datasets.Value("int64"), datasets.Value("string")))))
    columns = {c: [row[c] for row in kept] for c in features}  # from_list cannot build an empty dataset
    dataset = datasets.Dataset.from_dict(columns, features=features)
    return CleanResult(raw.label, kind, name, len(raw.rows), dataset, invalid)


def _detect(raw: RawRows, kind: str, columns: list[str], tries: int = 100) -> str:
    """The format of the first parsed rows that match one (a broken first row must not hide it)."""
    error: DataFormatError | None = None
    parsed = [row.record for row in raw.rows if row.problem is None][:tries]
    for record in parsed:
        try:
            return detect_format((columns, {c: record.get(c) for c in columns}), kind)
        except DataFormatError as err:
            error = error or err
    if error is None:
        raise DataFormatError(f"{raw.label}: no row could be parsed, so the format cannot be detected")
    raise DataFormatError(f"{raw.label}: {error}")


def _check(record: dict[str, Any], kind: str) -> None:
    """Rules on a normalised row, in order: blank text, control characters, chosen == rejected."""
    texts = TEXT_COLUMNS[kind]
    for column in texts:
        if not record[column].strip():
            raise rules.RowRuleError(f"{column!r} is empty or only whitespace", rules.BLANK_TEXT)
    for column in texts:
        found = CONTROL_CHARS.search(record[column])
        if found:
            raise rules.RowRuleError(
                f"{column!r} holds control character U+{ord(found.group()):04X} at position {found.start()}",
                rules.CONTROL_CHARACTERS,
            )
    if kind == "preference" and record["chosen"] == record["rejected"]:
        raise rules.RowRuleError(f"chosen and rejected are both {_cut(record['chosen'])!r}", rules.CHOSEN_EQUALS_REJECTED)


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary(results: list[CleanResult], policy: str, examples: int = 5) -> dict[str, Any]:
    """JSON-ready account of every source cleaned: rows read, invalid per rule, a few example rows."""
    return {
        "policy": policy,
        "rules": dict(rules.RULES),
        "sources": [
            {
                "source": r.source,
                "kind": r.kind,
                "format": r.format,
                "rows": r.rows_read,
                "invalid": len(r.invalid),
                "invalid_fraction": r.invalid_fraction,
                "by_rule": r.counts(),
                "examples": [{"source": str(row.where), "rule": row.rule, "detail": row.detail} for row in r.invalid[:examples]],
            }
            for r in results
        ],
    }
