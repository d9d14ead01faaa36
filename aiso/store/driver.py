"""Hot-path statements run on the database driver's cursor, compiled once per dialect.

For the orchestrator's and the gateway's small statements SQLAlchemy's execution layer costs
more than the database's own work: each execution builds an execution context, dispatches
connection events, processes parameters and results through generic machinery and sets up a
result object. A ``DriverStatement`` keeps SQLAlchemy for what it does well — the statement is
written in Core, compiled by the connection's dialect (SQLite or PostgreSQL: one code path),
and its parameters and results go through the types' own processors — and executes it
itself: the compiled SQL and the processors are looked up once per dialect, and each call
hands a tuple of processed parameters to the driver's cursor, inside the caller's
transaction. An orchestrator transaction applying one message costs a quarter less this way.

Supported: positional parameter styles (SQLite's ``qmark``, asyncpg's ``numeric_dollar``),
``IN`` lists from expanding parameters, INSERTs whose parameter sets all give the same
columns, and the generated keys of inserted rows (``inserted_ids``) where the driver reports
them (``cursor.lastrowid``: SQLite). Not supported: ``RETURNING``; where the driver does not
report row ids (PostgreSQL), ``inserted_ids`` leaves the statement to SQLAlchemy, which
returns the keys of a multi-row insert in order with one round trip.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Dialect, Executable, Insert, Select
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["DriverStatement"]

_Processor = Callable[[Any], Any] | None


@dataclass(frozen=True)
class _Compiled:
    """A statement compiled for one dialect (and, for an INSERT, one set of columns)."""

    compiled: SQLCompiler
    keys: tuple[str, ...]
    """Parameter names in positional order."""
    processors: tuple[_Processor, ...]
    expanding: frozenset[str]
    """Parameters that are lists rendered into ``IN (…)``: the SQL depends on their lengths."""
    columns: tuple[Any, ...]
    """The selected columns (SELECT only)."""
    row: Callable[[Any], Any] | None
    """Makes a named tuple of a result row (SELECT only)."""
    expanded: dict[tuple[int, ...], str] = field(default_factory=dict)
    """The SQL by the lengths of the expanding parameters, in ``keys`` order."""
    results: dict[tuple[Any, ...], tuple[_Processor, ...]] = field(default_factory=dict)
    """Result processors by the driver's column types."""


