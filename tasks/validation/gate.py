"""Run the suites over named DataFrames; write the JSON result, Data Docs and a readable summary.

One ephemeral GX context per ``validate_frames`` call (creation takes milliseconds; the ~4 s
``import great_expectations`` happens once per process, on first call). Each dataset gets its
own suite, dataframe asset, validation definition and checkpoint. Once every dataset is validated,
the Data Docs site ``validation_report`` (a site named ``local_site`` would collide with GX's
built-in one) is rendered into ``report_dir/data_docs`` in one build of their results and suites:
what an ``UpdateDataDocsAction`` on each checkpoint would leave, without re-rendering the index
and copying the static assets once per dataset.

Row numbers in examples are 0-based positions in the frame as given (the line in a JSONL split);
when the frame has the provenance columns of ``prepare`` (``source_file``, ``source_row``,
``source_unit``), each example also names the row in its source file (``"source"``), which is
what a user can find: split positions change with every shuffle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.validation.suites import KINDS, RULE_KEY, ValidationConfig

DOCS_SITE = "validation_report"
MAX_EXAMPLES = 5
MAX_EXAMPLE_CHARS = 120  # long texts are cut in examples; the row number finds the full value


@dataclass(frozen=True)
class RuleResult:
    """One expectation's outcome on one dataset (``examples``: up to 5 offending rows or values)."""

    rule: str
    expectation_type: str
    columns: list[str]
    success: bool
    detail: str
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    element_count: int | None = None
    observed_value: Any = None
    error: str | None = None
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Failure:
    """A failed rule, flattened for callers: which dataset, which rule, how many rows, which rows."""

    dataset: str
    rule: str
    expectation_type: str
    columns: list[str]
    unexpected_count: int | None
    detail: str
    examples: list[dict[str, Any]]

    @property
    def column(self) -> str | None:
        """The column(s) the rule is about, comma-joined; None for table-level rules."""
        return ", ".join(self.columns) or None


@dataclass(frozen=True)
class DatasetResult:
    """All rule outcomes for one dataset; ``skipped`` lists rules not run because a column is missing."""

    name: str
    kind: str
    rows: int
    success: bool
    rules: list[RuleResult]
    skipped: list[str]


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of the gate over every dataset; ``success`` only if every rule of every dataset held."""

    datasets: dict[str, DatasetResult]
    report_dir: Path
    config: ValidationConfig

    @property
    def success(self) -> bool:
        return all(d.success for d in self.datasets.values())

    @property
    def failures(self) -> list[Failure]:
        return [
            Failure(d.name, r.rule, r.expectation_type, r.columns, r.unexpected_count, r.detail, r.examples)
            for d in self.datasets.values()
            for r in d.rules
            if not r.success
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: overall success, the thresholds, then per dataset its kind, rows, success, skipped and rules."""
        return {
            "success": self.success,
            "failed_rules": len(self.failures),
            "config": asdict(self.config),
            "datasets": {
                name: {k: v for k, v in asdict(d).items() if k != "name"} for name, d in self.datasets.items()
            },
        }

    def summary(self) -> str:
        """Readable text: one OK line per passing dataset; each failed rule with counts and example rows."""
        failures = self.failures
        if self.success:
            lines = [f"Data validation passed: {len(self.datasets)} dataset(s) OK."]
        else:
            broken = sum(not d.success for d in self.datasets.values())
            lines = [
                f"Data validation FAILED: {len(failures)} rule(s) broken in {broken} of {len(self.datasets)} dataset(s)."
            ]
        for d in self.datasets.values():
            skipped = f"; {len(d.skipped)} rule(s) skipped for missing columns" if d.skipped else ""
            if d.success:
                lines.append(f"  OK    {d.name} ({d.kind}, {d.rows} rows): {len(d.rules)} rules passed{skipped}")
                continue
            failed = [r for r in d.rules if not r.success]
            lines.append(f"  FAIL  {d.name} ({d.kind}, {d.rows} rows): {len(failed)} of {len(d.rules)} rules failed{skipped}")
            for r in failed:
                where = f" on {', '.join(r.columns)}" if r.columns else ""
                lines.append(f"    - {r.rule} [{r.expectation_type}{where}]: {r.detail}")
                lines.extend(f"        {_format_example(e)}" for e in r.examples)
        docs = self.report_dir / "data_docs" / "index.html"
        lines.append(f"Report: {self.report_dir / 'validation.json'}; Data Docs: {docs}")
        return "\n".join(lines)


