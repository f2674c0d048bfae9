"""Opening storage (autosparse.storage): URL parsing, the SQLite file of a URL, one-line
errors for bad URLs, and the same engine behaviour for Optuna's study storage and the
result store (busy timeout, PostgreSQL driver and connect timeout, write-ahead log,
creation races)."""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from autosparse import storage
from autosparse.errors import StorageError
from autosparse.store import ResultStore
from autosparse.tuning import open_storage


def _open_study_storage(url: str):
    rdb = open_storage(url, heartbeat=None)
    return rdb, rdb.engine


def _open_result_store(url: str):
    store = ResultStore(url)
    return store, store._engine


#: the two users of autosparse.storage: (opened object, its SQLAlchemy engine)
OPENERS = {"optuna": _open_study_storage, "store": _open_result_store}


def _close(opened) -> None:
    if isinstance(opened, ResultStore):
        opened.close()
    else:
        opened.engine.dispose()


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///studies/s.db", Path("studies/s.db")),
        ("sqlite:////tmp/x/s.db", Path("/tmp/x/s.db")),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:s.db?mode=ro&uri=true", None),
        ("postgresql://u:p@host/db", None),
        ("mysql+pymysql://u@host/db", None),
    ],
)
def test_the_sqlite_file_of_a_url(url, expected):
    assert storage.sqlite_file(url) == expected


def test_a_location_keeps_the_url_and_hides_a_password():
    plain = storage.locate("sqlite:///studies/s.db")
    assert plain.backend == "sqlite" and not plain.in_memory
    assert plain.shown == "sqlite:///studies/s.db" and plain.text == "sqlite:///studies/s.db"
    assert storage.locate("sqlite://").in_memory
    secret = storage.locate("postgresql+psycopg2://user:secret@host:5432/db")
    assert secret.shown == "postgresql+psycopg2://user:***@host:5432/db"
    assert "secret" in secret.rendered()  # the driver still gets the password
    assert storage.locate(secret) is secret


def test_a_plain_postgresql_url_uses_an_installed_driver(monkeypatch):
    have = {"psycopg": False, "psycopg2": True}
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if have[name] else None) if name in have else real(name, *a),
    )
    assert storage.locate("postgresql://h/db").url.drivername == "postgresql+psycopg2"
    # A driver named in the URL is kept.
    assert storage.locate("postgresql+pg8000://h/db").url.drivername == "postgresql+pg8000"
    have["psycopg"] = True  # SQLAlchemy's own choice for postgresql:// is psycopg (v3)
    assert storage.locate("postgresql://h/db").url.drivername == "postgresql"


def test_engine_options_per_backend():
    sqlite = storage.locate("sqlite:///s.db").engine_kwargs()
    assert sqlite == {"connect_args": {"timeout": storage.BUSY_TIMEOUT}}
    memory = storage.locate("sqlite://").engine_kwargs()
    assert memory["connect_args"] == {"check_same_thread": False}
    assert memory["poolclass"].__name__ == "StaticPool"
    pg = storage.locate("postgresql+psycopg2://h/db").engine_kwargs()
    assert pg == {"connect_args": {"connect_timeout": storage.CONNECT_TIMEOUT}}
    # pg8000 knows no connect_timeout argument: it gets none.
    assert storage.locate("postgresql+pg8000://h/db").engine_kwargs() == {}
    assert storage.locate("mysql+pymysql://h/db").engine_kwargs() == {"pool_pre_ping": True}


# ------------------------------------------------------------------ bad URLs


BAD = [
    ("not a url", "cannot open storage 'not a url': not a database URL"),
    ("studies/s.db", "not a database URL (a SQLite file is written sqlite:///"),
    ("nosuchdialect://x/y", "cannot open storage nosuchdialect://x/y: "),
    (
        "postgresql+nosuchdriver://u:secret@h/db",
        "cannot open storage postgresql+nosuchdriver://u:***@h/db",
    ),
    (
        "postgresql://user:secret@127.0.0.1:1/db",
        "cannot open storage postgresql://user:***@127.0.0.1:1/db: ",
    ),
]


@pytest.mark.parametrize("opener", sorted(OPENERS))
@pytest.mark.parametrize(("url", "fragment"), BAD)
def test_a_bad_url_is_the_same_one_line_error_for_both_users(opener, url, fragment):
    with pytest.raises(StorageError) as info:
        OPENERS[opener](url)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message and "secret" not in message


def test_unknown_dialect_says_to_install_a_driver():
    with pytest.raises(StorageError, match="install the database driver"):
        storage.locate("nosuchdialect://x/y")


