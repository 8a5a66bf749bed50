"""The canary search (tests/canary.py) finds a planted secret wherever a store could keep it, and names where."""

from __future__ import annotations

import base64
import gzip
import json
import sqlite3
import subprocess
import zipfile
import zlib

import pytest

from tests.canary import CANARY_ENV, SECRET_VARIABLES, search

SECRET = {"HF_TOKEN": CANARY_ENV["HF_TOKEN"]}
VALUE = SECRET["HF_TOKEN"].encode()


def test_the_canaries_are_unique_and_cover_every_secret_variable():
    assert set(CANARY_ENV) == set(SECRET_VARIABLES) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                                        "MLFLOW_TRACKING_TOKEN", "HF_TOKEN"}
    assert len(set(CANARY_ENV.values())) == len(CANARY_ENV)
    assert not any(a in b for a in CANARY_ENV.values() for b in CANARY_ENV.values() if a != b)  # no value inside another


def test_a_clean_store_has_no_hits_and_every_file_is_read(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "params.yaml").write_text("dpo:\n  beta: 0.1\n")
    (tmp_path / "b.bin").write_bytes(bytes(range(256)) * 100)
    found = search([tmp_path], CANARY_ENV)
    assert found.hits == []
    assert sorted(p.name for p in found.files) == ["b.bin", "params.yaml"] and found.bytes == 25600 + 17


def test_a_planted_secret_is_found_with_its_file_and_offset(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "stage.log").write_bytes(b"x" * 1000 + b"token=" + VALUE + b"\n")
    (tmp_path / "other.txt").write_text("nothing here")
    (hit,) = search([tmp_path], CANARY_ENV).hits
    assert (hit.path, hit.layer, hit.offset, hit.secret) == (tmp_path / "logs" / "stage.log", "raw", 1006, "HF_TOKEN")
    assert str(hit) == f"HF_TOKEN in {tmp_path / 'logs' / 'stage.log'} [raw] at byte 1006"


def test_a_secret_across_a_chunk_boundary_is_found_once(tmp_path):
    data = tmp_path / "big.bin"
    data.write_bytes(b"y" * 95 + VALUE + b"z" * 300)
    hits = search([data], SECRET, chunk=100).hits  # the value starts 5 bytes before the first chunk ends
    assert [(h.offset, h.layer) for h in hits] == [(95, "raw")]


@pytest.mark.parametrize("shift", [0, 1, 2])
def test_a_base64_encoded_secret_is_found_at_any_alignment(tmp_path, shift):
    blob = base64.b64encode(b"p" * shift + b'{"env": {"HF_TOKEN": "' + VALUE + b'"}}')
    (tmp_path / "state.json").write_bytes(b'{"result": "' + blob + b'"}')
    found = {(h.layer, h.secret) for h in search([tmp_path], CANARY_ENV).hits}
    assert found == {("raw", "HF_TOKEN (base64)"), ("base64 text at byte 12", "HF_TOKEN")}  # as it is, and decoded


def test_base64_text_broken_into_lines_is_decoded(tmp_path):
    pickled = base64.encodebytes(b"\x80\x04\x95" + b"q" * 100 + VALUE + b"r" * 100)  # 76-character lines
    (tmp_path / "result").write_bytes(pickled)  # as Prefect keeps a task's pickled result or exception
    (tmp_path / "record.json").write_text(json.dumps({"result": pickled.decode()}))  # the same inside JSON: "\n" escapes
    hits = search([tmp_path], SECRET).hits
    assert sorted((h.path.name, h.layer) for h in hits) == [("record.json", "base64 text at byte 12"), ("result", "base64 text at byte 0")]


def test_compressed_files_are_searched_inside(tmp_path):
    (tmp_path / "log.gz").write_bytes(gzip.compress(b"secret " + VALUE))
    with zipfile.ZipFile(tmp_path / "model.pt", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x04" + VALUE)
    (tmp_path / "loose-object").write_bytes(zlib.compress(b"blob 40\0" + VALUE))
    layers = sorted((h.path.name, h.layer) for h in search([tmp_path], CANARY_ENV).hits)
    assert layers == [("log.gz", "gzip"), ("loose-object", "zlib"), ("model.pt", "zip:archive/data.pkl")]


def test_sqlite_values_are_found_also_when_split_over_overflow_pages(tmp_path):
    db = tmp_path / "store.db"
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA page_size = 4096")
        con.execute("CREATE TABLE log (id INTEGER PRIMARY KEY, message TEXT)")
        con.execute("INSERT INTO log (message) VALUES (?)", ("short line",))
        # Longer than a page: SQLite keeps the first ~490 bytes in the row's page and the rest on overflow pages,
        # so this value's secret is split between two pages (with a page pointer between the halves).
        con.execute("INSERT INTO log (message) VALUES (?)", ("a" * 460 + VALUE.decode() + "b" * 8000,))
    assert VALUE not in db.read_bytes()  # a raw search alone would miss it
    hits = search([db], SECRET).hits
    assert [(h.layer, h.secret) for h in hits] == [("sqlite:log.message row 1", "HF_TOKEN")]


def test_parquet_rows_are_decompressed(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"row {i}: key {VALUE.decode()}" for i in range(50)]  # compressible (zstd keeps a tiny page as it is)
    pq.write_table(pa.table({"prompt": rows}), tmp_path / "data.parquet", compression="zstd",
                   write_statistics=False)  # else the column's min and max are kept uncompressed in the footer
    assert VALUE not in (tmp_path / "data.parquet").read_bytes()  # compressed: a raw search alone would miss it
    hits = search([tmp_path], SECRET).hits
    assert {(h.layer, h.secret) for h in hits} == {("parquet rows", "HF_TOKEN")} and len(hits) == 50


def test_a_secret_only_in_git_history_is_found_in_its_packed_objects(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "params.yaml").write_text(json.dumps({"token": VALUE.decode()}))
    git("add", "params.yaml")
    git("commit", "-qm", "oops")
    (tmp_path / "params.yaml").write_text("{}")
    git("commit", "-qam", "removed")
    git("gc", "-q", "--aggressive")  # packed: compressed and delta-encoded, no loose object left
    hits = search([tmp_path], SECRET).hits
    assert [h.layer.split()[0] for h in hits] == ["git"], [str(h) for h in hits]


def test_a_store_that_is_not_there_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to search"):
        search([tmp_path / "missing"], SECRET)
