"""Opening a storage URL: the one place that turns a study or result-store URL into a
database connection, so that Optuna's study storage and the result store behave alike.

A storage URL is a SQLAlchemy URL (``sqlite:///studies/x.db``, ``postgresql://user@host/db``,
...); a bare file path is not one. Every engine built from a URL gets the same options:

- SQLite waits up to ``BUSY_TIMEOUT`` seconds for another worker's write lock instead of
  failing, keeps a file database in write-ahead-log mode, and gets the file's folder created;
  an in-memory database is one connection shared by every session and thread.
- ``postgresql://`` without a driver uses psycopg (v3) when it is installed, else psycopg2;
  psycopg and psycopg2 connections give up after ``CONNECT_TIMEOUT`` seconds.
- Workers opening a new database together race to create its tables; the loser's error is
  recognised (``lost_creation_race``) and creation is tried again (``initialize``).

Every failure comes out as one ``StorageError`` line naming the URL (password hidden).
"""

from __future__ import annotations

import importlib.util
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from autosparse.errors import StorageError, first_line

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine

#: seconds a SQLite connection waits for another connection's lock before failing
BUSY_TIMEOUT = 60
#: seconds to reach a database server before failing
CONNECT_TIMEOUT = 10
#: attempts at creating the tables when other workers create them at the same moment
CREATION_ATTEMPTS = 5

T = TypeVar("T")


