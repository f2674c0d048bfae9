"""benchmarks/decode_speed.py runs end to end on a tiny model folder and its figures are
consistent with each other (no test asserts a speed)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

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
    # the folder loads as float32 on the CPU, so its wide layers are column-major and the
    # row-major lean decoder runs beside it
    assert out["layout"] == "column-major wide layers"
    configs = {"hf", "lean", "lean row-major"}
    sliced = {"lean sliced keep 0.4", "lean sliced keep 0.4 row-major"}
    assert set(out["tokens_per_s"]) == set(out["prefill_seconds"]) == configs | sliced
    assert set(out["percent_of_limit"]) == set(out["percent_of_matmuls_alone"]) == configs
    alone = out["matmuls_alone"]
    # every linear layer of the tiny Llama: 4 attention + 3 FFN per layer, and the lm_head
    assert alone["matrices"] == 7 * model.config.num_hidden_layers + 1
    assert alone["bytes"] == sum(
        m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    assert out["column_over_row_major"] > 0 and out["sliced_column_over_row_major"] > 0
    assert out["batch_size"] == 1
    for rate in out["tokens_per_s"].values():
        assert 0 < rate["min"] <= rate["median"] <= rate["max"]
    assert out["gemv_gb_per_s"]["median"] > 0 and out["rounds"] == 2
    # the bandwidth of each round is the faster GEMV layout of that round
    by_layout = out["gemv_gb_per_s_by_layout"]
    assert out["gemv_gb_per_s"]["max"] == max(v["max"] for v in by_layout.values())
    assert out["gemv_gb_per_s"]["min"] >= min(v["min"] for v in by_layout.values())
