"""Statements run on the driver's cursor read and write exactly what SQLAlchemy does.

Against real SQLite and PostgreSQL: rows written through ``DriverStatement`` are read back
through SQLAlchemy unchanged, and the other way round, including the types whose stored form
differs from the Python value (timestamps with a time zone, JSON, booleans, NULL) and ``IN``
lists of changing lengths, empty included.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from aiso.store import Store, open_store
from aiso.store import tables as t
from aiso.store.driver import DriverStatement

_IDS = bindparam("ids", expanding=True)
_SELECT = select(t.tasks).where(t.tasks.c.id.in_(_IDS)).order_by(t.tasks.c.id)
_UPDATE = (
    update(t.tasks)
    .where(t.tasks.c.id == bindparam("_id"))
    .values(status=bindparam("v_status"), result=bindparam("v_result"))
)


def task_row(n: int, **overrides: Any) -> dict[str, Any]:
    at = datetime(2026, 11, 24, 5, 0, n, 123456, tzinfo=UTC)
    row = {
        "id": f"{n:02d}{str(uuid.uuid4())[2:]}",
        "pipeline": "p",
        "status": "pending",
        "input": {"payload_type": "text", "payload": {"text": f"ü {n}"}},
        "parameters": {"step": {"k": [1, 2.5, None, True]}},
        "callback_url": None,
        "callback_progress": n % 2 == 0,
        "plan": {"steps": []},
        "result": None,
        "error": None,
        "created_at": at,
        "started_at": None,
        "finished_at": None,
        "deadline_at": at + timedelta(minutes=2),
        "updated_at": at,
    }
    row.update(overrides)
    return row


def _as_dicts(rows: Any) -> list[dict[str, Any]]:
    return [dict(r._asdict()) if hasattr(r, "_asdict") else dict(r._mapping) for r in rows]


async def test_rows_written_and_read_either_way_are_the_same(store: Store) -> None:
    through_driver = [task_row(n) for n in range(3)]
    through_sqlalchemy = [task_row(n) for n in range(3, 5)]
    everything = sorted(through_driver + through_sqlalchemy, key=lambda r: r["id"])
    ids = [r["id"] for r in everything]

    def write(conn: Connection) -> None:
        DriverStatement(insert(t.tasks)).run(conn, through_driver)
        conn.execute(insert(t.tasks), through_sqlalchemy)

    def read(conn: Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        driver = DriverStatement(_SELECT).rows(conn, {"ids": ids})
        sqlalchemy = conn.execute(_SELECT, {"ids": ids}).all()
        return _as_dicts(driver), _as_dicts(sqlalchemy)

    async with store.sync_transaction() as tx:
        await tx.run(write)
        driver, sqlalchemy = await tx.run(read, last=True)
    assert driver == sqlalchemy
    assert [r["id"] for r in driver] == ids
    for stored, written in zip(driver, everything, strict=True):
        assert stored["input"] == written["input"]
        assert stored["parameters"] == written["parameters"]
        assert bool(stored["callback_progress"]) is written["callback_progress"]
        assert stored["result"] is None and stored["started_at"] is None
        assert stored["created_at"].replace(tzinfo=UTC) == written["created_at"]


async def test_in_lists_of_any_length_and_updates_of_many_rows(store: Store) -> None:
    rows = [task_row(n) for n in range(5)]
    ids = [r["id"] for r in rows]
    select_tasks = DriverStatement(_SELECT)
    update_tasks = DriverStatement(_UPDATE)

    def change(conn: Connection) -> list[list[str]]:
        DriverStatement(insert(t.tasks)).run(conn, rows)
        update_tasks.run(
            conn,
            [{"_id": i, "v_status": "succeeded", "v_result": {"n": n}} for n, i in enumerate(ids)],
        )
        # The same statement with lists of other lengths, the empty one included.
        return [[r.id for r in select_tasks.rows(conn, {"ids": ids[:n]})] for n in (5, 2, 0, 3)]

    def read(conn: Connection) -> list[Any]:
        return list(conn.execute(select(t.tasks.c.status, t.tasks.c.result).order_by("id")))

    async with store.sync_transaction() as tx:
        found = await tx.run(change)
        stored = await tx.run(read, last=True)
    assert found == [ids, ids[:2], [], ids[:3]]
    assert [(s.status, s.result) for s in stored] == [
        ("succeeded", {"n": n}) for n in range(len(ids))
    ]


async def test_inserted_ids_name_each_row_in_order(store: Store) -> None:
    task = task_row(1)
    at = datetime(2026, 11, 24, 6, 0, tzinfo=UTC)
    events = DriverStatement(insert(t.events))
    first = [
        {"task_id": task["id"], "kind": f"k{n}", "data": {"n": n}, "created_at": at}
        for n in range(5)
    ]
    second = first[:1]

    def write(conn: Connection) -> tuple[list[int], list[int], list[int]]:
        DriverStatement(insert(t.tasks)).run(conn, [task])
        return (
            events.inserted_ids(conn, first),
            events.inserted_ids(conn, []),
            events.inserted_ids(conn, second),
        )

    def read(conn: Connection) -> dict[int, Any]:
        return {r.id: r.data for r in conn.execute(select(t.events.c.id, t.events.c.data))}

    async with store.sync_transaction() as tx:
        ids, none, more = await tx.run(write)
        stored = await tx.run(read, last=True)
    assert none == []
    assert len(set(ids + more)) == 6 and ids == sorted(ids) and more[0] > ids[-1]
    assert [stored[i] for i in ids] == [{"n": n} for n in range(5)]
    assert stored[more[0]] == {"n": 0}


async def test_a_failing_statement_rolls_back_with_the_transaction(store: Store) -> None:
    row = task_row(1)

    def insert_twice(conn: Connection) -> None:
        DriverStatement(insert(t.tasks)).run(conn, [row])
        DriverStatement(insert(t.tasks)).run(conn, [row])  # the same primary key

    # The driver's error arrives as SQLAlchemy's, as it would through SQLAlchemy.
    with pytest.raises(IntegrityError):
        async with store.sync_transaction() as tx:
            await tx.run(insert_twice, last=True)

    def count(conn: Connection) -> int:
        return len(conn.execute(select(t.tasks.c.id).where(t.tasks.c.id == row["id"])).all())

    async with store.sync_transaction() as tx:
        assert await tx.run(count, last=True) == 0


async def test_a_lost_connection_is_invalidated_and_the_next_one_works(postgres_url: str) -> None:
    """The database ends the session under a driver statement: the error is SQLAlchemy's, says
    the connection was invalidated (what tells the orchestrator the store is at fault, not the
    message), and the pool does not hand the dead connection out again."""
    store = await open_store(postgres_url)
    select_tasks = DriverStatement(_SELECT)
    try:
        async with store.engine.connect() as victim:
            pid = (await victim.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
            async with store.engine.connect() as other:
                await other.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
            with pytest.raises(DBAPIError) as caught:
                await victim.run_sync(lambda conn: select_tasks.rows(conn, {"ids": ["x"]}))
            assert caught.value.connection_invalidated
        async with store.engine.connect() as conn:
            assert await conn.run_sync(lambda c: select_tasks.rows(c, {"ids": ["x"]})) == []
    finally:
        await store.close()