@dataclass(frozen=True)
class Location:
    """A parsed, validated storage URL. ``url`` has its driver resolved; ``shown`` is the
    URL for messages: as the user wrote it, unless it holds a password."""

    text: str
    url: URL
    shown: str

    @property
    def backend(self) -> str:
        return self.url.get_backend_name()

    @property
    def in_memory(self) -> bool:
        return self.backend == "sqlite" and self.url.database in (None, "", ":memory:")

    @property
    def sqlite_file(self) -> Path | None:
        """The database file of a SQLite URL; None for other databases, in-memory ones and
        SQLite ``file:`` URIs (whose path SQLite itself interprets)."""
        if self.backend != "sqlite" or self.in_memory:
            return None
        database = str(self.url.database)
        if database.startswith("file:"):
            return None
        return Path(database)

    def rendered(self) -> str:
        """The URL with its driver resolved and its password, for a driver to connect with."""
        return self.url.render_as_string(hide_password=False)

    def engine_kwargs(self) -> dict[str, Any]:
        """``create_engine`` options: the same for Optuna's storage and the result store."""
        if self.backend == "sqlite":
            if self.in_memory:
                from sqlalchemy.pool import StaticPool

                # One shared connection, or every session would see its own empty database.
                return {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
            # Several workers write one file: wait for the lock instead of failing.
            return {"connect_args": {"timeout": BUSY_TIMEOUT}}
        if self.backend == "postgresql" and self.url.get_driver_name() in ("psycopg", "psycopg2"):
            return {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
        if self.backend == "mysql":
            # A trial can outlast the server's idle timeout on pooled connections.
            return {"pool_pre_ping": True}
        return {}

    def error(self, exc: BaseException, hint: str = "") -> StorageError:
        """A one-line StorageError about this URL, caused by ``exc``."""
        error = StorageError(f"cannot open storage {self.shown}: {first_line(exc)}{hint}")
        error.__cause__ = exc
        return error


def postgres_driver(url: URL) -> URL:
    """``postgresql://`` names psycopg (v3) to SQLAlchemy; with only psycopg2 installed, use
    that, so a plain URL works with either driver. A URL naming its driver is kept."""
    if url.drivername != "postgresql":
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return url.set(drivername="postgresql+psycopg2")
    return url


_DRIVER_HINT = " (install the database driver, or name an installed one in the URL)"


def locate(url: str | Location) -> Location:
    """Parse and check a storage URL (its dialect must be known to SQLAlchemy); StorageError
    in one line when it is not a database URL."""
    if isinstance(url, Location):
        return url
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    text = str(url)
    try:
        parsed = make_url(text)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise StorageError(
            f"cannot open storage {text!r}: not a database URL "
            "(a SQLite file is written sqlite:///path/to/file.db)"
        ) from exc
    shown = parsed.render_as_string(hide_password=True) if parsed.password else text
    if parsed.get_backend_name() == "postgresql":
        parsed = postgres_driver(parsed)
    location = Location(text, parsed, shown)
    try:
        parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise location.error(exc, _DRIVER_HINT) from exc
    return location


def sqlite_file(url: str | Location) -> Path | None:
    """The database file a SQLite URL names (None for other databases or in-memory ones);
    StorageError for a URL that is not one."""
    return locate(url).sqlite_file


def prepare(url: str | Location) -> Location:
    """Check ``url`` and create the folder of its SQLite file, if any."""
    location = locate(url)
    path = location.sqlite_file
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot open storage {location.shown}: {exc.strerror or exc}"
            ) from exc
    return location


def create_engine(url: str | Location) -> Engine:
    """A SQLAlchemy engine for ``url`` with the module's options (the folder of a SQLite
    file is created; ``write_ahead_log`` once its tables exist). StorageError when the URL
    is bad or its driver is missing."""
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError

    location = prepare(url)
    try:
        engine = sqlalchemy.create_engine(location.url, **location.engine_kwargs())
    except ImportError as exc:
        raise location.error(exc, _DRIVER_HINT) from exc
    except ArgumentError as exc:
        raise location.error(exc) from exc
    return engine


def write_ahead_log(engine: Engine, url: str | Location) -> None:
    """Put a SQLite database file in write-ahead-log mode (a property of the file): a commit
    then syncs one log append instead of a rollback journal and the database, and workers on
    the same machine read while another writes. Durability is unchanged (synchronous stays
    FULL). The file must be on a local disk, not a network share."""
    from sqlalchemy.exc import OperationalError

    location = locate(url)
    if location.backend != "sqlite" or location.in_memory:
        return
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    except OperationalError:  # another worker holds a lock: it sets the same mode
        pass


def immediate_transactions(engine: Engine, url: str | Location) -> None:
    """Make every transaction on a SQLite file take the write lock when it begins
    (``BEGIN IMMEDIATE``), so that a read and the write that depends on it are one atomic
    step across workers. Python's sqlite3 begins a transaction only at the first write, so
    without this two workers can both read a queued trial as WAITING and both run it
    (the second then fails with "Cannot tell a COMPLETE trial"). Readers wait on the busy
    timeout instead; Optuna's transactions are short. Pooled connections are dropped so
    that every later connection gets the rule."""
    from sqlalchemy import event

    location = locate(url)
    if location.backend != "sqlite" or location.in_memory:
        return

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the driver's own BEGIN, off

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()


def lost_creation_race(exc: BaseException) -> bool:
    """Whether ``exc`` is what a worker sees when another one created the same tables or
    rows a moment before: a duplicate key, "already exists", or SQLite's immediate "database
    is locked" (a read transaction that cannot become a write one). Trying again succeeds."""
    from sqlalchemy.exc import IntegrityError, SQLAlchemyError

    if isinstance(exc, IntegrityError):
        return True
    text = str(exc).lower()
    return isinstance(exc, SQLAlchemyError) and any(
        marker in text for marker in ("already exists", "duplicate", "database is locked")
    )


def initialize(
    url: str | Location,
    create: Callable[[], T],
    *,
    on_failure: Callable[[], None] | None = None,
) -> T:
    """Run ``create`` (which creates tables and first rows) and return its result, trying
    again when it lost a creation race to another worker. Database errors, and a
    StorageError caused by one, come out as one StorageError line; other StorageErrors (a
    schema mismatch, say) pass unchanged. ``on_failure`` runs before any error is raised."""
    from sqlalchemy.exc import SQLAlchemyError

    location = locate(url)
    error: BaseException | None = None
    for attempt in range(CREATION_ATTEMPTS):
        try:
            return create()
        except StorageError as exc:
            if not isinstance(exc.__cause__, SQLAlchemyError):
                if on_failure is not None:
                    on_failure()
                raise
            error = exc.__cause__
        except ImportError as exc:  # a driver imported when the engine is built
            if on_failure is not None:
                on_failure()
            # (Optuna re-raises the driver's ImportError under a generic message)
            inner = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
            raise location.error(inner, _DRIVER_HINT) from exc
        except (SQLAlchemyError, OSError) as exc:
            error = exc
        if attempt + 1 < CREATION_ATTEMPTS and lost_creation_race(error):
            # Jittered, so that workers who collided once do not collide again.
            time.sleep(random.uniform(0.05, 0.15) * (attempt + 1))
            continue
        break
    if on_failure is not None:
        on_failure()
    assert error is not None
    raise location.error(error) from error
