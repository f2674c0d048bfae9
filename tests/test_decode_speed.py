"""benchmarks/decode_speed.py runs end to end on a tiny model folder and its figures are
consistent with each other (no test asserts a speed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode_speed.py"


def test_quick_json_run_reports_consistent_figures(model_dir, capsys):
    spec = importlib.util.spec_from_file_location("decode_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--model", model_dir, "--quick", "--prompt-tokens", "12", "--json"]
    assert module.main([*args, "--gemv-copies", "1", "--gemv-repeats", "3"]) == 0
    out = json.loads(capsys.readouterr().out)

    from autosparse.bench import decode_step_bytes
    from autosparse.models import load_model

    model = load_model(model_dir, device="cpu", dtype="float32").model
    assert out["decode_bytes"]["dense"] == decode_step_bytes(model)
    assert out["sparse_layers"] == [1, 2] and 0 < out["realized_density"] <= 0.41
    assert out["ideal_speedup"] == pytest.approx(
        out["decode_bytes"]["dense"] / out["decode_bytes"]["sparse"]
    )
    assert out["percent_of_ideal"] == pytest.approx(
        100 * out["sliced_speedup"] / out["ideal_speedup"]
    )
    assert set(out["tokens_per_s"]) == {"hf", "lean", "lean sliced keep 0.4"}
    assert set(out["percent_of_limit"]) == {"hf", "lean"}
    for rate in out["tokens_per_s"].values():
        assert 0 < rate["min"] <= rate["median"] <= rate["max"]
    assert out["gemv_gb_per_s"]["median"] > 0 and out["rounds"] == 2
