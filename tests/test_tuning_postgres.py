"""Several workers on one study: two processes on the throwaway PostgreSQL server of
tests/conftest.py lose and duplicate no trial, and a worker killed mid-trial leaves a
RUNNING trial that the heartbeat marks stale and retries with the same parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy import DateTime, func, select, text
from test_tuning import FakeEvaluator, FakeLevels

from autosparse.tuning import StudySpec, Tuner, create_or_resume, open_storage

TESTS = str(Path(__file__).parent)
SCREEN = list(range(100, 116))
HEARTBEAT = 1  # seconds; open_storage gives a grace period of 3 heartbeats
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


class SlowEvaluator(FakeEvaluator):
    """The fake evaluator, sleeping ``delay`` seconds per call: workers' trials overlap, and
    a long delay keeps a trial running until the worker is killed."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay

    def run(self, method, ids):
        time.sleep(self.delay)
        return super().run(method, ids)


def make_tuner_at(
    url: str, *, heartbeat: int | None = None, delay: float = 0.0, name: str = "s"
) -> Tuner:
    """test_tuning's make_tuner on any storage URL (same spec, screen and stand-ins)."""
    spec = StudySpec(model="fake", model_id="fake-id", task="fake", goal=0.4, screen=16)
    study = create_or_resume(open_storage(url, heartbeat=heartbeat), name, spec)
    evaluator = SlowEvaluator(delay) if delay else FakeEvaluator()
    tuner = Tuner(study, spec, evaluator, FakeLevels())
    tuner.prepare(SCREEN)
    return tuner


# Waits until every worker has imported everything, so that they start together.
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_tuning_postgres import make_tuner_at
    ready = Path({ready!r})
    (ready / str({index})).touch()
    while len(list(ready.iterdir())) < {workers}:
        time.sleep(0.01)
    tuner = make_tuner_at({url!r}, heartbeat={heartbeat!r}, delay={delay!r})
    print(tuner.run(trials={trials}), flush=True)
    """
)


def start_worker(
    url: str,
    ready: Path,
    *,
    index: int = 0,
    workers: int = 1,
    trials: int,
    heartbeat: int | None = None,
    delay: float = 0.0,
) -> subprocess.Popen:
    code = WORKER.format(
        tests=TESTS,
        ready=str(ready),
        index=index,
        workers=workers,
        url=url,
        heartbeat=heartbeat,
        delay=delay,
        trials=trials,
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return out


def _run_two_workers(url: str, tmp_path: Path, target: int) -> list[int]:
    """Start two workers together on the study ``s`` at ``url``; trials each one ran."""
    ready = tmp_path / "ready"
    ready.mkdir()
    procs = [
        start_worker(url, ready, index=i, workers=2, trials=target, delay=0.01) for i in range(2)
    ]
    try:
        return [int(finish(p)) for p in procs]
    finally:
        for p in procs:  # a worker left running when the other failed
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_two_processes_share_one_postgres_study(postgres_database, tmp_path):
    url, target = postgres_database, 12
    # Both workers start on an empty database: they race to create Optuna's tables and
    # the study, which open_storage and create_or_resume must absorb.
    ran = _run_two_workers(url, tmp_path, target)
    assert all(n > 0 for n in ran), f"one worker ran every trial: {ran}"

    study = optuna.load_study(study_name="s", storage=open_storage(url, heartbeat=None))
    trials = study.trials
    numbers = [t.number for t in trials]
    # Nothing lost: every trial finished, numbers contiguous, the target reached.
    assert sorted(numbers) == list(range(len(trials)))
    assert all(t.state in DONE for t in trials), [t.state.name for t in trials]
    assert target <= len(trials) <= target + 1  # both workers may start the last trial
    assert sum(ran) == len(trials)
    for t in trials:
        assert t.user_attrs["params"]["w_sum"] == t.params["w_sum"]
        assert t.user_attrs["levels"] and t.user_attrs["sample_ids"]
    # Nothing duplicated: one row per trial number, and per trial one row per parameter.
    with open_storage(url, heartbeat=None).engine.connect() as conn:
        twice = conn.execute(
            text("SELECT number FROM trials GROUP BY study_id, number HAVING count(*) > 1")
        ).all()
        params_twice = conn.execute(
            text(
                "SELECT trial_id, param_name FROM trial_params "
                "GROUP BY trial_id, param_name HAVING count(*) > 1"
            )
        ).all()
        rows = conn.execute(text("SELECT count(*) FROM trials")).scalar_one()
    assert twice == [] and params_twice == []
    assert rows == len(trials)


def _wait_for_running_trial(url: str, proc: subprocess.Popen, timeout: float = 30):
    """The trial ``proc`` is running, once it is inside the evaluator and has recorded a
    heartbeat (Optuna never calls a trial without one stale)."""
    storage = open_storage(url, heartbeat=None)
    heartbeat = text(
        "SELECT 1 FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id "
        "WHERE t.number = :number"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        study = optuna.load_study(study_name="s", storage=storage)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running and "levels" in running[0].user_attrs:
            with storage.engine.connect() as conn:
                if conn.execute(heartbeat, {"number": running[0].number}).first():
                    return running[0]
        time.sleep(0.05)
    pytest.fail("the worker never started a trial")


@pytest.fixture(params=["sqlite", "postgresql"])
def study_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    return request.getfixturevalue("postgres_database")


def _kill_a_worker_mid_trial(url: str, tmp_path: Path, target: int, *, stale: bool = True):
    """A worker killed inside the evaluator in the study's first trial; that trial's
    snapshot. Returns once the heartbeat's grace period has passed, or at once."""
    make_tuner_at(url, heartbeat=HEARTBEAT)  # the study and its baselines
    ready = tmp_path / "ready"
    ready.mkdir()
    doomed = start_worker(url, ready, trials=target, heartbeat=HEARTBEAT, delay=600)
    try:
        victim = _wait_for_running_trial(url, doomed)
    finally:
        os.kill(doomed.pid, signal.SIGKILL)
        doomed.communicate(timeout=30)
    assert doomed.returncode == -signal.SIGKILL
    # Read again now that nothing writes: the snapshot above may mix two moments.
    study = optuna.load_study(study_name="s", storage=open_storage(url, heartbeat=None))
    victim = study.trials[victim.number]
    assert victim.state == TrialState.RUNNING
    assert set(victim.params) == {"w_sum", "top_k"}
    if stale:
        _wait_until_stale(url, victim.number)
    return victim


