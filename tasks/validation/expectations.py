"""Custom Great Expectations expectations the built-in set lacks (pandas engine only).

* ``ExpectColumnPairValuesToDiffer``: row-wise ``column_A != column_B`` (a preference pair
  whose chosen and rejected replies are identical carries no preference signal). GX 1.24 has
  ``expect_column_pair_values_to_be_equal`` but no "not equal" for pandas strings.
* ``ExpectColumnValuesToBeChatMessages``: each value is a non-empty list of
  ``{"role": "system"|"user"|"assistant", "content": str}`` dicts (the normalised
  ``prompt_messages`` shape of ``rlhf_core.data.formats``).

GX registers an expectation (under the snake_case of its class name) and a metric when the
class is defined, and the classes subclass GX bases, so this module imports
``great_expectations`` at top level. It is therefore only imported inside functions
(``tasks.validation.suites``), keeping ``import tasks.validation`` cheap.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from great_expectations.compatibility import pydantic
from great_expectations.core.suite_parameters import SuiteParameterDict
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation, ColumnPairMapExpectation
from great_expectations.expectations.metrics.map_metric_provider import (
    ColumnMapMetricProvider,
    ColumnPairMapMetricProvider,
    column_condition_partial,
    column_pair_condition_partial,
)

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")


class ColumnPairValuesDiffer(ColumnPairMapMetricProvider):
    """Metric ``column_pair_values.differ``: True where the two values are not equal."""

    condition_metric_name = "column_pair_values.differ"
    condition_domain_keys = (
        "batch_id",
        "table",
        "column_A",
        "column_B",
        "row_condition",
        "condition_parser",
        "ignore_row_if",
    )
    condition_value_keys = ()

    @column_pair_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column_A: pd.Series, column_B: pd.Series, **kwargs: Any) -> pd.Series:
        # Element-wise Python equality, so list or dict values compare too instead of raising.
        return pd.Series([a != b for a, b in zip(column_A, column_B)], index=column_A.index, dtype=bool)


class ExpectColumnPairValuesToDiffer(ColumnPairMapExpectation):
    """Expect the values of column A to differ from those of column B in every row.

    Rows where either value is missing are ignored by default (the not-null rules report those).
    """

    # A column-pair map expectation must declare how rows with missing values are treated.
    ignore_row_if: Literal["both_values_are_missing", "either_value_is_missing", "neither"] | SuiteParameterDict = pydantic.Field(default="either_value_is_missing")

    map_metric: ClassVar[str] = "column_pair_values.differ"
    success_keys: ClassVar[tuple[str, ...]] = ("column_A", "column_B", "ignore_row_if", "mostly")
    args_keys: ClassVar[tuple[str, ...]] = ("column_A", "column_B")
    library_metadata: ClassVar[dict[str, Any]] = {"maturity": "experimental", "tags": ["rlhf"], "contributors": []}


def is_chat(value: Any) -> bool:
    """True for a non-empty list of ``{"role": one of CHAT_ROLES, "content": str}`` dicts.

    A numpy array counts as a list: ``datasets.Dataset.to_pandas`` yields list cells as arrays.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        return False
    return all(
        isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str) for m in value
    )


class ColumnValuesChatMessages(ColumnMapMetricProvider):
    """Metric ``column_values.chat_messages``: True where the value is a well-formed chat (see ``is_chat``)."""

    condition_metric_name = "column_values.chat_messages"
    condition_value_keys = ()

    @column_condition_partial(engine=PandasExecutionEngine)
    def _pandas(cls, column: pd.Series, **kwargs: Any) -> pd.Series:
        return column.map(is_chat).astype(bool)


class ExpectColumnValuesToBeChatMessages(ColumnMapExpectation):
    """Expect each value to be a non-empty list of ``{"role", "content"}`` messages (nulls are left to not-null rules)."""

    map_metric: ClassVar[str] = "column_values.chat_messages"
    success_keys: ClassVar[tuple[str, ...]] = ("mostly",)
    library_metadata: ClassVar[dict[str, Any]] = {"maturity": "experimental", "tags": ["rlhf"], "contributors": []}
