"""The result store. Contract tests run on SQLite and, when the PostgreSQL server
binaries are installed, on the throwaway PostgreSQL server of tests/conftest.py; bad URLs
give one-line StorageErrors."""

from __future__ import annotations

import math
import sqlite3
from datetime import timezone

import numpy as np
import pytest
from sqlalchemy import func, select

from autosparse.errors import StorageError
from autosparse.methods import Method
from autosparse.results import EvalResult, Reference
from autosparse.store import (
    SCHEMA_VERSION,
    ResultStore,
    StoredResult,
    _ReferenceRow,
    method_key,
    settings_key,
)

SETTINGS = {"limit": 50, "seed": 42, "shots": 6, "batch_size": 1, "metric": "bleu_max"}


def _result(method: Method, score: float = 6.627, settings=None, **kw) -> EvalResult:
    base = dict(
        model="smollm2-135m",
        task="truthfulqa-local",
        method=method.to_dict(),
        metric="bleu_max",
        score=score,
        metrics={"bleu_max": score, "bleu_acc": 0.4},
        sample_ids=[3, 17, 41],
        sample_scores=[5.0, 7.5, 7.381],
        density=0.391 if method.name != "dense" else None,
        layer_density=[0.38, 0.4] if method.name != "dense" else None,
        seconds=12.5,
        settings=dict(SETTINGS if settings is None else settings),
        versions={"torch": "2.5.1", "transformers": "4.56.0", "lm_eval": "0.4.8"},
    )
    base.update(kw)
    return EvalResult(**base)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/sub/dir/results.db"
        return
    pg = request.getfixturevalue("postgres_url")
    yield pg
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from autosparse.storage import postgres_driver
    from autosparse.store import _Base

    engine = create_engine(postgres_driver(make_url(pg)))
    _Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def store(url):
    with ResultStore(url) as s:
        yield s


def test_sqlite_creates_parent_directory_and_prefixed_tables(tmp_path):
    ResultStore(f"sqlite:///{tmp_path}/sub/dir/results.db").close()
    path = tmp_path / "sub" / "dir" / "results.db"
    assert path.exists()
    tables = {
        r[0]
        for r in sqlite3.connect(path).execute("select name from sqlite_master where type='table'")
    }
    assert tables and all(t.startswith("autosparse_") for t in tables)


def test_round_trip(store):
    r = _result(Method.coreinfer(0.4))
    rid = store.save(r)
    assert isinstance(rid, int)
    got = store.get(rid)
    assert isinstance(got, StoredResult)
    assert got.id == rid
    assert got.created is not None and got.created.tzinfo == timezone.utc
    assert got.result() == r
    # A snapshot, not a live object: changing it changes nothing stored.
    got.sample_scores.append(99.0)
    got.score = -1.0
    assert store.get(rid).result() == r


def test_round_trip_levels_and_dense(store):
    lv = _result(Method.levels([0.3, 0.5, 0.41]), score=6.446)
    dn = _result(Method.dense(), score=20.0)
    assert store.get(store.save(lv)).result() == lv
    assert store.get(store.save(dn)).result() == dn


def test_non_finite_values_survive_as_nan(store):
    r = _result(Method.coreinfer(0.4), score=float("nan"), sample_scores=[1.0, float("nan"), 2.0])
    got = store.get(store.save(r))
    assert math.isnan(got.score)
    assert math.isnan(got.sample_scores[1]) and got.sample_scores[0] == 1.0


def test_mismatched_ids_and_scores_refused(store):
    with pytest.raises(StorageError, match="sample ids"):
        store.save(_result(Method.dense(), sample_scores=[1.0]))


def test_find_matches_only_identical_method_and_settings(store):
    core = Method.coreinfer(0.4)
    store.save(_result(core, score=1.0))
    newer = store.save(_result(core, score=2.0))
    store.save(_result(Method.coreinfer(0.5), score=3.0))
    store.save(_result(core, settings={**SETTINGS, "limit": 100}, score=4.0))
    store.save(_result(core, model="other", score=5.0))

    got = store.find("smollm2-135m", "truthfulqa-local", core, SETTINGS)
    assert got is not None and got.id == newer and got.score == 2.0
    # A Method or its dict; key order of the settings does not matter.
    same = store.find(
        "smollm2-135m", "truthfulqa-local", core.to_dict(), dict(reversed(SETTINGS.items()))
    )
    assert same.id == newer

    assert store.find("smollm2-135m", "truthfulqa-local", Method.coreinfer(0.3), SETTINGS) is None
    assert (
        store.find("smollm2-135m", "truthfulqa-local", Method.coreinfer(0.4, 0.3), SETTINGS) is None
    )
    assert store.find("smollm2-135m", "truthfulqa-local", core, {**SETTINGS, "seed": 0}) is None
    assert store.find("smollm2-135m", "truthfulqa-local", core, {**SETTINGS, "extra": 1}) is None
    assert store.find("smollm2-135m", "wmt16", core, SETTINGS) is None
    assert store.find("other", "truthfulqa-local", core, SETTINGS).score == 5.0


