"""The state database's schema migrations (Alembic), for SQLite and PostgreSQL alike.

`connector.adapters.sql.Database` runs them when it opens a database: a new one is
created at the newest revision, an older one upgraded in place. Each change of the
schema is one new file under `versions/` whose `down_revision` is the newest one
before it (a new table: `op.create_table(...)` there, and the same table declared in
`connector.adapters.sql`); tests/contract/test_migrations.py checks that the
migrations and the tables declared in `connector.adapters.sql` agree, on both engines.
"""

from pathlib import Path

SCRIPT_LOCATION = str(Path(__file__).parent)
