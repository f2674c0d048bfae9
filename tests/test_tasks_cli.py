"""``autosparse eval`` in-process with click's CliRunner: a tiny model saved to a folder,
a fixture task from --include-path, a temporary result store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import tiny_llama, tiny_tokenizer
from test_tasks import FIXTURES, _task_yaml

from autosparse.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import lm_eval.tasks

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    tasks = root / "tasks"
    tasks.mkdir()
    builtin = Path(lm_eval.tasks.__file__).parent
    (tasks / "fx-csqa.yaml").write_text(
        _task_yaml(
            "fx-csqa",
            {
                "include": str(builtin / "commonsense_qa" / "default.yaml"),
                "dataset_path": "json",
                "dataset_name": None,
                "dataset_kwargs": {
                    "data_files": {
                        s: str(FIXTURES / "commonsense_qa.jsonl") for s in ("train", "validation")
                    }
                },
            },
        )
    )
    return model_dir, tasks, f"sqlite:///{root / 'results.db'}"


def invoke(setup, *extra):
    model_dir, tasks, url = setup
    args = [
        "eval",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--task",
        "fx-csqa",
        "--include-path",
        str(tasks),
        "--num-fewshot",
        "0",
        "--limit",
        "3",
        "--storage",
        url,
        *extra,
    ]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_eval_help():
    result = CliRunner().invoke(main, ["eval", "--help"])
    assert result.exit_code == 0
    assert "--task" in result.output and "--limit" in result.output


def test_eval_json_is_stored_and_reused(setup):
    first = invoke(setup, "--method", "coreinfer", "--keep", "0.3", "--json")
    assert first.exit_code == 0, first.output
    data = json.loads(first.stdout)
    assert data["cached"] is False and data["task"] == "fx-csqa" and data["metric"] == "acc"
    assert len(data["sample_ids"]) == 3 and 0 < data["density"] <= 0.3

    again = json.loads(invoke(setup, "--method", "coreinfer", "--keep", "0.3", "--json").stdout)
    assert again["cached"] is True and again["sample_scores"] == data["sample_scores"]

    forced = json.loads(
        invoke(setup, "--method", "coreinfer", "--keep", "0.3", "--json", "--force").stdout
    )
    assert forced["cached"] is False and forced["sample_scores"] == data["sample_scores"]


def test_eval_table(setup):
    result = invoke(setup, "--method", "dense")
    assert result.exit_code == 0, result.output
    assert "acc" in result.output and "realized density" in result.output


def test_bad_metric_is_a_one_line_error(setup):
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            str(setup[0]),
            "--device",
            "cpu",
            "--task",
            "fx-csqa",
            "--include-path",
            str(setup[1]),
            "--num-fewshot",
            "0",
            "--limit",
            "2",
            "--storage",
            setup[2],
            "--method",
            "dense",
            "--metric",
            "bleu",
        ],
    )
    assert result.exit_code == 1
    assert "Error: the task has no metric 'bleu'; fx-csqa reports acc" in result.output


def test_eval_levels_file(setup, tmp_path):
    levels = tmp_path / "levels.json"
    levels.write_text("[0.2, 0.5]")  # tiny llama: layers 1 and 2 run sparse
    result = invoke(setup, "--method", "levels", "--levels", str(levels), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"]["name"] == "levels" and data["method"]["keep"] == [0.2, 0.5]
    low, high = data["layer_density"]
    assert 0 < low <= 0.2 < high <= 0.5


def test_eval_scores_a_custom_include_path_task_for_fidelity(setup):
    result = invoke(
        setup, "--method", "coreinfer", "--keep", "0.5", "--metric", "fidelity", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task"] == "fx-csqa" and data["metric"] == "fidelity"
    assert data["settings"]["objective"] == "fidelity"
    assert data["settings"]["include_path"] == [str(setup[1])]
    assert len(data["sample_ids"]) == 3 and all(s < 0 for s in data["sample_scores"])
    assert data["metrics"]["kl"] > 0  # keep 0.5 moves the next-token distributions


@pytest.mark.parametrize("metric", [["--metric", "kl"], []])
def test_a_stored_result_is_returned_without_loading_the_model(setup, monkeypatch, metric):
    args = ("--method", "coreinfer", "--keep", "0.6", *metric, "--json")
    first = invoke(setup, *args)
    assert first.exit_code == 0, first.output
    stored = json.loads(first.stdout)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a stored result")

    import autosparse.models

    monkeypatch.setattr(autosparse.models, "load_model", no_load)
    again = invoke(setup, *args)
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert data["cached"] is True and stored["cached"] is False
    assert data["sample_scores"] == stored["sample_scores"] and data["metric"] == stored["metric"]
    with pytest.raises(AssertionError, match="the model was loaded"):
        invoke(setup, *args, "--force")  # --force evaluates again: it needs the model


@pytest.mark.parametrize("metric", [["--metric", "kl"], []], ids=["kl", "acc"])
def test_eval_selector_griffin_is_its_own_stored_method(setup, metric):
    args = ("--method", "coreinfer", "--keep", "0.35", *metric, "--json")
    votes = json.loads(invoke(setup, *args).stdout)
    first = invoke(setup, *args, "--selector", "griffin")
    assert first.exit_code == 0, first.output
    griffin = json.loads(first.stdout)
    assert griffin["cached"] is False  # not CoreInfer's stored result
    assert griffin["method"]["selector"] == "griffin" and "selector" not in votes["method"]
    assert griffin["method"]["token_ratio"] is None  # GRIFFIN has no token ratio
    # GRIFFIN always keeps exactly floor(keep * N) neurons of every sparse layer
    assert griffin["layer_density"] == [44 / 128, 44 / 128]
    if metric:  # the kept neurons differ, so the next-token distributions do
        assert griffin["sample_scores"] != votes["sample_scores"]
    again = json.loads(invoke(setup, *args, "--selector", "griffin").stdout)
    assert again["cached"] is True and again["sample_scores"] == griffin["sample_scores"]


def test_eval_table_names_griffin(setup):
    result = invoke(setup, "--method", "coreinfer", "--keep", "0.35", "--selector", "griffin")
    assert result.exit_code == 0, result.output
    assert "GRIFFIN keep=0.35" in result.output


def test_dense_with_a_selector_is_a_one_line_error(setup):
    result = invoke(setup, "--method", "dense", "--selector", "griffin")
    assert result.exit_code == 1
    assert result.output.strip().startswith("Error: --selector griffin needs --method")
    assert "Traceback" not in result.output


def test_eval_levels_file_with_griffin(setup, tmp_path):
    levels = tmp_path / "levels.json"
    levels.write_text("[0.2, 0.5]")
    args = ("--method", "levels", "--levels", str(levels), "--json")
    result = invoke(setup, *args, "--selector", "griffin", "--mode", "sliced")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["method"]["name"] == "levels" and data["method"]["selector"] == "griffin"
    assert data["layer_density"] == [25 / 128, 64 / 128]  # the levels say how many