def test_a_bad_url_fails_before_anything_is_written(tmp_path):
    with pytest.raises(StorageError):
        storage.sqlite_file("not a url")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for opener in OPENERS.values():
        with pytest.raises(StorageError, match="cannot open storage"):
            opener(f"sqlite:///{blocker}/sub/s.db")


# ------------------------------------------------------------------ one behaviour


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_sqlite_files_get_a_folder_the_busy_timeout_and_the_write_ahead_log(opener, tmp_path):
    path = tmp_path / "new" / "dir" / "s.db"
    opened, engine = OPENERS[opener](f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            busy_ms = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
        assert busy_ms == storage.BUSY_TIMEOUT * 1000
    finally:
        _close(opened)
    with sqlite3.connect(path) as conn:  # a property of the file, seen by any connection
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_in_memory_sqlite_is_one_shared_database(opener):
    opened, engine = OPENERS[opener]("sqlite://")
    try:
        with engine.connect() as a, engine.connect() as b:
            a.exec_driver_sql("CREATE TABLE probe (x INTEGER)")
            assert b.exec_driver_sql("SELECT count(*) FROM probe").scalar() == 0
    finally:
        _close(opened)


def test_both_users_share_one_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    rdb, _ = _open_study_storage(url)
    store, _ = _open_result_store(url)
    again, _ = _open_study_storage(url)  # Optuna's tables next to the store's
    tables = {
        r[0]
        for r in sqlite3.connect(tmp_path / "s.db").execute(
            "SELECT name FROM sqlite_master WHERE type='table'"
        )
    }
    assert {"studies", "trials", "autosparse_evaluations"} <= tables
    for opened in (rdb, store, again):
        _close(opened)


@pytest.mark.parametrize("opener", sorted(OPENERS))
def test_postgresql_driver_and_connect_timeout_are_the_same(opener, postgres_database):
    opened, engine = OPENERS[opener](postgres_database)
    try:
        expected = storage.locate(postgres_database).url.get_driver_name()
        assert engine.dialect.driver == expected
        raw = engine.raw_connection()
        try:
            dsn = (
                raw.driver_connection.dsn
                if expected == "psycopg2"
                else raw.driver_connection.info.dsn
            )
        finally:
            raw.close()
        assert f"connect_timeout={storage.CONNECT_TIMEOUT}" in dsn
    finally:
        _close(opened)


# ------------------------------------------------------------------ creation races


def _failing(errors: list[BaseException]):
    calls = []

    def create():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return "created"

    return create, calls


def _db_error(cls, text: str):
    return cls("CREATE TABLE", {}, Exception(text))


def test_a_lost_creation_race_is_tried_again():
    create, calls = _failing(
        [
            _db_error(IntegrityError, "duplicate key value violates unique constraint"),
            _db_error(ProgrammingError, 'relation "trials" already exists'),
            _db_error(OperationalError, "database is locked"),
        ]
    )
    assert storage.initialize("sqlite://", create) == "created"
    assert len(calls) == 4


def test_other_database_errors_are_one_line_at_once():
    create, calls = _failing([_db_error(OperationalError, "unable to open database file\nmore")])
    closed = []
    with pytest.raises(StorageError) as info:
        storage.initialize("sqlite:///x.db", create, on_failure=lambda: closed.append(1))
    assert str(info.value) == "cannot open storage sqlite:///x.db: unable to open database file"
    assert len(calls) == 1 and closed == [1]


def test_a_race_that_never_ends_gives_up():
    races = [_db_error(IntegrityError, "duplicate") for _ in range(storage.CREATION_ATTEMPTS)]
    create, calls = _failing(races)
    with pytest.raises(StorageError, match="duplicate"):
        storage.initialize("sqlite://", create)
    assert len(calls) == storage.CREATION_ATTEMPTS


def test_a_storage_error_of_another_kind_passes_unchanged():
    mismatch = StorageError("storage x holds autosparse results of schema version 9")
    create, calls = _failing([mismatch])
    with pytest.raises(StorageError) as info:
        storage.initialize("sqlite://", create)
    assert info.value is mismatch and len(calls) == 1


def test_a_study_transaction_on_sqlite_holds_the_write_lock_from_its_start(tmp_path):
    """Two workers must not both read a queued trial as WAITING and both run it: every
    transaction of the Optuna storage on a SQLite file begins IMMEDIATE, so a read inside
    it already excludes another writer."""
    import sqlite3

    from autosparse.tuning import open_storage

    path = tmp_path / "s.db"
    rdb = open_storage(f"sqlite:///{path}", heartbeat=None)
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with rdb.engine.begin() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM trials").scalar()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")  # free again once the transaction ended
    other.execute("ROLLBACK")
    other.close()