class DriverStatement:
    """A Core statement executed on the driver's cursor; see the module docstring."""

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._compiled: dict[tuple[str, tuple[str, ...] | None], _Compiled] = {}
        self._returning: Executable | None = None

    def rows(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """Run a SELECT; its rows as named tuples, values processed as SQLAlchemy would."""
        plan = self._plan(conn.dialect, params)
        assert plan.row is not None, "rows() runs SELECT statements"
        sql, args = _arguments(plan, params)
        cursor = _cursor(conn)
        try:
            cursor.execute(sql, args)
            kinds = tuple(d[1] for d in cursor.description)
            raw = cursor.fetchall()
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, cursor, exc, sql, args) from exc
        finally:
            cursor.close()
        processors = plan.results.get(kinds)
        if processors is None:
            dialect = conn.dialect
            processors = tuple(
                c.type.dialect_impl(dialect).result_processor(dialect, kind)
                for c, kind in zip(plan.columns, kinds, strict=True)
            )
            plan.results[kinds] = processors
        make = plan.row
        if not any(processors):
            return [make(r) for r in raw]
        return [
            make([v if p is None else p(v) for v, p in zip(r, processors, strict=True)])
            for r in raw
        ]

    def run(self, conn: Connection, params: Sequence[Mapping[str, Any]]) -> None:
        """Run a statement without results once per parameter set (``executemany``)."""
        if not params:
            return
        plan = self._plan(conn.dialect, params[0])
        cursor = _cursor(conn)
        try:
            if len(params) == 1 or plan.expanding:
                for one in params:
                    cursor.execute(*_arguments(plan, one))
            else:
                cursor.executemany(plan.compiled.string, [_arguments(plan, p)[1] for p in params])
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, cursor, exc, plan.compiled.string, params) from exc
        finally:
            cursor.close()

    def inserted_ids(self, conn: Connection, params: Sequence[Mapping[str, Any]]) -> list[int]:
        """Run an INSERT once per parameter set; the primary keys it generated, in order."""
        if not params:
            return []
        dialect = conn.dialect
        if not (isinstance(dialect, DefaultDialect) and dialect.postfetch_lastrowid):
            if self._returning is None:
                assert isinstance(self.statement, Insert), "inserted_ids() runs INSERTs"
                (key,) = list(self.statement.table.primary_key)
                self._returning = self.statement.returning(key, sort_by_parameter_order=True)
            return [row[0] for row in conn.execute(self._returning, list(params))]
        plan = self._plan(conn.dialect, params[0])
        cursor = _cursor(conn)
        ids: list[int] = []
        try:
            # One row per execution: lastrowid names the row of a single-row insert only.
            for one in params:
                cursor.execute(*_arguments(plan, one))
                ids.append(int(cursor.lastrowid))
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, cursor, exc, plan.compiled.string, params) from exc
        finally:
            cursor.close()
        return ids

    def _plan(self, dialect: Dialect, params: Mapping[str, Any]) -> _Compiled:
        columns = tuple(params) if isinstance(self.statement, Insert) else None
        key = (dialect.name, columns)
        plan = self._compiled.get(key)
        if plan is None:
            plan = self._compile(dialect, columns)
            self._compiled[key] = plan
        return plan

    def _compile(self, dialect: Dialect, columns: tuple[str, ...] | None) -> _Compiled:
        compiled = self.statement.compile(
            dialect=dialect, column_keys=list(columns) if columns is not None else None
        )
        assert isinstance(compiled, SQLCompiler)
        if compiled.positiontup is None:
            raise TypeError(f"{dialect.name}: only positional parameter styles are supported")
        keys = tuple(compiled.positiontup)
        binds = [compiled.binds[k] for k in keys]
        selected: tuple[Any, ...] = ()
        row = None
        if isinstance(self.statement, Select):
            selected = tuple(self.statement.selected_columns)
            row_type: Any = namedtuple("Row", [c.key for c in selected])  # type: ignore[misc]
            row = row_type._make
        return _Compiled(
            compiled=compiled,
            keys=keys,
            processors=tuple(b.type.dialect_impl(dialect).bind_processor(dialect) for b in binds),
            expanding=frozenset(k for k, b in zip(keys, binds, strict=True) if b.expanding),
            columns=selected,
            row=row,
        )


def _cursor(conn: Connection) -> Any:
    """A cursor of the connection's driver connection, in a transaction: begun here when none
    is, as SQLAlchemy's autobegin would (so the statements of one reader share a snapshot)."""
    if not conn.in_transaction():
        conn.begin()
    return conn.connection.cursor()


def _wrapped(conn: Connection, cursor: Any, exc: Any, sql: str, params: Any) -> StatementError:
    """The driver's error as SQLAlchemy raises it (``OperationalError``, ``IntegrityError``…),
    so callers tell a store that is down from a bad statement the same way for both paths; a
    lost connection is invalidated, so the pool does not hand it out again."""
    dialect = conn.dialect
    lost = dialect.is_disconnect(exc, conn.connection.dbapi_connection, cursor)
    if lost:
        conn.invalidate(exc)
    error: StatementError = DBAPIError.instance(
        sql,
        params,
        exc,
        dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=lost,
        dialect=dialect,
    )
    return error


def _arguments(plan: _Compiled, params: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """The SQL and the processed positional parameters for one parameter set."""
    if not plan.expanding:
        args = tuple(
            p(params[k]) if p is not None else params[k]
            for k, p in zip(plan.keys, plan.processors, strict=True)
        )
        return plan.compiled.string, args
    # An expanding parameter's values take its place, in order, as positional parameters.
    lengths = tuple(len(params[k]) for k in plan.keys if k in plan.expanding)
    sql = plan.expanded.get(lengths)
    if sql is None:
        sql = plan.compiled.construct_expanded_state(dict(params)).statement
        plan.expanded[lengths] = sql
    flat: list[Any] = []
    for k, p in zip(plan.keys, plan.processors, strict=True):
        value = params[k]
        if k in plan.expanding:
            flat.extend(value if p is None else map(p, value))
        else:
            flat.append(value if p is None else p(value))
    return sql, tuple(flat)
