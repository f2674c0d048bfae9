"""``run_levels``, the library behind ``autosparse levels``, on a tiny model folder."""

from __future__ import annotations

import re

import pytest
from conftest import tiny_llama, tiny_tokenizer

from autosparse.calibration import CalibrationChoice
from autosparse.errors import ConfigError
from autosparse.levels import read_levels_file
from autosparse.levels_workflow import plot_levels, run_levels


@pytest.fixture
def setup(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nTwo plus two is\nA longer prompt, to pad.\n")
    loads = []

    def loader(model, device, dtype):
        from autosparse.models import load_model

        loads.append((model, device, dtype))
        return load_model(model, device, dtype)

    common = dict(
        device="cpu", cache_dir=tmp_path / "cache", loader=loader, progress=False, layers="0:4"
    )
    return tmp_path, str(model_dir), CalibrationChoice(file=str(prompts)), common, loads


def test_the_model_is_loaded_only_to_compute_statistics(setup):
    root, model, choice, common, loads = setup
    outcome = run_levels(model, choice, goal=0.5, **common)
    assert loads == [(model, "cpu", "auto")]
    assert outcome.calibration["reused"] is False
    assert outcome.calibration["sample_ids"] == [0, 2, 3] and outcome.calibration["prompts"] == 3
    assert outcome.result.mean == pytest.approx(0.5, abs=0.01) and outcome.result.goal == 0.5
    assert outcome.model_id == str((root / "model").resolve())

    other = run_levels(model, choice, threshold=0.3, w_sum=0.6, top_k=20, **common)
    assert len(loads) == 1 and other.calibration["reused"] is True
    doc = other.to_json()
    assert doc["params"] == {"w_sum": 0.6, "w_count": 0.4, "threshold": 0.3, "top_k": 20}
    assert doc["layers"] == "0:4" and doc["levels"] == list(other.result.levels)
    assert doc["calibration"]["selection"] == "file"


def test_write_and_plot(setup):
    root, model, choice, common, _ = setup
    outcome = run_levels(model, choice, goal=0.4, **common)
    out = outcome.write(root / "levels.json")
    loaded = read_levels_file(out)
    assert list(loaded.levels) == list(outcome.result.levels) and loaded.layers == "0:4"
    assert loaded.extra["calibration"]["sample_ids"] == [0, 2, 3]
    png = root / "levels.png"
    plot_levels(png, outcome)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_zero_level_is_not_written(setup):
    root, model, choice, common, _ = setup
    outcome = run_levels(model, choice, threshold=100.0, **common)
    assert min(outcome.result.levels) == 0.0
    with pytest.raises(ConfigError, match="level 0.00"):
        outcome.write(root / "none.json")
    assert not (root / "none.json").exists()


@pytest.mark.parametrize(
    "setting, message",
    [
        ({}, "exactly one of"),
        ({"threshold": 0.3, "goal": 0.4}, "exactly one of"),
        ({"goal": 0.0}, "(0, 1]"),
        ({"threshold": 0.3, "top_k": 0}, "top_k"),
    ],
)
def test_a_bad_setting_fails_before_any_load(setup, setting, message):
    _, model, choice, common, loads = setup
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_levels(model, choice, **setting, **common)
    assert loads == []
