"""load_records: every supported file kind, folders, URIs, hub names, and the errors users see (CSV: read_rows too)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
import pytest

from rlhf_core.data import loading
from rlhf_core.data.loading import SUPPORTED_SUFFIXES, DataLoadError, load_records
from rlhf_core.data.rows import read_rows

ROWS = [{"prompt": "one", "completion": "1"}, {"prompt": "two", "completion": "2"}, {"prompt": "three", "completion": "3"}]


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep datasets' Arrow cache inside the test's tmp dir, not in the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _write(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` in the file format that ``path``'s name implies."""
    if path.name.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(str(path))
        return path
    text = json.dumps(rows, indent=1) if path.name.endswith((".json", ".json.gz")) else _jsonl(rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["rows.json", "rows.jsonl", "rows.jsonl.gz", "rows.json.gz", "rows.parquet"])
def test_each_supported_file_kind_loads_all_rows(tmp_path: Path, name: str) -> None:
    ds = load_records(_write(tmp_path / name, ROWS))
    assert ds.to_list() == ROWS


def test_json_extension_also_accepts_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text(_jsonl(ROWS), encoding="utf-8")
    assert load_records(path).to_list() == ROWS


def test_folder_reads_supported_files_sorted_and_ignores_others(tmp_path: Path) -> None:
    _write(tmp_path / "b.jsonl", ROWS[1:])
    _write(tmp_path / "a.json", ROWS[:1])
    (tmp_path / "README.md").write_text("not data")
    assert load_records(tmp_path)["prompt"] == ["one", "two", "three"]


def test_folder_without_data_files_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataLoadError, match=r"no supported data files.*notes\.txt"):
        load_records(tmp_path)


def test_folder_mixing_json_and_parquet_is_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a.jsonl", ROWS)
    _write(tmp_path / "b.parquet", ROWS)
    with pytest.raises(DataLoadError, match="mixes JSON and Parquet"):
        load_records(tmp_path)
    (tmp_path / "c.csv").write_text("prompt,completion\na,b\n")
    with pytest.raises(DataLoadError, match="mixes CSV, JSON and Parquet"):
        load_records(tmp_path)


def test_missing_path_like_source_fails_clearly_without_a_hub_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hub(*args, **kwargs):
        raise AssertionError("a path-like source must not be sent to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    for source in ("data/missing.jsonl", str(tmp_path / "missing.parquet"), "./nope", "prefs/", "org/name/", "data/prefs/train",
                   "data\\prefs"):
        with pytest.raises(DataLoadError, match="no such file or folder") as err:
            load_records(source)
        assert source in str(err.value)


@pytest.mark.parametrize(("text", "path"), [
    ("imdb", False), ("some-org/some-dataset", False), ("Anthropic/hh-rlhf", False), ("org/name.v2", False),
    ("prefs/", True), ("org/name/", True), ("data/prefs/train", True), ("data/prefs/", True), ("data\\prefs", True),
    ("prefs\\", True), ("./prefs", True), ("../prefs", True), ("~/prefs", True), ("/abs/prefs", True), (".", True),
    ("prefs.jsonl", True), ("org/rows.csv", True), ("my prefs", True), ("", True),
])
def test_looks_like_path_takes_only_name_or_org_name_for_a_hub_dataset(text: str, path: bool) -> None:
    assert loading.looks_like_path(text) is path


