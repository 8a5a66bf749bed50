"""``tasks.tracking.dataset_schema``: MLflow infers from the chosen rows exactly the schema it infers from every row."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from tasks.tracking.dataset_schema import schema_rows


def _chat(*contents: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": c} for c in contents]


FRAMES = {
    "chat lists, None and empty lists": pd.DataFrame({"m": [_chat("a"), None, [], _chat("b", "c"), _chat("d")] * 3}),
    "dicts missing keys": pd.DataFrame({"m": [[{"role": "user"}], _chat("x"), [{"content": "c", "extra": 1}], _chat("y")]}),
    "text with NaN, floats with NaN": pd.DataFrame({"t": ["x", np.nan, "y", "z"], "f": [1.0, 2.0, 3.0, np.nan]}),
    "None and NaN inside dicts": pd.DataFrame({"m": [[{"k": "v"}], [{"k": None}], [{"k": "w"}]],
                                               "f": [[{"k": 1.5}], [{"k": 2.5}], [{"k": float("nan")}]]}),
    "arrays and lists": pd.DataFrame({"m": [np.array(_chat("x"), dtype=object), _chat("y"), np.array([], dtype=object)]}),
    "nested numbers": pd.DataFrame({"d": [{"x": 1, "y": [1, 2]}, {"x": 2, "y": []}, {"x": 3}, {"x": 4, "y": [5]}]}),
    "incompatible types": pd.DataFrame({"m": [["x"], [1], ["y"]]}),
    "nullable ints": pd.DataFrame({"i": pd.array([1, None, 3, 4], dtype="Int64")}),
    "2-d arrays": pd.DataFrame({"a": [np.zeros((2, 2)), np.zeros((1, 3)), np.zeros((2, 2))]}),
    "all missing": pd.DataFrame({"m": [None, None, None]}),
    "no rows": pd.DataFrame({"m": pd.Series([], dtype=object), "i": pd.Series([], dtype="int64")}),
}


def _schema(df: pd.DataFrame) -> str | None:
    import mlflow.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.data.from_pandas(df).to_dict()["schema"]


@pytest.mark.parametrize("name", list(FRAMES))
def test_the_chosen_rows_give_the_schema_of_all_rows(name):
    df = FRAMES[name]
    rows = schema_rows(df)
    assert rows is not None
    assert _schema(df.iloc[rows]) == _schema(df)


def test_one_row_per_shape_of_value():
    df = pd.DataFrame({"prompt": [f"p{i}" for i in range(300)], "prompt_messages": [_chat(f"p{i}") for i in range(300)],
                       "source_row": range(300)})
    df.loc[7, "prompt_messages"] = None  # the only missing message list: its row is needed (required: false)
    assert schema_rows(df) == [0, 7]
    assert _schema(df.iloc[[0, 7]]) == _schema(df)


def test_values_whose_dtype_pandas_infers_from_the_value_need_every_row():
    # Large ints turn an object column into uint64 or leave it object, by value; so do mixed time zones.
    assert schema_rows(pd.DataFrame({"i": pd.Series([1, 2**63, 5], dtype=object)})) is None