def validate_frames(
    frames: dict[str, tuple[str, Any]], cfg: ValidationConfig, report_dir: Path, invalid_rows: dict[str, Any] | None = None
) -> ValidationReport:
    """Validate each ``name -> (kind, DataFrame)`` against its kind's suite.

    ``invalid_rows``: ``prepare``'s account of the rows it dropped (``invalid_rows.json``); each
    source in it is checked against ``cfg.max_invalid_fraction`` (``tasks.validation.invalid_rows``).

    Writes ``report_dir/validation.json`` and the Data Docs site ``report_dir/data_docs/`` (also
    when data fail). Raises ``ValueError``/``TypeError`` for a bad call (unknown kind, not a
    DataFrame, no frames); bad data never raises, it fails rules.
    """
    import pandas as pd

    if not frames:
        raise ValueError("validate_frames: no datasets given")
    for name, entry in frames.items():
        if not (isinstance(entry, tuple) and len(entry) == 2):
            raise TypeError(f"dataset {name!r}: expected a (kind, DataFrame) tuple, got {type(entry).__name__}")
        kind, frame = entry
        if kind not in KINDS:
            raise ValueError(f"dataset {name!r}: unknown kind {kind!r}; expected one of {list(KINDS)}")
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"dataset {name!r}: expected a pandas DataFrame, got {type(frame).__name__}")

    report_dir = Path(report_dir)
    docs_dir = report_dir / "data_docs"
    report_dir.mkdir(parents=True, exist_ok=True)
    context = _ephemeral_context(docs_dir)
    datasource = context.data_sources.add_pandas("frames")
    results = {}
    rendered: list[Any] = []  # the validation results and suites the Data Docs show
    for name, (kind, frame) in frames.items():
        frame = frame.reset_index(drop=True)  # row labels = positions, for the examples
        results[name] = _validate_one(context, datasource, name, kind, frame, cfg, rendered)
    context.build_data_docs(site_names=[DOCS_SITE], resource_identifiers=rendered)
    if invalid_rows:
        from tasks.validation.invalid_rows import source_results

        results.update(source_results(invalid_rows, cfg.max_invalid_fraction))

    report = ValidationReport(results, report_dir, cfg)
    (report_dir / "validation.json").write_text(json.dumps(report.to_dict(), indent=2, default=repr) + "\n")
    if not (docs_dir / "index.html").is_file():
        raise RuntimeError(f"Great Expectations did not render Data Docs: {docs_dir / 'index.html'} is missing")
    return report


