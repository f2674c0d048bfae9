"""``autosparse levels`` on a tiny model saved to a folder, with a calibration file."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import tiny_llama, tiny_tokenizer

from autosparse.cli import main
from autosparse.levels import read_levels_file

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France?",
    "",
    "Calibration statistics are computed once and reused.",
    "One more prompt, a little longer than the others, to make the batch uneven.",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("levels-cli")
    model_dir = root / "model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return root, model_dir, prompts


def run(args):
    result = CliRunner().invoke(main, args)
    return result


def base_args(setup):
    root, model_dir, prompts = setup
    return [
        "levels",
        "--model",
        str(model_dir),
        "--device",
        "cpu",
        "--calibration-file",
        str(prompts),
        "--cache-dir",
        str(root / "cache"),
    ]


def test_goal_writes_a_levels_file_and_a_plot(setup):
    root = setup[0]
    out, png = root / "levels.json", root / "levels.png"
    result = run(
        base_args(setup) + ["--goal", "0.5", "--layers", "0:4", "-o", str(out), "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert "mean kept" in result.output and "computed" in result.output
    loaded = read_levels_file(out)
    assert loaded.layers == "0:4" and len(loaded.levels) == 4
    assert abs(loaded.mean - 0.5) <= 0.01 and loaded.goal == 0.5
    assert loaded.params["w_sum"] == 0.45 and loaded.params["w_count"] == 0.55
    assert loaded.extra["calibration"]["selection"] == "file"
    assert loaded.extra["calibration"]["sample_ids"] == [0, 1, 3, 4]  # the empty line skipped
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_threshold_as_json_reuses_the_statistics(setup):
    run(base_args(setup) + ["--threshold", "0.3"])  # make sure statistics exist
    result = run(
        base_args(setup) + ["--threshold", "0.3", "--w-sum", "0.6", "--top-k", "20", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["calibration"]["reused"] is True
    assert doc["layers"] == "1:3"  # the default range of a 4-layer model
    assert doc["params"] == {"w_sum": 0.6, "w_count": 0.4, "threshold": 0.3, "top_k": 20}
    assert doc["mean"] == pytest.approx(sum(doc["levels"]) / len(doc["levels"]))


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "exactly one of --threshold"),
        (["--threshold", "0.3", "--goal", "0.4"], "exactly one of --threshold"),
        (["--goal", "1.5"], "(0, 1]"),
        (["--threshold", "0.3", "--w-sum", "-1"], "w_sum"),
        (["--threshold", "0.3", "--layers", "2:9"], "layer range"),
    ],
)
def test_user_mistakes_are_one_line_errors(setup, extra, message):
    result = run(base_args(setup) + extra)
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]  # model loading may print before it
    assert last.startswith("Error: ") and message in last
    assert "Traceback" not in result.output


def test_zero_levels_are_not_written(setup):
    root = setup[0]
    out = root / "none.json"
    result = run(base_args(setup) + ["--threshold", "100", "-o", str(out)])
    assert result.exit_code == 1 and "level 0.00" in result.output
    assert not out.exists()


def test_needs_a_task_or_a_file(setup):
    root, model_dir, _ = setup
    result = run(
        ["levels", "--model", str(model_dir), "--goal", "0.4", "--cache-dir", str(root / "c")]
    )
    assert result.exit_code == 1 and "--calibration-file" in result.output


def test_help():
    result = run(["levels", "--help"])
    assert result.exit_code == 0
    for option in (
        "--goal",
        "--threshold",
        "--w-sum",
        "--calibration-file",
        "--plot",
        "--reference-calibration",
    ):
        assert option in result.output


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """fx-csqa: lm-eval's commonsense_qa config on the 6-row fixture file."""
    from test_tasks import write_fx_csqa

    tasks = tmp_path_factory.mktemp("levels-tasks")
    write_fx_csqa(tasks)
    return tasks


def test_calibration_from_a_task_is_disjoint_by_default_or_reference_style(setup, task_dir):
    from autosparse.tasks import sample_ids

    root, model_dir, _ = setup
    common = ["levels", "--model", str(model_dir), "--task", "fx-csqa"]
    common += ["--include-path", str(task_dir), "--cache-dir", str(root / "task-cache")]
    common += ["--threshold", "0.3", "--calibration", "2", "--json"]

    result = run(common + ["--exclude-limit", "3", "--seed", "42"])
    assert result.exit_code == 0, result.output
    calibration = json.loads(result.output[result.output.index("{") :])["calibration"]
    evaluated = sample_ids("fx-csqa", 3, 42, include_path=[str(task_dir)])
    assert calibration["selection"] == "disjoint" and calibration["with_answers"] is False
    assert len(calibration["sample_ids"]) == 2
    assert not set(calibration["sample_ids"]) & set(evaluated)

    result = run(common + ["--reference-calibration"])
    assert result.exit_code == 0, result.output
    calibration = json.loads(result.output[result.output.index("{") :])["calibration"]
    assert calibration["selection"] == "reference" and calibration["with_answers"] is True
    assert calibration["overlaps_evaluation"] is True
    assert calibration["sample_ids"] == [0, 1] and calibration["reused"] is False


def test_level_vectors_plot_writes_a_png_and_refuses_nothing(tmp_path):
    from autosparse.errors import ConfigError
    from autosparse.levels_workflow import plot_level_vectors

    path = plot_level_vectors(
        tmp_path / "v.png", {"a": [0.2, 0.6], "b": [0.4, 0.4]}, uniform=0.4, title="t"
    )
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000
    with pytest.raises(ConfigError):
        plot_level_vectors(tmp_path / "w.png", {})