def _wait_until_stale(url: str, number: int, timeout: float = 30) -> None:
    """Wait until trial ``number``'s last heartbeat is older than the grace period by the
    database's clock, as Optuna's stale check (run when a worker asks for a trial) sees it.
    SQLite keeps both times in whole seconds, so a fixed sleep would have to be long."""
    storage = open_storage(url, heartbeat=HEARTBEAT)
    grace = timedelta(seconds=storage.grace_period)
    last = text(
        "SELECT h.heartbeat FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id "
        "WHERE t.number = :number"
    ).columns(heartbeat=DateTime)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # A connection per look: PostgreSQL's now() is the start of the transaction.
        with storage.engine.connect() as conn:
            now = conn.execute(select(func.now())).scalar_one().replace(tzinfo=None)
            heartbeat = conn.execute(last, {"number": number}).scalar_one()
        if now - heartbeat > grace:
            return
        time.sleep(0.1)
    pytest.fail(f"trial {number}'s heartbeat never went stale")


def test_a_killed_worker_s_trial_is_retried_with_its_parameters(study_url, tmp_path):
    url, target = study_url, 2
    victim = _kill_a_worker_mid_trial(url, tmp_path, target)
    tuner = make_tuner_at(url, heartbeat=HEARTBEAT)
    tuner.run(trials=target)

    trials = tuner.study.trials
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [victim.number]
    assert sum(t.state in DONE for t in trials) == target
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1
    retry = retries[0]
    assert retry.state in DONE and retry.number > victim.number
    assert retry.params == victim.params
    assert retry.user_attrs["params"] == victim.user_attrs["params"]
    assert retry.user_attrs["levels"] == victim.user_attrs["levels"]
    ids = retry.user_attrs["sample_ids"]
    assert ids and ids == SCREEN[: len(ids)]


def test_a_killed_worker_s_last_trial_is_retried(tmp_path):
    url, target = f"sqlite:///{tmp_path / 'study.db'}", 1
    victim = _kill_a_worker_mid_trial(url, tmp_path, target)
    tuner = make_tuner_at(url, heartbeat=HEARTBEAT)
    tuner.run(trials=target)
    trials = tuner.study.trials
    assert tuner.study.trials[victim.number].state == TrialState.FAIL
    assert sum(t.state in DONE for t in trials) == target


def test_a_rerun_right_after_a_kill_reaches_its_target(study_url, tmp_path):
    """The killed trial still has a fresh heartbeat when the rerun starts: the rerun runs
    what it can, waits for that trial to go stale, fails it and runs its retry."""
    url, target = study_url, 2
    victim = _kill_a_worker_mid_trial(url, tmp_path, target, stale=False)
    tuner = make_tuner_at(url, heartbeat=HEARTBEAT)
    reported: list[int] = []
    ran = tuner.run(trials=target, on_trial=lambda r: reported.append(r.number))

    trials = tuner.study.trials
    assert sum(t.state in DONE for t in trials) == target
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [victim.number]
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert ran == target
    # Each trial this worker ran is reported, the retry included.
    assert reported == [t.number for t in trials if t.state in DONE]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used:UserWarning")
def test_a_live_worker_s_trial_is_waited_for_but_never_failed(tmp_path):
    """A trial whose heartbeat stays fresh (its worker is alive, on another machine say)
    counts towards the target: the worker waits at most the grace period for it, then
    stops without failing it."""
    import threading

    url = f"sqlite:///{tmp_path / 'study.db'}"
    tuner = make_tuner_at(url, heartbeat=HEARTBEAT)
    tuner.run(trials=1)
    storage = tuner.study._storage
    other = tuner.study.ask()  # the other worker's trial
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            storage.record_heartbeat(other._trial_id)
            stop.wait(0.2)

    beating = threading.Thread(target=beat)
    beating.start()
    said: list[str] = []
    try:
        ran = tuner.run(trials=2, on_status=said.append)
        state = tuner.study.trials[other.number].state
    finally:
        stop.set()
        beating.join()
    assert ran == 0 and state == TrialState.RUNNING
    assert len(said) == 1 and f"trial #{other.number}" in said[0]
    assert sum(t.state in DONE for t in tuner.study.trials) == 1
