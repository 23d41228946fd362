"""huey's storage on the state database: the job queue of a fleet, in PostgreSQL.

huey (its tasks, scheduling of delayed tasks, consumer and worker threads) stays the
queue on both engines; only where it keeps its tasks changes. Embedded, that is
huey's own SQLite storage in `queue.db`; in a fleet, it is this storage, over the
same SQLAlchemy engine, psycopg 3 driver and Alembic-managed schema as the state
(tables `queue_tasks`, `queue_schedule`, `queue_kv`). huey's bundled SQL storage
would bring a second database toolkit (peewee) with a driver and reconnection
rules of its own; this one is huey's documented storage interface over the
connections the connector already keeps (and replaces when the server restarts).

Each task is taken by exactly one consumer of the fleet: a dequeue deletes the
oldest task with `FOR UPDATE SKIP LOCKED`, so consumers on many machines never
wait for or take the same row; delayed tasks move to the queue the same way.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from huey.constants import EmptyData
from huey.storage import BaseStorage

from connector.adapters.sql import Database, queue_kv, queue_schedule, queue_tasks


def _epoch(ts: dt.datetime) -> float:
    """huey hands naive UTC times (utc=True): read them as UTC on every machine."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.UTC)
    return ts.timestamp()


class SqlStorage(BaseStorage):  # type: ignore[misc]
    """huey's storage interface over a `Database` (PostgreSQL or SQLite)."""

    priority = True

    def __init__(self, name: str = "huey", database: Database | None = None, **_: Any) -> None:
        super().__init__(name)
        if database is None:
            raise ValueError("SqlStorage needs the state database")
        self.db = database

    # -- the queue ---------------------------------------------------------------------

    def enqueue(self, data: bytes, priority: float | None = None) -> None:
        with self.db.tx() as c:
            c.execute(
                queue_tasks.insert().values(queue=self.name, data=data, priority=priority or 0)
            )

    def dequeue(self) -> bytes | None:
        oldest = (
            sa.select(queue_tasks.c.id)
            .where(queue_tasks.c.queue == self.name)
            .order_by(queue_tasks.c.priority.desc(), queue_tasks.c.id)
            .limit(1)
        )
        if self.db.is_postgresql:
            oldest = oldest.with_for_update(skip_locked=True)
            with self.db.tx() as c:
                row = c.execute(
                    queue_tasks.delete()
                    .where(queue_tasks.c.id == oldest.scalar_subquery())
                    .returning(queue_tasks.c.data)
                ).first()
            return None if row is None else bytes(row.data)
        with self.db.write_tx("queue") as c:
            row = c.execute(
                sa.select(queue_tasks.c.id, queue_tasks.c.data).where(
                    queue_tasks.c.id == oldest.scalar_subquery()
                )
            ).first()
            if row is None:
                return None
            c.execute(queue_tasks.delete().where(queue_tasks.c.id == row.id))
            return bytes(row.data)

    def queue_size(self) -> int:
        with self.db.tx() as c:
            return int(
                c.execute(
                    sa.select(sa.func.count()).where(queue_tasks.c.queue == self.name)
                ).scalar_one()
            )

    def enqueued_items(self, limit: int | None = None) -> list[bytes]:
        q = (
            sa.select(queue_tasks.c.data)
            .where(queue_tasks.c.queue == self.name)
            .order_by(queue_tasks.c.priority.desc(), queue_tasks.c.id)
        )
        if limit is not None:
            q = q.limit(limit)
        with self.db.tx() as c:
            return [bytes(r.data) for r in c.execute(q)]

    def flush_queue(self) -> None:
        with self.db.tx() as c:
            c.execute(queue_tasks.delete().where(queue_tasks.c.queue == self.name))

    # -- delayed tasks -----------------------------------------------------------------

    def add_to_schedule(self, data: bytes, ts: dt.datetime) -> None:
        with self.db.tx() as c:
            c.execute(queue_schedule.insert().values(queue=self.name, data=data, ts=_epoch(ts)))

    def read_schedule(self, ts: dt.datetime) -> list[bytes]:
        due = (
            sa.select(queue_schedule.c.id)
            .where(queue_schedule.c.queue == self.name, queue_schedule.c.ts <= _epoch(ts))
            .order_by(queue_schedule.c.ts, queue_schedule.c.id)
        )
        if self.db.is_postgresql:
            due = due.with_for_update(skip_locked=True)
            with self.db.tx() as c:
                rows = c.execute(
                    queue_schedule.delete()
                    .where(queue_schedule.c.id.in_(due.scalar_subquery()))
                    .returning(queue_schedule.c.ts, queue_schedule.c.id, queue_schedule.c.data)
                ).all()
            return [bytes(r.data) for r in sorted(rows, key=lambda r: (r.ts, r.id))]
        with self.db.write_tx("queue") as c:
            found = c.execute(
                sa.select(queue_schedule.c.id, queue_schedule.c.data).where(
                    queue_schedule.c.id.in_(due.scalar_subquery())
                )
            ).all()
            ids = [r.id for r in found]
            if ids:
                c.execute(queue_schedule.delete().where(queue_schedule.c.id.in_(ids)))
            return [bytes(r.data) for r in found]

    def schedule_size(self) -> int:
        with self.db.tx() as c:
            return int(
                c.execute(
                    sa.select(sa.func.count()).where(queue_schedule.c.queue == self.name)
                ).scalar_one()
            )

    def scheduled_items(self, limit: int | None = None) -> list[bytes]:
        q = (
            sa.select(queue_schedule.c.data)
            .where(queue_schedule.c.queue == self.name)
            .order_by(queue_schedule.c.ts, queue_schedule.c.id)
        )
        if limit is not None:
            q = q.limit(limit)
        with self.db.tx() as c:
            return [bytes(r.data) for r in c.execute(q)]

    def flush_schedule(self) -> None:
        with self.db.tx() as c:
            c.execute(queue_schedule.delete().where(queue_schedule.c.queue == self.name))

    # -- huey's key-value data (revocations, locks; no results are stored) -------------

    def _kv(self, key: str) -> Any:
        return sa.and_(queue_kv.c.queue == self.name, queue_kv.c.key == key)

    def put_data(self, key: str, value: bytes, is_result: bool = False) -> None:
        with self.db.write_tx(f"queue-kv:{key}") as c:
            c.execute(queue_kv.delete().where(self._kv(key)))
            c.execute(queue_kv.insert().values(queue=self.name, key=key, value=value))

    def peek_data(self, key: str) -> Any:
        with self.db.tx() as c:
            row = c.execute(sa.select(queue_kv.c.value).where(self._kv(key))).first()
        return EmptyData if row is None else bytes(row.value)

    def pop_data(self, key: str) -> Any:
        with self.db.write_tx(f"queue-kv:{key}") as c:
            row = c.execute(sa.select(queue_kv.c.value).where(self._kv(key))).first()
            if row is None:
                return EmptyData
            c.execute(queue_kv.delete().where(self._kv(key)))
            return bytes(row.value)

    def delete_data(self, key: str) -> bool:
        with self.db.tx() as c:
            return bool(c.execute(queue_kv.delete().where(self._kv(key))).rowcount)

    def has_data_for_key(self, key: str) -> bool:
        return self.peek_data(key) is not EmptyData

    def put_if_empty(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        with self.db.write_tx(f"queue-kv:{key}") as c:
            if c.execute(sa.select(queue_kv.c.key).where(self._kv(key))).first() is not None:
                return False
            c.execute(queue_kv.insert().values(queue=self.name, key=key, value=value))
            return True

    def result_store_size(self) -> int:
        with self.db.tx() as c:
            return int(
                c.execute(
                    sa.select(sa.func.count()).where(queue_kv.c.queue == self.name)
                ).scalar_one()
            )

    def result_items(self) -> dict[str, bytes]:
        with self.db.tx() as c:
            rows = c.execute(sa.select(queue_kv).where(queue_kv.c.queue == self.name)).all()
        return {r.key: bytes(r.value) for r in rows}

    def flush_results(self) -> None:
        with self.db.tx() as c:
            c.execute(queue_kv.delete().where(queue_kv.c.queue == self.name))
