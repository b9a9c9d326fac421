"""Engines, schema migration and the one managed-session helper.

SQLite gets WAL (readers never block the writer), a 30 s busy timeout, foreign
keys, and ``BEGIN IMMEDIATE`` for write transactions so two writers queue at
BEGIN instead of deadlocking on a read-to-write lock upgrade. Everything else is
plain SQLAlchemy, so a PostgreSQL URL works unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import SchemaError, SkillExists

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000
_WRITE = "skillbank_write"
MIGRATION_LOCK = 0x736B696C6C62616E  # "skillban": the PostgreSQL advisory lock key of migrations


def database_url(url_or_dir: str | os.PathLike[str]) -> str:
    """A SQLAlchemy URL; a directory (or a path without '://') means ``<dir>/catalog.db``."""
    text = os.fspath(url_or_dir)
    if "://" in text:
        return text
    path = Path(text)
    if path.suffix not in (".db", ".sqlite", ".sqlite3"):
        path.mkdir(parents=True, exist_ok=True)
        path = path / "catalog.db"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def _sqlite_setup(engine: Engine) -> None:
    """SQLAlchemy's documented pysqlite recipe: we emit BEGIN ourselves."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
        dbapi_connection.isolation_level = None  # stop pysqlite's own implicit BEGIN
        cur = dbapi_connection.cursor()
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")  # WAL keeps this crash-consistent
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def make_engine(url_or_dir: str | os.PathLike[str]) -> Engine:
    """An engine for a URL or a directory, with the SQLite pragmas when it is SQLite."""
    url = database_url(url_or_dir)
    engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    return engine


def alembic_config() -> Config:
    """An Alembic config built in code, pointing at the migrations inside the package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config()).get_current_head() or ""


def migrate(engine: Engine) -> str:
    """Bring the schema to head inside one write transaction; refuse a newer schema.

    The check and the upgrade share one transaction that holds the catalog's
    migration lock (``BEGIN IMMEDIATE`` on SQLite, a transaction-scoped advisory
    lock on PostgreSQL), so concurrent first opens serialise instead of racing
    to create tables; the loser then sees the schema at head and does nothing.
    """
    cfg = alembic_config()
    script = ScriptDirectory.from_config(cfg)
    with engine.execution_options(**{_WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and current not in {r.revision for r in script.walk_revisions()}:
            raise SchemaError(
                f"catalog schema {current} is newer than this skillbank "
                f"(which knows up to {script.get_current_head()}); upgrade skillbank"
            )
        if current != script.get_current_head():
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    return script.get_current_head() or ""


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def revisions(url_or_dir: str | os.PathLike[str]) -> tuple[str | None, str]:
    """(the catalog's schema revision, None when empty; the newest this code knows)."""
    engine = make_engine(url_or_dir)
    try:
        return schema_revision(engine), head_revision()
    finally:
        engine.dispose()


def upgrade(url_or_dir: str | os.PathLike[str]) -> tuple[str | None, str]:
    """Migrate the catalog at ``url_or_dir`` to head; (revision before, revision after)."""
    engine = make_engine(url_or_dir)
    try:
        return schema_revision(engine), migrate(engine)
    finally:
        engine.dispose()


def _is_unique_violation(err: IntegrityError) -> bool:
    text = str(err.orig).lower()
    return "unique" in text or "duplicate key" in text


@contextmanager
def session_scope(
    engine: Engine, *, write: bool = False, snapshot: bool = False
) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error, never leak rows.

    A unique-key violation means "that name/alias/version is already taken", so it
    becomes ``SkillExists``; other integrity errors keep their type. ``snapshot``
    makes every read of the session see one state of the catalog: SQLite
    transactions already do; PostgreSQL's default (READ COMMITTED) gives each
    statement its own, so such sessions run in REPEATABLE READ there.
    """
    if write:
        bind = engine.execution_options(**{_WRITE: True})
    elif snapshot and engine.dialect.name == "postgresql":
        bind = engine.execution_options(isolation_level="REPEATABLE READ")
    else:
        bind = engine
    session = Session(bind=bind, expire_on_commit=False, autoflush=True)
    try:
        yield session
        session.commit()
    except IntegrityError as err:
        session.rollback()
        if _is_unique_violation(err):
            raise SkillExists(f"already exists: {err.orig}") from err
        raise
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


__all__ = [
    "database_url",
    "head_revision",
    "make_engine",
    "migrate",
    "revisions",
    "schema_revision",
    "session_scope",
    "upgrade",
]
