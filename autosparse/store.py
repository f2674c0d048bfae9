"""The result store: every evaluation, kept in SQL through SQLAlchemy.

Any SQLAlchemy URL works, opened by ``autosparse.storage`` exactly as a study's is; the
default is a SQLite file under ``studies/``. Tables are prefixed ``autosparse_`` so the
store can share a database with an Optuna study (whose tables are ``studies``, ``trials``,
...). Reads return detached dataclass copies
(``StoredResult``), never live ORM objects: changing one changes nothing in the store.

An evaluation is identified by (model, task, method key, settings key). The keys are
SHA-256 hashes of the canonical JSON (sorted keys, no whitespace) of the method's identity
(``Method.to_dict()``) and of the settings dict, so ``find`` matches only identical
methods and settings.

The store also keeps the fidelity objective's dense references (``Reference``: one
greedy continuation per document and its top-k log-probabilities), identified by
(model, task, settings key, document id), so a resumed study, a second worker or a later
``eval`` never generates them again.

Schema version 1 holds both tables. Databases written before the references joined the
store's schema have no references table (or one an older autosparse created on first
use, with the same columns): opening them adds it, and they stay readable by either
version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import (
    IntegrityError,
    SQLAlchemyError,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from autosparse import storage
from autosparse.errors import StorageError, first_line
from autosparse.results import EvalResult, Reference

DEFAULT_URL = "sqlite:///studies/autosparse.db"
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------- keys


def _plain(obj: Any) -> Any:
    """JSON fallback for numpy scalars/arrays and tuples-in-disguise."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def canonical_json(obj: Any) -> str:
    """Sorted-key, whitespace-free JSON: equal values give equal strings."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_plain)


def _jsonable(obj: Any) -> Any:
    """Round-trip through JSON so stored and compared values have the same types."""
    return json.loads(canonical_json(obj))


def _method_identity(method: Any) -> dict[str, Any]:
    if hasattr(method, "to_dict") and not isinstance(method, Mapping):
        method = method.to_dict()
    if not isinstance(method, Mapping):
        raise TypeError(f"method must be a Method or a dict, got {type(method).__name__}")
    # "params" is descriptive metadata (w_sum, threshold, ...) that does not change the
    # computation (see Method): it must not split otherwise identical evaluations.
    return {k: v for k, v in method.items() if k != "params"}


def method_key(method: Any) -> str:
    """Hash of a method's identity: a ``Method`` or its ``to_dict()`` (a ``params`` entry,
    being descriptive only, is ignored)."""
    return hashlib.sha256(canonical_json(_method_identity(method)).encode()).hexdigest()


def settings_key(settings: Mapping[str, Any]) -> str:
    """Hash of an evaluation's settings (limit, seed, shots, batch size, metric, ...)."""
    return hashlib.sha256(canonical_json(dict(settings)).encode()).hexdigest()


# --------------------------------------------------------------------------- tables


class _Base(DeclarativeBase):
    pass


class _SchemaRow(_Base):
    __tablename__ = "autosparse_schema"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class _EvaluationRow(_Base):
    __tablename__ = "autosparse_evaluations"
    __table_args__ = (
        Index("ix_autosparse_evaluations_lookup", "model", "task", "method_key", "settings_key"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str] = mapped_column(String(512))
    task: Mapped[str] = mapped_column(String(256))
    method_name: Mapped[str] = mapped_column(String(32))
    method_key: Mapped[str] = mapped_column(String(64))
    method: Mapped[dict] = mapped_column(JSON)
    settings_key: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict] = mapped_column(JSON)
    metric: Mapped[str] = mapped_column(String(128))
    # NULL stands for a non-finite score: PostgreSQL's JSON rejects NaN.
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON)
    sample_ids: Mapped[list] = mapped_column(JSON)
    sample_scores: Mapped[list] = mapped_column(JSON)
    density: Mapped[float | None] = mapped_column(Float, nullable=True)
    layer_density: Mapped[list | None] = mapped_column(JSON, nullable=True)
    seconds: Mapped[float] = mapped_column(Float)
    versions: Mapped[dict] = mapped_column(JSON)