def test_descriptive_params_do_not_change_identity():
    a = Method.levels([0.4, 0.4], params={"w_sum": 0.45})
    b = Method.levels([0.4, 0.4], params={"w_sum": 0.5})
    assert method_key(a) == method_key(b) == method_key({**a.to_dict(), "params": {"x": 1}})
    assert method_key(a) != method_key(Method.levels([0.4, 0.41]))
    assert settings_key({"a": 1, "b": 2}) == settings_key({"b": 2, "a": 1})


def test_list_filters_and_orders(store):
    ids = [
        store.save(_result(Method.dense())),
        store.save(_result(Method.coreinfer(0.4), task="wmt16")),
        store.save(_result(Method.coreinfer(0.4), model="other")),
    ]
    rows = store.list()
    assert [r.id for r in rows] == ids
    assert all(r.created is not None for r in rows)
    assert [r.id for r in store.list(task="wmt16")] == [ids[1]]
    assert [r.id for r in store.list(model="other")] == [ids[2]]
    assert [r.id for r in store.list(model="smollm2-135m", task="truthfulqa-local")] == [ids[0]]
    assert store.list(model="nobody") == []


def test_persists_across_instances(url):
    with ResultStore(url) as a:
        rid = a.save(_result(Method.dense()))
    with ResultStore(url) as b:
        assert b.get(rid).model == "smollm2-135m"


def test_in_memory_store():
    with ResultStore("sqlite://") as s:
        rid = s.save(_result(Method.dense()))
        assert s.get(rid) is not None


def test_session_rolls_back_on_error(store):
    from autosparse.store import _EvaluationRow

    with pytest.raises(RuntimeError):
        with store.session() as s:
            s.add(_EvaluationRow(model="m", task="t"))  # incomplete, but never flushed
            raise RuntimeError("boom")
    assert store.list() == []
    # A database error inside the scope is rolled back and reported as StorageError.
    with pytest.raises(StorageError):
        with store.session() as s:
            s.add(_EvaluationRow(model="m", task="t"))
            s.flush()
    assert store.list() == []
    store.save(_result(Method.dense()))
    assert len(store.list()) == 1


def test_two_stores_on_one_database(url):
    with ResultStore(url) as a, ResultStore(url) as b:
        rid = a.save(_result(Method.coreinfer(0.4)))
        assert b.find("smollm2-135m", "truthfulqa-local", Method.coreinfer(0.4), SETTINGS).id == rid


def test_shares_a_database_with_optuna(tmp_path):
    optuna = pytest.importorskip("optuna")
    url = f"sqlite:///{tmp_path}/study.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=url, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with ResultStore(url) as s:
        rid = s.save(_result(Method.dense()))
        assert s.get(rid) is not None
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 2


@pytest.mark.parametrize(
    "url, fragment",
    [
        ("not a url", "not a database URL"),
        ("nosuchdialect://x/y", "cannot open storage"),
        (
            "postgresql://user:secret@127.0.0.1:1/db",
            "cannot open storage postgresql://user:***@127.0.0.1:1/db",
        ),
    ],
)
def test_bad_url_is_a_one_line_storage_error(url, fragment):
    with pytest.raises(StorageError) as info:
        ResultStore(url)
    msg = str(info.value)
    assert fragment in msg
    assert "\n" not in msg
    assert "secret" not in msg


def test_unwritable_sqlite_location(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot open storage"):
        ResultStore(f"sqlite:///{blocker}/sub/r.db")


def test_not_a_database_file(tmp_path):
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError) as info:
        ResultStore(f"sqlite:///{bad}")
    assert "\n" not in str(info.value)


def _reference(doc_id: int, length: int = 3, k: int = 4, shift: float = 0.0) -> Reference:
    rng = np.random.default_rng(doc_id)
    return Reference(
        doc_id=doc_id,
        prompt_sha=f"sha-{doc_id}",
        prompt_ids=tuple(range(doc_id, doc_id + 5)),
        continuation=tuple(range(100, 100 + length)),
        top_ids=rng.integers(0, 300, size=(length, k)).astype(np.int64),
        top_logprobs=(rng.normal(size=(length, k)) - 3.0 + shift).astype(np.float32),
        dense_fidelity=-1.25 + shift,
    )


def _same_reference(a: Reference, b: Reference) -> bool:
    return (
        (a.doc_id, a.prompt_sha, a.prompt_ids, a.continuation, a.dense_fidelity)
        == (b.doc_id, b.prompt_sha, b.prompt_ids, b.continuation, b.dense_fidelity)
        and a.top_ids.dtype == b.top_ids.dtype == np.int64
        and a.top_logprobs.dtype == b.top_logprobs.dtype == np.float32
        and np.array_equal(a.top_ids, b.top_ids)
        and np.array_equal(a.top_logprobs, b.top_logprobs)
    )


