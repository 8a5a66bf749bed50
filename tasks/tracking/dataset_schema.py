"""The rows of a DataFrame that MLflow needs to infer its dataset schema: one per kind of value in each column.

MLflow infers the type of an object column value by value and merges the types it finds (merging a
type in again changes nothing: the merge is a join), and marks a column ``required`` unless a value
is missing. For a column of chat message lists it deep-copies the type at every row: 1.2 s for the
16,000 preference pairs of the default run. One row of each *shape* of value (its type, the keys and
shapes inside it, missing or not) gives the same schema. ``None`` (infer from every row) where a
top-level value's type makes pandas' own type inference look at the value itself (ints, dates).
"""

from __future__ import annotations

from typing import Any

# Top-level values whose column dtype pandas infers from their types alone (``Series.infer_objects``).
_SHAPED = (str, float, dict, list, tuple, type(None))


def value_shape(value: Any) -> Any:
    """What MLflow's type inference sees of ``value``: its type, a float's NaN-ness, a container's contents' shapes."""
    import numpy as np

    if isinstance(value, dict):
        return dict, tuple((key, value_shape(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        return type(value), len(value) == 0, tuple(dict.fromkeys(value_shape(item) for item in value))
    if isinstance(value, np.ndarray):  # other ranks: a shape of its own (never taken for another value's)
        return object()
    if isinstance(value, float):
        return type(value), value != value  # NaN is a missing value
    return (type(value),)


def schema_rows(df: Any) -> list[int] | None:
    """Positions of rows with every shape of value of every column of ``df`` (MLflow infers the same schema
    from them as from ``df``), in order; ``None`` when a column holds values whose shape is not enough."""
    import numpy as np

    rows: set[int] = set()
    for name in df.columns:
        column = df[name]
        values = column.to_list()
        if column.dtype.kind == "O" and not all(type(v) in _SHAPED or type(v) is np.ndarray for v in values):
            return None
        first: dict[Any, int] = {}
        for position, value in enumerate(values):
            first.setdefault(value_shape(value), position)
        rows.update(first.values())
    return sorted(rows)