def test_a_relative_folder_that_exists_is_read_with_or_without_a_trailing_slash(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    builders = datasets.load_dataset

    def no_hub(name: str, *args, **kwargs):
        assert name in ("json", "parquet"), f"an existing folder must not be sent to the hub as {name!r}"
        return builders(name, *args, **kwargs)  # datasets' packaged file readers

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prefs").mkdir()
    _write(tmp_path / "prefs" / "a.jsonl", ROWS)
    for source in ("prefs", "prefs/"):
        assert load_records(source).to_list() == ROWS


def test_other_names_go_to_the_hub_with_the_split(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_hub(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    assert len(load_records("some-org/some-dataset", split="test")) == 3
    assert calls == [("some-org/some-dataset", "test")]


def test_unreachable_hub_name_becomes_a_data_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, split: str) -> datasets.Dataset:
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataLoadError, match=r"'some-org/some-dataset' is not a local file.*offline"):
        load_records("some-org/some-dataset")


def test_unsupported_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "rows.tsv"
    path.write_text("prompt\tcompletion\na\tb\n")
    with pytest.raises(DataLoadError, match="unsupported file type") as err:
        load_records(path)
    assert str(path) in str(err.value)
    assert all(suffix in str(err.value) for suffix in SUPPORTED_SUFFIXES)


def test_malformed_json_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n{"prompt": "d"}\n')
    with pytest.raises(DataLoadError, match=r"bad\.jsonl: malformed JSON at line 3"):
        load_records(path)


def test_malformed_json_array_is_reported_with_its_line_number(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"prompt": "a"},\n {"prompt": "b"\n]\n')
    with pytest.raises(DataLoadError, match=r"bad\.json: malformed JSON at line 4"):
        load_records(path)


def test_json_line_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a"}\n["prompt", "b"]\n')
    with pytest.raises(DataLoadError, match="line 2 is not a JSON object"):
        load_records(path)


@pytest.mark.parametrize("name, content", [("empty.jsonl", b""), ("blank.json", b"\n  \n")])
def test_empty_file_is_reported(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataLoadError, match="empty file"):
        load_records(path)


def test_empty_gzip_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("")
    with pytest.raises(DataLoadError, match="empty file"):
        load_records(path)


def test_empty_json_array_has_no_records(tmp_path: Path) -> None:
    path = tmp_path / "none.json"
    path.write_text("[]")
    with pytest.raises(DataLoadError, match="no records"):
        load_records(path)


# ---------------------------------------------------------------- CSV

# A spreadsheet export: byte-order mark, CRLF, commas and a line break inside quoted cells, doubled
# quotes, cells that look like numbers or NA, an empty cell, a blank line. Records start on lines 2, 5, 6.
CSV_TEXT = (
    '\ufeffprompt,chosen,rejected\r\n"Hi, there","Hello!\r\nHow can I help?",Go away\r\n\r\n'
    '007,"She said ""yes""",NA\r\n3.50,,1e3\r\n'
)
CSV_RECORDS = [
    {"prompt": "Hi, there", "chosen": "Hello!\r\nHow can I help?", "rejected": "Go away"},
    {"prompt": "007", "chosen": 'She said "yes"', "rejected": "NA"},
    {"prompt": "3.50", "chosen": "", "rejected": "1e3"},
]


@pytest.mark.parametrize("name", ["pairs.csv", "pairs.csv.gz"])
def test_csv_cells_are_text_and_both_readers_agree(tmp_path: Path, name: str) -> None:
    from tasks.sources import count_rows

    path = tmp_path / name
    data = CSV_TEXT.encode("utf-8")
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    raw = read_rows(path)
    assert [r.record for r in raw.rows] == CSV_RECORDS  # BOM gone, no number or None made of a cell
    assert [(r.where.row, r.where.unit, r.problem) for r in raw.rows] == [(2, "line", None), (5, "line", None), (6, "line", None)]
    assert load_records(path).to_list() == CSV_RECORDS
    assert count_rows(path) == 3


def test_csv_record_with_the_wrong_number_of_fields(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text('prompt,chosen,rejected\n"multi\nline",b,c\nd,e,f,g\nh,i\n', encoding="utf-8")
    rows = read_rows(path).rows
    assert [(r.where.row, r.problem) for r in rows] == [(2, None), (4, "has 4 fields, the header has 3"), (5, None)]
    assert rows[1].record == "d,e,f,g" and rows[2].record == {"prompt": "h", "chosen": "i", "rejected": None}
    with pytest.raises(DataLoadError, match=r"pairs\.csv: line 4 has 4 fields, the header has 3"):
        load_records(path)  # pandas would shift a first such record into an index: it never gets there
    path.write_text("prompt,chosen,rejected\nh,i\n", encoding="utf-8")
    with pytest.raises(DataLoadError, match=r"pairs\.csv: line 2 has 2 fields, the header has 3"):
        load_records(path)  # pandas would fill the missing cell with ""


@pytest.mark.parametrize(
    "content, error",
    [
        (b"prompt,chosen,rejected\r\n\r\n", r"bad\.csv: no records"),
        (b"prompt,chosen\na,b\nc,\xff\n", r"bad\.csv: .*UTF-8"),
        (b"prompt,,chosen\na,b,c\n", r"bad\.csv: the header \(line 1\) leaves column\(s\) \[2\] unnamed"),
        (b"prompt,chosen,prompt\na,b,c\n", r"bad\.csv: the header \(line 1\) repeats column name\(s\) \['prompt'\]"),
        (b'prompt,chosen\na,b\nc,"never closed\nd,e\n', r"bad\.csv: the record on line 3 opens a quoted cell that is never closed"),
    ],
)
def test_csv_files_that_cannot_be_read_name_the_file_and_the_reason(tmp_path: Path, content: bytes, error: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    for reader in (read_rows, load_records):
        with pytest.raises(DataLoadError, match=error):
            reader(path)


def test_csv_files_of_a_folder_must_share_their_columns(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("prompt,completion\n1,2\n")
    (tmp_path / "b.csv").write_text("completion,prompt\n4,3\n")
    assert load_records(tmp_path).to_list() == [{"prompt": "1", "completion": "2"}, {"prompt": "3", "completion": "4"}]
    (tmp_path / "b.csv").write_text("prompt,answer\n3,4\n")
    with pytest.raises(DataLoadError, match=r"CSV files with different columns: .*a\.csv has \['prompt', 'completion'\]"):
        load_records(tmp_path)


@pytest.mark.parametrize(
    "name, n_rows, columns",
    [
        ("hh-rlhf-harmless-base-test.jsonl.gz", 20, {"chosen", "rejected"}),
        ("sharegpt-dpo-en-demo.json", 20, {"conversations", "chosen", "rejected"}),
        ("alpaca-en-demo.json", 20, {"instruction", "input", "output"}),
    ],
)
def test_public_fixture_files_load(fixtures_dir: Path, name: str, n_rows: int, columns: set[str]) -> None:
    ds = load_records(fixtures_dir / "public" / name)
    assert len(ds) == n_rows
    assert set(ds.column_names) == columns


def test_s3_object_and_prefix_through_fsspec(tmp_path: Path) -> None:
    """A real S3 HTTP endpoint on loopback (moto): one object, then a prefix of several."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"},
        }
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bucket")
        fs.pipe({"bucket/data/a.jsonl": _jsonl(ROWS[:2]).encode(), "bucket/data/b.jsonl": _jsonl(ROWS[2:]).encode()})
        fs.pipe("bucket/data/notes.txt", b"ignored")

        assert load_records("s3://bucket/data/a.jsonl", storage_options=options)["prompt"] == ["one", "two"]
        assert load_records("s3://bucket/data/", storage_options=options)["prompt"] == ["one", "two", "three"]
        with pytest.raises(DataLoadError, match="no such object"):
            load_records("s3://bucket/data/missing.jsonl", storage_options=options)
        fs.pipe("bucket/bad/rows.jsonl", b'{"prompt": "a"}\n{"prompt": \n')
        with pytest.raises(DataLoadError, match=r"^s3://bucket/bad/rows\.jsonl: malformed JSON at line 2"):
            load_records("s3://bucket/bad/", storage_options=options)
    finally:
        server.stop()


def test_one_json_object_over_several_lines_is_named_as_such_not_as_malformed_lines(tmp_path):
    """A pretty-printed ``{"version": ..., "data": [...]}`` (SQuAD-style): each of its lines alone is broken JSON, so
    without this every line would be reported as malformed."""
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": "1", "data": [{"prompt": "p", "chosen": "a", "rejected": "b"}]}, indent=2))
    with pytest.raises(DataLoadError, match=r"wrapped.json: one JSON object over several lines \(keys \['version', 'data'\]\), "
                                            r"not JSON Lines .* it holds a list under \['data'\]: .*jq '.data' FILE"):
        read_rows(path)
    broken = tmp_path / "broken.jsonl"  # broken lines that are not one object either: still reported line by line
    broken.write_text('{"prompt": \n{"prompt": "p"\n')
    assert [row.problem is not None for row in read_rows(broken).rows] == [True, True]
