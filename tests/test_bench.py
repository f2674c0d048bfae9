"""autosparse bench: the byte count by hand, the library run, and the command. No test
asserts a time: only that times are there, positive and consistent with each other."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli, tiny_llama, tiny_opt

from autosparse.bench import (
    BenchSettings,
    decode_step_bytes,
    run_bench,
    synthetic_prompt_ids,
    time_generation,
)
from autosparse.engine.modules import SparseGatedMLP, SparseOPTFc1, SparseOPTFc2
from autosparse.errors import ConfigError
from autosparse.generation import greedy_ids
from autosparse.methods import Method

FLOAT32 = 4  # bytes

# tiny_llama(): hidden 64, 4 heads of 16 (2 key-value heads), N = 128, vocabulary 256,
# 4 layers, untied lm_head, no biases.
LLAMA_ATTENTION = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v, o
LLAMA_MLP = 3 * 128 * 64  # gate, up, down
LLAMA_LAYER = LLAMA_ATTENTION + LLAMA_MLP + 2 * 64  # + two RMSNorms
LLAMA_DENSE = 4 * LLAMA_LAYER + 64 + 256 * 64 + 64  # + final norm, lm_head, one embedding row

# tiny_opt(): hidden 64, N = 128, vocabulary 256, 4 layers, biases everywhere, lm_head
# tied to the token embedding, learned positions (256 + 2 rows).
OPT_ATTENTION = 4 * (64 * 64 + 64)
OPT_FC1 = 128 * 64 + 128
OPT_FC2 = 64 * 128 + 64
OPT_LAYER = OPT_ATTENTION + OPT_FC1 + OPT_FC2 + 2 * 2 * 64  # + two LayerNorms
OPT_DENSE_BATCH2 = 4 * OPT_LAYER + 2 * 64 + 256 * 64 + 2 * 64  # + final norm, table, 2 rows


def small(**kw) -> BenchSettings:
    """A few short rounds: enough to exercise every code path."""
    settings = {"prompt_tokens": 12, "new_tokens": 4, "rounds": 2, "warmup": 1}
    return BenchSettings(**(settings | kw))


# -- bytes --------------------------------------------------------------------------


def test_llama_bytes_match_a_hand_count():
    model = tiny_llama()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert decode_step_bytes(model) == LLAMA_DENSE * FLOAT32
    # layers 1 and 2 keep half their neurons: half of gate, up and down each
    sparse = (LLAMA_DENSE - 2 * LLAMA_MLP // 2) * FLOAT32
    assert decode_step_bytes(model, {1: 0.5, 2: 0.5}) == sparse


def test_opt_bytes_match_a_hand_count_with_tied_head_and_positions():
    model = tiny_opt()
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert decode_step_bytes(model, batch_size=2) == OPT_DENSE_BATCH2 * FLOAT32
    # batch 2, layer 1 keeps a quarter per sequence: each sequence reads its own quarter
    # of fc1 (weight and bias) and fc2's weight; fc2's bias is read once
    per_neuron = OPT_FC1 + 64 * 128
    sparse = OPT_DENSE_BATCH2 - per_neuron + 2 * per_neuron // 4
    assert decode_step_bytes(model, {1: 0.25}, batch_size=2) == sparse * FLOAT32


@pytest.mark.parametrize("batch", [1, 3])
def test_keeping_every_neuron_reads_the_dense_bytes(any_model, batch):
    everything = {layer: 1.0 for layer in range(4)}
    assert decode_step_bytes(any_model, everything, batch) == decode_step_bytes(
        any_model, None, batch
    )


def test_bytes_follow_the_dtype_and_need_no_storage():
    model = tiny_llama().to(torch.bfloat16)
    assert decode_step_bytes(model) == LLAMA_DENSE * 2
    assert decode_step_bytes(model.to("meta"), {1: 0.5}) == (LLAMA_DENSE - LLAMA_MLP // 2) * 2


# -- prompts ------------------------------------------------------------------------


def test_synthetic_prompts_are_seeded_and_avoid_special_tokens():
    a = synthetic_prompt_ids(300, 2, 50, seed=3, exclude=[0, 1, 2])
    assert a.shape == (2, 50) and a.dtype == torch.long
    assert torch.equal(a, synthetic_prompt_ids(300, 2, 50, seed=3, exclude=[0, 1, 2]))
    assert not torch.equal(a, synthetic_prompt_ids(300, 2, 50, seed=4, exclude=[0, 1, 2]))
    assert int(a.min()) >= 3 and int(a.max()) < 300


# -- decoding exactly --new-tokens --------------------------------------------------


@pytest.mark.parametrize("decoder", ["lean", "hf"])
def test_generation_runs_every_token_even_when_eos_comes_first(decoder):
    model = tiny_llama()
    ids = synthetic_prompt_ids(256, 1, 10, seed=0, exclude=[0, 1, 2])
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first  # greedy decoding emits EOS at once
    mask = torch.ones_like(ids)
    stopped = greedy_ids(model, ids, mask, max_new_tokens=6, pad_token_id=0, decoder=decoder)
    assert stopped.shape == (1, 1)
    steps = []
    full = greedy_ids(
        model,
        ids,
        mask,
        max_new_tokens=6,
        pad_token_id=0,
        stop_at_eos=False,
        on_token=lambda: steps.append(1),
        decoder=decoder,
    )
    assert full.shape == (1, 6) and len(steps) == 6
    got = time_generation(model, ids, new_tokens=6, pad_token_id=0, decoder=decoder)
    assert 0 < got.prefill <= got.first_token and got.decode > 0


# -- the library run ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["masked", "sliced"])
def test_run_reports_every_quantity(any_model, mode):
    settings = small(batch_size=2)
    result = run_bench(any_model, Method.coreinfer(0.4, mode=mode), settings)
    assert result.layers == [1, 2] and len(result.layer_density) == 2
    # Llama's gated activations are never exactly 0: it keeps what it plans; OPT's ReLU
    # leaves some neurons without votes, so it may keep fewer
    if any_model.config.model_type == "llama":
        assert result.density == pytest.approx(0.4, abs=1 / 128)
    else:
        assert 0.3 < result.density <= 0.4 + 1 / 128
    for timing in (result.dense, result.sparse):
        assert len(timing.rounds) == settings.rounds
        for r in timing.rounds:
            assert 0 < r.prefill <= r.first_token and r.decode > 0
        assert timing.decode_rate.low <= timing.decode_rate.median <= timing.decode_rate.high
        assert timing.decode_rate_total.values == pytest.approx(
            tuple(2 * v for v in timing.decode_rate.values)
        )
    kept = dict(zip(result.layers, result.layer_density, strict=True))
    assert result.sparse_bytes == decode_step_bytes(any_model, kept, 2)
    assert result.dense_bytes == decode_step_bytes(any_model, None, 2)
    assert result.ideal_speedup == result.dense_bytes / result.sparse_bytes > 1
    assert result.speedup > 0
    assert result.fraction_of_ideal == pytest.approx(result.speedup / result.ideal_speedup)
    assert result.threads == torch.get_num_threads() and result.device == "cpu"
    patched = (SparseGatedMLP, SparseOPTFc1, SparseOPTFc2)
    assert not any(isinstance(m, patched) for m in any_model.modules())  # restored


def test_ideal_speedup_is_the_hand_count():
    result = run_bench(tiny_llama(), Method.coreinfer(0.5, mode="sliced"), small())
    assert result.layer_density == [0.5, 0.5]  # 64 of 128 neurons
    assert result.ideal_speedup == pytest.approx(LLAMA_DENSE / (LLAMA_DENSE - LLAMA_MLP))


@pytest.mark.parametrize("batch", [1, 2])
def test_keep_one_is_dense_and_ideal_one(batch):
    result = run_bench(tiny_opt(), Method.coreinfer(1.0), small(batch_size=batch))
    assert result.density == 1.0 and result.layer_density == [1.0, 1.0]
    assert result.ideal_speedup == 1.0


def test_dense_method_times_dense_only():
    result = run_bench(tiny_llama(), Method.dense(), small(warmup=0, rounds=3))
    assert result.sparse is None and result.layers == [] and result.density is None
    assert result.ideal_speedup == 1.0 and result.speedup is None
    assert len(result.dense.rounds) == 3
    out = result.to_dict()
    assert out["sparse"] is None and out["decode_speedup"] is None


def test_a_levels_vector_of_the_wrong_length_fails_before_timing():
    rounds = []
    with pytest.raises(ConfigError, match="3 entries but 2 layers"):
        run_bench(
            tiny_llama(),
            Method.levels([0.4, 0.5, 0.6]),
            small(),
            on_round=rounds.append,
        )
    assert rounds == []


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"new_tokens": 0}, "--new-tokens must be an integer >= 2"),
        ({"new_tokens": 1}, "--new-tokens must be an integer >= 2"),
        ({"rounds": 0}, "--rounds must be an integer >= 1"),
        ({"warmup": -1}, "--warmup must be an integer >= 0"),
        ({"prompt_tokens": 0}, "--prompt-tokens must be an integer >= 1"),
    ],
)
def test_bad_settings_are_config_errors(kw, message):
    with pytest.raises(ConfigError, match=message):
        BenchSettings(**kw)


def test_more_tokens_than_positions_is_a_config_error():
    with pytest.raises(ConfigError, match="exceeds the model's 256 positions"):
        run_bench(tiny_llama(), Method.dense(), small(prompt_tokens=250, new_tokens=10))


# -- the command --------------------------------------------------------------------

ARGS = ["--device", "cpu", "--prompt-tokens", "12", "--new-tokens", "4", "--rounds", "2"]

SPREAD = {"median", "min", "max", "q1", "q3", "rounds"}
TIMING = {
    "label",
    "prefill_seconds",
    "time_to_first_token_seconds",
    "decode_tokens_per_second",
    "decode_tokens_per_second_total",
}


def test_cli_json_has_every_field(model_dir, tmp_path):
    result = run_cli(["bench", "--model", model_dir, *ARGS, "--mode", "sliced", "--json"], tmp_path)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {
        "model",
        "device",
        "dtype",
        "threads",
        "prompt_tokens",
        "new_tokens",
        "batch_size",
        "rounds",
        "warmup",
        "seed",
        "decoder",
        "compile",
        "method",
        "layers",
        "layer_density",
        "realized_density",
        "decode_bytes",
        "ideal_decode_speedup",
        "decode_speedup",
        "fraction_of_ideal",
        "dense",
        "sparse",
    }
    assert out["device"] == "cpu" and out["dtype"] == "float32" and out["threads"] >= 1
    assert out["decoder"] == "lean" and out["compile"] is False
    assert (out["prompt_tokens"], out["new_tokens"], out["rounds"]) == (12, 4, 2)
    assert out["method"]["name"] == "coreinfer" and out["method"]["mode"] == "sliced"
    assert out["realized_density"] == pytest.approx(0.4, abs=1 / 128)
    assert out["ideal_decode_speedup"] == pytest.approx(
        out["decode_bytes"]["dense"] / out["decode_bytes"]["sparse"]
    )
    for part in ("dense", "sparse"):
        assert set(out[part]) == TIMING
        for name in TIMING - {"label"}:
            assert set(out[part][name]) == SPREAD and len(out[part][name]["rounds"]) == 2
            assert out[part][name]["median"] > 0


def test_cli_selector_reaches_the_method(model_dir, tmp_path):
    args = ["bench", "--model", model_dir, *ARGS, "--selector", "griffin", "--json"]
    result = run_cli(args, tmp_path)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["method"]["selector"] == "griffin"
    assert "GRIFFIN" in out["sparse"]["label"]
    # GRIFFIN keeps exactly floor(0.4 * 128) neurons in every layer
    assert out["realized_density"] == pytest.approx(51 / 128)


def test_cli_table(model_dir, tmp_path):
    result = run_cli(["bench", "--model", model_dir, *ARGS], tmp_path)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for expected in (
        "prefill",
        "time to first token",
        "decode tokens/s per sequence",
        "decode tokens/s, batch",
        "coreinfer keep=0.4 q=0.2 masked",
        "threads",
        "realized density 0.398",
        "ideal decode speedup",
        "measured decode speedup",
        "--mode sliced",
    ):
        assert expected in text, expected


def test_cli_decoder_hf_times_model_generate(model_dir, tmp_path):
    args = ["bench", "--model", model_dir, *ARGS, "--decoder", "hf"]
    result = run_cli([*args, "--json"], tmp_path)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["decoder"] == "hf" and out["compile"] is False
    assert out["sparse"]["decode_tokens_per_second"]["median"] > 0
    result = run_cli(args, tmp_path)
    assert result.exit_code == 0, result.output
    assert "model.generate" in result.stdout and "lean decoder" not in result.stdout
    result = run_cli(["bench", "--model", model_dir, *ARGS], tmp_path)
    assert "lean decoder" in result.stdout and "model.generate" not in result.stdout


def test_a_model_that_needs_generate_reports_it():
    model = tiny_llama()
    model.generation_config.repetition_penalty = 1.2  # a logits processor: lean cannot
    result = run_bench(model, Method.dense(), small(warmup=0, rounds=1))
    assert result.decoder == "hf" and result.to_dict()["decoder"] == "hf"
    assert result.to_dict()["compile"] is False


def test_cli_dense_only(model_dir, tmp_path):
    result = run_cli(["bench", "--model", model_dir, *ARGS, "--method", "dense"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "ideal decode speedup 1.00x" in result.stdout
    assert "measured decode speedup" not in result.stdout and "vs dense" not in result.stdout
    result = run_cli(
        ["bench", "--model", model_dir, *ARGS, "--method", "dense", "--json"], tmp_path
    )
    out = json.loads(result.stdout)
    assert out["sparse"] is None and out["realized_density"] is None and out["layers"] == []
    assert out["decode_bytes"]["dense"] == out["decode_bytes"]["sparse"]


def test_cli_levels_file(model_dir, tmp_path):
    levels = tmp_path / "levels.json"
    levels.write_text("[0.25, 0.5]")
    args = ["bench", "--model", model_dir, *ARGS, "--method", "levels", "--levels", str(levels)]
    result = run_cli([*args, "--json"], tmp_path)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["layer_density"] == pytest.approx([0.25, 0.5], abs=1 / 128)

    levels.write_text("[0.25, 0.5, 0.75]")
    result = run_cli(args, tmp_path)
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "3 entries but 2 layers" in last
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--new-tokens", "0"], 1, "--new-tokens must be an integer >= 2"),
        (["--rounds", "0"], 1, "--rounds must be an integer >= 1"),
        (["--method", "magic"], 2, "'magic' is not one of"),
        (["--method", "levels"], 1, "--method levels needs --levels FILE"),
        (["--keep", "1.5"], 1, "keep ratio 1.5 is outside (0, 1]"),
        (["--decoder", "hf", "--compile"], 1, "--compile applies to the lean decoder only"),
        (["--decoder", "fast"], 2, "'fast' is not one of"),
    ],
)
def test_cli_bad_input_is_a_one_line_error(model_dir, tmp_path, extra, code, message):
    result = run_cli(["bench", "--model", model_dir, *ARGS, *extra], tmp_path)
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert result.stdout == ""
