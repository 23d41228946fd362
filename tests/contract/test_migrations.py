"""The schema's migrations, on SQLite and on PostgreSQL: a new database, a state file
made before migrations existed, and connectors of a fleet starting together."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from connector.adapters.jobstore import JobStore
from connector.adapters.ledger import RunLedger
from connector.adapters.migrations import SCRIPT_LOCATION
from connector.adapters.sql import Database, metadata, schema_revision
from connector.adapters.state import StateStore

DUMP = Path(__file__).parent.parent / "data" / "state-0.1.0.sql"


def head() -> str:
    heads = ScriptDirectory(SCRIPT_LOCATION).get_heads()
    assert len(heads) == 1, f"the migrations have {len(heads)} heads: {heads}; chain them"
    return heads[0]


def differences(db: Database) -> list[object]:
    with db.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


@pytest.fixture(params=["sqlite", "postgresql"])
def new_db(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        db = Database.at_path(tmp_path / "state.db")
        yield db
        db.close()
    else:
        url = request.getfixturevalue("pg_url")
        db = Database(url)
        yield db
        db.close()


def test_a_new_database_is_at_the_newest_revision_and_matches_the_declared_tables(new_db):
    assert schema_revision(new_db.engine) == head()
    assert differences(new_db) == []


def test_opening_it_again_changes_nothing(new_db):
    again = Database(new_db.url) if not new_db.is_postgresql else None
    if again is not None:
        assert schema_revision(again.engine) == head()
        again.close()
    assert differences(new_db) == []


def test_a_state_file_from_before_migrations_is_upgraded_in_place(tmp_path: Path):
    path = tmp_path / "state.db"
    con = sqlite3.connect(path)
    con.executescript(DUMP.read_text())
    con.close()
    state = StateStore.at_path(path)
    try:
        assert schema_revision(state.engine) == head()
        assert differences(state.db) == []
        ledger = RunLedger(state)
        jobs = JobStore(state, ledger)
        server = state.find_servers("web-01")[0]
        assert server.vm_uuid == "4200-aaaa"
        job = jobs.for_server(server.id)
        assert job is not None and job.description == "old" and job.frequency_hours == 12
        run = state.run("r-20260101T000000Z-0001")
        assert run.state == "ACTIVE" and run.stage == "validate"
        ctl = ledger.control(run.id)
        assert ctl is not None and ctl.host == "esx1" and ctl.job_id == job.id
        assert ledger.step(run.id, "validate") == {"ok": True}
        kinds = sorted(e.kind for e in ledger.pending())
        assert kinds == ["multipart", "snapshot"]
        assert state.lookup(b"\x01" * 32) is not None
        assert state.retention_settings() == {server.id: 5}
        # and the upgraded file takes the new writes
        assert ledger.advance(run.id) == ctl.seq + 1
    finally:
        state.close()


def test_a_file_that_is_not_a_state_database_is_refused_clearly(tmp_path: Path):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(sa.exc.DatabaseError):
        Database.at_path(path)


def test_connectors_starting_together_migrate_once(pg_url: str):
    errors: list[BaseException] = []
    dbs: list[Database] = []

    def open_one() -> None:
        try:
            dbs.append(Database(pg_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        assert len(dbs) == 4
        assert schema_revision(dbs[0].engine) == head()
        assert differences(dbs[0]) == []
    finally:
        for db in dbs:
            db.close()