class _ReferenceRow(_Base):
    __tablename__ = "autosparse_fidelity_references"
    __table_args__ = (
        UniqueConstraint("model", "task", "settings_key", "doc_id", name="uq_autosparse_fidref"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model: Mapped[str] = mapped_column(String(512))
    task: Mapped[str] = mapped_column(String(256))
    settings_key: Mapped[str] = mapped_column(String(64))
    doc_id: Mapped[int] = mapped_column(Integer)
    prompt_sha: Mapped[str] = mapped_column(String(64))
    prompt_ids: Mapped[bytes] = mapped_column(LargeBinary)  # int32
    continuation: Mapped[bytes] = mapped_column(LargeBinary)  # int32
    top_k: Mapped[int] = mapped_column(Integer)
    top_ids: Mapped[bytes] = mapped_column(LargeBinary)  # (C, k) int32
    top_logprobs: Mapped[bytes] = mapped_column(LargeBinary)  # (C, k) float32
    dense_fidelity: Mapped[float] = mapped_column(Float)


# --------------------------------------------------------------------------- snapshots


@dataclass
class StoredResult(EvalResult):
    """An ``EvalResult`` read back from the store, with its row ``id`` and ``created``
    time (UTC). A detached copy: mutating it does not touch the store."""

    id: int = 0
    created: datetime | None = None

    def result(self) -> EvalResult:
        """The plain ``EvalResult`` (without id and created)."""
        names = [f.name for f in fields(EvalResult)]
        return EvalResult(**{n: getattr(self, n) for n in names})

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["created"] = self.created.isoformat() if self.created else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredResult:
        d = dict(d)
        if isinstance(d.get("created"), str):
            d["created"] = datetime.fromisoformat(d["created"])
        return cls(**d)


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _utc(ts: datetime) -> datetime:
    # SQLite drops the zone on the way back; values were written in UTC.
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts.astimezone(timezone.utc)


def _snapshot(row: _EvaluationRow) -> StoredResult:
    return StoredResult(
        model=row.model,
        task=row.task,
        method=dict(row.method),
        metric=row.metric,
        score=math.nan if row.score is None else float(row.score),
        metrics=dict(row.metrics or {}),
        sample_ids=list(row.sample_ids or []),
        sample_scores=[math.nan if x is None else float(x) for x in (row.sample_scores or [])],
        density=row.density,
        layer_density=None if row.layer_density is None else [float(x) for x in row.layer_density],
        seconds=float(row.seconds),
        settings=dict(row.settings or {}),
        versions=dict(row.versions or {}),
        id=row.id,
        created=_utc(row.created),
    )


def _ints(b: bytes) -> tuple[int, ...]:
    return tuple(int(x) for x in np.frombuffer(b, dtype=np.int32))


def _reference(row: _ReferenceRow) -> Reference:
    cont = _ints(row.continuation)
    shape = (len(cont), row.top_k)
    return Reference(
        doc_id=row.doc_id,
        prompt_sha=row.prompt_sha,
        prompt_ids=_ints(row.prompt_ids),
        continuation=cont,
        top_ids=np.frombuffer(row.top_ids, dtype=np.int32).reshape(shape).astype(np.int64),
        top_logprobs=np.frombuffer(row.top_logprobs, dtype=np.float32).reshape(shape).copy(),
        dense_fidelity=float(row.dense_fidelity),
    )


# --------------------------------------------------------------------------- store


class ResultStore:
    """Evaluations in the database at ``url`` (created, with its tables, on first use).

    Raises StorageError with a one-line message when the URL is invalid, its driver is
    missing, or the database cannot be reached. Usable as a context manager (closes the
    connection pool on exit)."""

    def __init__(self, url: str = DEFAULT_URL) -> None:
        self.url = str(url)
        location = storage.locate(self.url)
        self._shown = location.shown
        self._engine: Engine = storage.create_engine(location)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        storage.initialize(location, self._init_schema, on_failure=self._engine.dispose)
        storage.write_ahead_log(self._engine, location)

    def __repr__(self) -> str:
        return f"ResultStore({self._shown!r})"

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._engine.dispose()

    def _init_schema(self) -> None:
        _Base.metadata.create_all(self._engine)
        self._check_schema_row()

    def _check_schema_row(self) -> None:
        with self.session() as s:
            row = s.get(_SchemaRow, 1)
            if row is None:
                s.add(_SchemaRow(id=1, version=SCHEMA_VERSION))
            elif row.version != SCHEMA_VERSION:
                raise StorageError(
                    f"storage {self._shown} holds autosparse results of schema version "
                    f"{row.version}; this autosparse reads version {SCHEMA_VERSION}"
                )

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success, rolls back on any error, and always closes.
        Database errors come out as StorageError."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except SQLAlchemyError as exc:
            s.rollback()
            raise StorageError(f"storage {self._shown}: {first_line(exc)}") from exc
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    # ----------------------------------------------------------------- queries

    def save(self, result: EvalResult) -> int:
        """Store one evaluation; returns its id. Saving the same evaluation twice keeps
        both rows (``find`` returns the newer)."""
        if len(result.sample_ids) != len(result.sample_scores):
            raise StorageError(
                f"result has {len(result.sample_ids)} sample ids but "
                f"{len(result.sample_scores)} per-sample scores"
            )
        method = _jsonable(dict(result.method))
        settings = _jsonable(dict(result.settings))
        row = _EvaluationRow(
            created=datetime.now(timezone.utc),
            model=result.model,
            task=result.task,
            method_name=str(method.get("name", "")),
            method_key=method_key(method),
            method=method,
            settings_key=settings_key(settings),
            settings=settings,
            metric=result.metric,
            score=_finite_or_none(result.score),
            metrics={k: _finite_or_none(v) for k, v in _jsonable(result.metrics).items()},
            sample_ids=_jsonable(list(result.sample_ids)),
            sample_scores=[_finite_or_none(x) for x in _jsonable(list(result.sample_scores))],
            density=_finite_or_none(result.density),
            layer_density=None
            if result.layer_density is None
            else [float(x) for x in result.layer_density],
            seconds=float(result.seconds),
            versions={str(k): str(v) for k, v in result.versions.items()},
        )
        with self.session() as s:
            s.add(row)
            s.flush()
            return int(row.id)

    def find(
        self, model: str, task: str, method: Any, settings: Mapping[str, Any]
    ) -> StoredResult | None:
        """The latest evaluation of ``method`` (a Method or its ``to_dict()``) on ``model``
        and ``task`` with exactly these ``settings``, or None."""
        stmt = (
            select(_EvaluationRow)
            .where(
                _EvaluationRow.model == model,
                _EvaluationRow.task == task,
                _EvaluationRow.method_key == method_key(method),
                _EvaluationRow.settings_key == settings_key(settings),
            )
            .order_by(_EvaluationRow.created.desc(), _EvaluationRow.id.desc())
            .limit(1)
        )
        with self.session() as s:
            row = s.scalars(stmt).first()
            return None if row is None else _snapshot(row)

    def get(self, result_id: int) -> StoredResult | None:
        """The evaluation with this id, or None."""
        with self.session() as s:
            row = s.get(_EvaluationRow, int(result_id))
            return None if row is None else _snapshot(row)

    def list(self, model: str | None = None, task: str | None = None) -> list[StoredResult]:
        """Every stored evaluation (optionally of one model and/or task), oldest first."""
        stmt = select(_EvaluationRow).order_by(_EvaluationRow.created, _EvaluationRow.id)
        if model is not None:
            stmt = stmt.where(_EvaluationRow.model == model)
        if task is not None:
            stmt = stmt.where(_EvaluationRow.task == task)
        with self.session() as s:
            return [_snapshot(r) for r in s.scalars(stmt)]

    # ------------------------------------------------------------- references

    def save_references(
        self, model: str, task: str, settings_key: str, refs: Sequence[Reference]
    ) -> None:
        """Store dense references under (model, task, settings key), replacing a stored
        reference of the same document. A row another worker inserted meanwhile is left
        as it is."""
        for ref in refs:
            row = _ReferenceRow(
                created=datetime.now(timezone.utc),
                model=model,
                task=task,
                settings_key=settings_key,
                doc_id=int(ref.doc_id),
                prompt_sha=ref.prompt_sha,
                prompt_ids=np.asarray(ref.prompt_ids, dtype=np.int32).tobytes(),
                continuation=np.asarray(ref.continuation, dtype=np.int32).tobytes(),
                top_k=int(ref.top_ids.shape[1]),
                top_ids=np.ascontiguousarray(ref.top_ids, dtype=np.int32).tobytes(),
                top_logprobs=np.ascontiguousarray(ref.top_logprobs, dtype=np.float32).tobytes(),
                dense_fidelity=float(ref.dense_fidelity),
            )
            try:
                with self.session() as s:
                    old = s.scalars(
                        select(_ReferenceRow).where(
                            _ReferenceRow.model == model,
                            _ReferenceRow.task == task,
                            _ReferenceRow.settings_key == settings_key,
                            _ReferenceRow.doc_id == int(ref.doc_id),
                        )
                    ).first()
                    if old is not None:
                        s.delete(old)
                        s.flush()
                    s.add(row)
            except StorageError as exc:
                if not isinstance(exc.__cause__, IntegrityError):
                    raise

    def load_references(
        self, model: str, task: str, settings_key: str, ids: Iterable[int]
    ) -> dict[int, Reference]:
        """The stored references of documents ``ids`` under (model, task, settings key),
        by document id (documents without one are missing from the dict)."""
        stmt = select(_ReferenceRow).where(
            _ReferenceRow.model == model,
            _ReferenceRow.task == task,
            _ReferenceRow.settings_key == settings_key,
            _ReferenceRow.doc_id.in_([int(i) for i in ids]),
        )
        with self.session() as s:
            return {row.doc_id: _reference(row) for row in s.scalars(stmt)}