def test_references_round_trip(store):
    refs = [_reference(0), _reference(5, length=1), _reference(9, length=7, k=2)]
    store.save_references("m", "t", "key", refs)
    got = store.load_references("m", "t", "key", [0, 5, 9, 42])
    assert sorted(got) == [0, 5, 9]  # document 42 has none
    assert all(_same_reference(got[r.doc_id], r) for r in refs)
    assert store.load_references("m", "t", "other key", [0, 5, 9]) == {}
    assert store.load_references("other model", "t", "key", [0]) == {}
    assert store.load_references("m", "t", "key", []) == {}
    # a document's reference is replaced, not duplicated
    newer = _reference(5, length=2, shift=0.5)
    store.save_references("m", "t", "key", [newer])
    assert _same_reference(store.load_references("m", "t", "key", [5])[5], newer)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(_ReferenceRow)) == 3


def test_references_are_shared_between_stores(url):
    with ResultStore(url) as a, ResultStore(url) as b:
        a.save_references("m", "t", "key", [_reference(3)])
        assert _same_reference(b.load_references("m", "t", "key", [3])[3], _reference(3))
    with ResultStore(url) as c:
        assert sorted(c.load_references("m", "t", "key", [3, 4])) == [3]


def test_a_database_without_the_references_table_gains_it(tmp_path):
    # databases written before the references joined the store's schema
    path = tmp_path / "old.db"
    with ResultStore(f"sqlite:///{path}") as s:
        rid = s.save(_result(Method.dense()))
    db = sqlite3.connect(path)
    db.execute("drop table autosparse_fidelity_references")
    db.commit()
    with ResultStore(f"sqlite:///{path}") as s:
        assert s.get(rid).model == "smollm2-135m"
        s.save_references("m", "t", "key", [_reference(1)])
        assert _same_reference(s.load_references("m", "t", "key", [1])[1], _reference(1))
    assert db.execute("select version from autosparse_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_another_schema_version_is_refused_in_one_line(tmp_path):
    path = tmp_path / "future.db"
    ResultStore(f"sqlite:///{path}").close()
    db = sqlite3.connect(path)
    db.execute("update autosparse_schema set version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    with pytest.raises(StorageError, match=f"schema version {SCHEMA_VERSION + 1}") as info:
        ResultStore(f"sqlite:///{path}")
    assert "\n" not in str(info.value)


def _open_and_save(url: str, barrier, i: int, out) -> None:
    try:
        barrier.wait(timeout=30)
        with ResultStore(url) as s:
            s.save(_result(Method.coreinfer(0.4), score=float(i)))
        out.put(None)
    except BaseException as exc:  # reported to the parent, which fails the test
        out.put(f"{type(exc).__name__}: {exc}")


def test_workers_starting_together_on_a_new_database(url):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_and_save, args=(url, barrier, i, out)) for i in range(n)]
    for p in procs:
        p.start()
    errors = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert errors == [None] * n
    with ResultStore(url) as s:
        assert sorted(r.score for r in s.list()) == [0.0, 1.0, 2.0, 3.0]


def test_the_selector_is_part_of_a_method_identity_but_not_the_default_one():
    import hashlib
    import json

    # the identity CoreInfer methods had before selectors existed: stored keys still match
    old = {"name": "coreinfer", "keep": 0.4, "token_ratio": 0.2, "layers": None, "mode": "masked"}
    old_key = hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":")).encode())
    assert Method.coreinfer(0.4).to_dict() == old
    assert method_key(Method.coreinfer(0.4)) == old_key.hexdigest()
    assert "selector" not in Method.levels([0.4, 0.5]).to_dict()

    griffin = Method.coreinfer(0.4, selector="griffin")
    assert griffin.to_dict()["selector"] == "griffin"
    assert method_key(griffin) != method_key(Method.coreinfer(0.4))
    levels = Method.levels([0.4, 0.5], selector="griffin")
    assert method_key(levels) != method_key(Method.levels([0.4, 0.5]))
    # GRIFFIN has no token ratio: it is not part of its identity
    assert method_key(griffin) == method_key(Method.coreinfer(0.4, 0.7, selector="griffin"))
    assert griffin.label() == "GRIFFIN keep=0.4"
    assert "GRIFFIN" in levels.label()


def test_a_griffin_result_is_found_only_as_griffin(store):
    griffin = Method.coreinfer(0.4, selector="griffin")
    store.save(_result(Method.coreinfer(0.4), score=1.0))
    store.save(_result(griffin, score=2.0))
    assert store.find("smollm2-135m", "truthfulqa-local", griffin, SETTINGS).score == 2.0
    core = store.find("smollm2-135m", "truthfulqa-local", Method.coreinfer(0.4), SETTINGS)
    assert core.score == 1.0


@pytest.mark.parametrize(
    "kw, message",
    [({"name": "dense", "selector": "griffin"}, "no selector"), ({"selector": "x"}, "unknown")],
)
def test_bad_selectors_are_refused(kw, message):
    from autosparse.errors import ConfigError

    kw = {"name": "coreinfer", "keep": 0.4, **kw}
    with pytest.raises(ConfigError, match=message):
        Method(**kw)
