"""The registry's SQLite index: schema, migrations, and transactions that survive concurrent writers.

Why SQLite in WAL mode: readers never block the one writer and a killed process never leaves a half-written
row (a transaction is either in the WAL with its commit frame or ignored). Several processes register at once
(a Prefect flow trains adapters in parallel), so every write runs in ``BEGIN IMMEDIATE`` (the write lock is
taken up front, never upgraded mid-transaction, which is what produces un-retryable ``SQLITE_BUSY``), with a
busy timeout and an outer retry with jittered back-off: "database is locked" never reaches a user.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from lorakit.errors import LorakitError

T = TypeVar("T")

BUSY_TIMEOUT_MS = 10_000
RETRY_SECONDS = 120.0

# Each migration moves the schema from version i to i+1. Never edit a released entry: append a new one.
MIGRATIONS: list[str] = [
    # 1: artifacts, their files, lineage edges and aliases.
    """
    CREATE TABLE artifacts (
        id          INTEGER PRIMARY KEY,
        name        TEXT    NOT NULL,
        version     INTEGER NOT NULL CHECK (version >= 1),
        kind        TEXT    NOT NULL,
        digest      TEXT    NOT NULL,
        size        INTEGER NOT NULL,
        created_at  REAL    NOT NULL,
        source      TEXT,
        params      TEXT    NOT NULL DEFAULT '{}',
        metadata    TEXT    NOT NULL DEFAULT '{}',
        UNIQUE (name, version),
        UNIQUE (name, digest)
    );
    CREATE INDEX artifacts_digest ON artifacts (digest);
    CREATE TABLE files (
        artifact_id INTEGER NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
        path        TEXT    NOT NULL,
        blob        TEXT    NOT NULL,
        size        INTEGER NOT NULL,
        PRIMARY KEY (artifact_id, path)
    );
    CREATE INDEX files_blob ON files (blob);
    CREATE TABLE edges (
        child_id    INTEGER NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
        parent_id   INTEGER NOT NULL REFERENCES artifacts (id),
        params      TEXT    NOT NULL DEFAULT '{}',
        PRIMARY KEY (child_id, parent_id)
    );
    CREATE TABLE aliases (
        name        TEXT    NOT NULL,
        alias       TEXT    NOT NULL,
        artifact_id INTEGER NOT NULL REFERENCES artifacts (id),
        PRIMARY KEY (name, alias)
    );
    """,
    # 2: metrics, tags, gate verdicts and the alias history that makes promotions auditable.
    """
    CREATE TABLE metrics (
        artifact_id INTEGER NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
        key         TEXT    NOT NULL,
        value       REAL    NOT NULL,
        PRIMARY KEY (artifact_id, key)
    );
    CREATE TABLE tags (
        artifact_id INTEGER NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
        tag         TEXT    NOT NULL,
        PRIMARY KEY (artifact_id, tag)
    );
    CREATE TABLE verdicts (
        id          INTEGER PRIMARY KEY,
        artifact_id INTEGER NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
        passed      INTEGER NOT NULL CHECK (passed IN (0, 1)),
        source_id   INTEGER REFERENCES artifacts (id),
        details     TEXT    NOT NULL DEFAULT '{}',
        at          REAL    NOT NULL
    );
    CREATE TABLE alias_history (
        id          INTEGER PRIMARY KEY,
        name        TEXT    NOT NULL,
        alias       TEXT    NOT NULL,
        artifact_id INTEGER NOT NULL REFERENCES artifacts (id),
        previous_id INTEGER REFERENCES artifacts (id),
        at          REAL    NOT NULL,
        actor       TEXT    NOT NULL,
        forced      INTEGER NOT NULL DEFAULT 0,
        reason      TEXT
    );
    CREATE INDEX alias_history_name ON alias_history (name, alias);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def with_retry(fn: Callable[[], T], *, deadline_s: float = RETRY_SECONDS) -> T:
    """Run ``fn`` again after "database is locked/busy" with jittered exponential back-off, up to a deadline."""
    start = time.monotonic()
    delay = 0.01
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            if time.monotonic() - start > deadline_s:
                raise LorakitError(
                    f"the registry index stayed locked by other processes for {deadline_s:.0f} s; "
                    "check for a hung lorakit process and try again",
                    exit_code=1,
                ) from None
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)


def connect(db_path: Path) -> sqlite3.Connection:
    """Open the index (creating and migrating it when needed) with WAL, foreign keys and a busy timeout."""
    conn = sqlite3.connect(db_path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    with_retry(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
    # FULL: a committed registration survives power loss too, not only a crashed process.
    conn.execute("PRAGMA synchronous = FULL")
    with_retry(lambda: _migrate(conn, db_path))
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'").fetchone()
    if row is None:
        return 0
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def _migrate(conn: sqlite3.Connection, db_path: Path, target: int = SCHEMA_VERSION) -> None:
    if schema_version(conn) == target:  # the common case: no write lock needed
        return
    with transaction(conn):
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise LorakitError(
                f"registry index {db_path} has schema version {current}, newer than this lorakit understands "
                f"({SCHEMA_VERSION}); upgrade lorakit to use it",
                exit_code=2,
            )
        if current == 0:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at REAL NOT NULL)")
        for version in range(current + 1, target + 1):
            for statement in MIGRATIONS[version - 1].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error. Callers wrap it in :func:`with_retry`."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