def _ephemeral_context(docs_dir: Path) -> Any:
    """In-memory GX context: no analytics, no progress bars, one local Data Docs site in ``docs_dir``."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    context.add_data_docs_site(
        DOCS_SITE,
        {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return context


def _validate_one(context: Any, datasource: Any, name: str, kind: str, frame: Any, cfg: ValidationConfig,
                  rendered: list[Any]) -> DatasetResult:
    """Validate one dataset; appends its result's and suite's identifiers to ``rendered`` (for the Data Docs)."""
    import great_expectations as gx
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    from tasks.validation.suites import build_suite

    suite, skipped = build_suite(name, kind, cfg, [str(c) for c in frame.columns])
    suite = context.suites.add(suite)
    batch = datasource.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES},
        )
    )
    outcome = checkpoint.run(batch_parameters={"dataframe": frame})
    ((identifier, validation),) = outcome.run_results.items()
    rendered += [identifier, ExpectationSuiteIdentifier(name=suite.name)]
    rules = [_rule_result(r.to_json_dict(), frame) for r in validation.results]
    return DatasetResult(name, kind, len(frame), all(r.success for r in rules), rules, skipped)


def _rule_result(result: dict[str, Any], frame: Any) -> RuleResult:
    """Flatten one GX ``ExpectationValidationResult`` JSON dict into a ``RuleResult``."""
    config = result["expectation_config"]
    kwargs = config.get("kwargs", {})
    columns = _columns_of(kwargs)
    details = result.get("result") or {}
    error = _error_of(result.get("exception_info"))
    success = bool(result.get("success")) and error is None
    unexpected = details.get("unexpected_count")
    indices = details.get("partial_unexpected_index_list") or []
    if indices:
        examples = [_example_row(frame, i, columns) for i in indices[:MAX_EXAMPLES]]
    else:
        examples = [{"value": _jsonable(v)} for v in (details.get("partial_unexpected_list") or [])[:MAX_EXAMPLES]]
    return RuleResult(
        rule=(config.get("meta") or {}).get(RULE_KEY, config["type"]),
        expectation_type=config["type"],
        columns=columns,
        success=success,
        detail=_detail(config["type"], kwargs, details, error, frame),
        unexpected_count=unexpected,
        unexpected_percent=details.get("unexpected_percent"),
        element_count=details.get("element_count"),
        observed_value=_jsonable(details.get("observed_value")),
        error=error,
        examples=[] if success else examples,
    )


def _columns_of(kwargs: dict[str, Any]) -> list[str]:
    if "column" in kwargs:
        return [kwargs["column"]]
    if "column_A" in kwargs:
        return [kwargs["column_A"], kwargs["column_B"]]
    return list(kwargs.get("column_list", []))


def _error_of(info: Any) -> str | None:
    """The exception message GX caught while evaluating, if any (``info`` is flat or keyed by metric)."""
    if not info:
        return None
    entries = [info] if "raised_exception" in info else list(info.values())
    for entry in entries:
        if isinstance(entry, dict) and (entry.get("raised_exception") or entry.get("exception_message")):
            return str(entry.get("exception_message") or "exception while evaluating")
    return None


def _detail(expectation_type: str, kwargs: dict[str, Any], details: dict[str, Any], error: str | None, frame: Any) -> str:
    """A short sentence: what was counted or observed, against which bound."""
    if error is not None:
        return f"could not be evaluated: {error}"
    if expectation_type == "expect_column_to_exist":
        return f"column {kwargs['column']!r} is missing (columns: {[str(c) for c in frame.columns]})"
    if expectation_type == "expect_table_row_count_to_be_between":
        return f"{details.get('observed_value')} rows, at least {kwargs.get('min_value')} required"
    count = details.get("unexpected_count")
    if count is None and expectation_type == "expect_column_values_to_be_of_type":
        return f"column dtype is {details.get('observed_value')}, expected {kwargs.get('type_')}"
    if count is None:
        return f"observed {details.get('observed_value')!r}"
    total = details.get("element_count")
    text = f"{count} of {total} rows ({details.get('unexpected_percent') or 0.0:.1f}%)"
    text += _bounds(expectation_type, kwargs)
    mostly = kwargs.get("mostly", 1.0)
    if mostly is not None and mostly < 1.0:
        text += f"; at most {100 * (1 - mostly):.1f}% allowed"
    return text


def _bounds(expectation_type: str, kwargs: dict[str, Any]) -> str:
    """Bound text for between-rules, e.g. " with length outside [1, 20000] chars" or " above 48"; else ""."""
    low, high = (_number(kwargs.get(k)) for k in ("min_value", "max_value"))
    if low is None and high is None:
        return ""
    unit = " chars" if expectation_type == "expect_column_value_lengths_to_be_between" else ""
    what = " with length" if unit else ""
    if low is None:
        return f"{what} above {high}{unit}"
    if high is None:
        return f"{what} below {low}{unit}"
    return f"{what} outside [{low}, {high}]{unit}"


def _number(value: Any) -> Any:
    """GX stores bounds as floats; show 48.0 as 48."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _example_row(frame: Any, index: Any, columns: list[str]) -> dict[str, Any]:
    """``{"row": i, ["source": "<file> line <n>",] <column>: value, ...}`` for the rule's columns (all for table-level rules)."""
    from rlhf_core.data.rows import SOURCE_COLUMNS, describe_source

    row = frame.loc[index]  # labels are positions (the gate resets the index)
    shown = [c for c in columns if c in frame.columns] or [str(c) for c in frame.columns if c not in SOURCE_COLUMNS]
    example = {"row": _jsonable(index)}
    if {"source_file", "source_row"} <= set(frame.columns):
        example["source"] = describe_source(row["source_file"], row["source_row"], row.get("source_unit"))
    return {**example, **{c: _jsonable(row[c]) for c in shown}}


def _jsonable(value: Any) -> Any:
    """JSON-safe copy of a cell: NaN -> None, numpy scalars -> Python, long strings cut."""
    if isinstance(value, str):
        return value if len(value) <= MAX_EXAMPLE_CHARS else value[: MAX_EXAMPLE_CHARS - 3] + "..."
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):  # numpy scalar
        return _jsonable(value.item())
    if hasattr(value, "tolist"):  # numpy array
        return _jsonable(value.tolist())
    return repr(value)


def _format_example(example: dict[str, Any]) -> str:
    """``row 5 (data.jsonl line 7): chosen='...'``; ``data.jsonl line 7: blank_text: ...`` for a row prepare dropped."""
    if "value" in example:
        return f"value: {example['value']!r}"
    where = [f"row {example['row']}"] if "row" in example else []
    if "source" in example:
        where.append(f"({example['source']})" if where else str(example["source"]))
    rest = {k: v for k, v in example.items() if k not in ("row", "source")}
    if set(rest) == {"rule", "detail"}:
        return f"{' '.join(where)}: {rest['rule']}: {rest['detail']}"
    return f"{' '.join(where)}: " + ", ".join(f"{k}={v!r}" for k, v in rest.items())
