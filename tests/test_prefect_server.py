"""The temporary Prefect server of ``rlhf run`` (``flows.prefect_server``): a new workspace's database starts from the
empty, migrated database kept in the user's cache, never from another workspace's runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from prefect import flow
from prefect.settings import PREFECT_HOME, temporary_settings

from flows.prefect_server import database_template, temporary_server


@flow(name="template-probe")
def probe_flow() -> int:
    return 1


def _rows(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def test_a_new_workspace_starts_from_the_kept_empty_database(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    template = database_template()
    assert template == tmp_path / "cache" / "rlhf-pipeline" / template.name and not template.exists()
    kept_at = None
    for workspace in ("one", "two"):
        home = tmp_path / workspace / ".prefect"
        monkeypatch.setenv("PREFECT_HOME", str(home))  # the server's process reads it from the environment
        with temporary_settings(updates={PREFECT_HOME: str(home)}), \
                temporary_server(tmp_path / workspace / ".rlhf", echo=lambda _: None):
            assert probe_flow() == 1  # a flow run recorded on this workspace's server
        assert _rows(home / "prefect.db", "flow_run") == 1 and _rows(home / "prefect.db", "block_type") > 0
        assert template.is_file()
        if kept_at is None:  # kept by the first workspace's server, right after it created its database
            kept_at = template.stat().st_mtime_ns
        else:  # the second workspace's database was copied from it, so nothing new was kept
            assert template.stat().st_mtime_ns == kept_at
    assert _rows(template, "flow_run") == 0 and _rows(template, "block_type") > 0  # schema and block types only
