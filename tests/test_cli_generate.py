"""autosparse generate on a tiny model saved to disk."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import tiny_llama, tiny_tokenizer

from autosparse.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "tiny"
    tiny_llama(layers=4, hidden=64, neurons=128, vocab=300).save_pretrained(path)
    tiny_tokenizer(300).save_pretrained(path)
    return str(path)


def invoke(*args):
    return CliRunner(env={"COLUMNS": "200"}).invoke(
        main, ["generate", *args], catch_exceptions=False
    )


def test_generate_json_reports_density_per_layer(model_dir):
    result = invoke(
        "--model",
        model_dir,
        "--device",
        "cpu",
        "--prompt",
        "hello there",
        "--prompt",
        "a longer prompt, padded less",
        "--keep",
        "0.3",
        "--layers",
        "1:3",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["layers"] == [1, 2] and len(out["layer_density"]) == 2
    assert [g["prompt"] for g in out["generations"]] == [
        "hello there",
        "a longer prompt, padded less",
    ]
    assert all(0 < g["density"] <= 0.3 for g in out["generations"])
    assert out["method"]["name"] == "coreinfer"


def test_generate_sliced_equals_masked_text(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond one\n")
    texts = {}
    for mode in ("masked", "sliced"):
        result = invoke(
            "--model",
            model_dir,
            "--device",
            "cpu",
            "--prompts-file",
            str(prompts),
            "--mode",
            mode,
            "--layers",
            "1:3",
            "--max-new-tokens",
            "6",
            "--json",
        )
        assert result.exit_code == 0, result.output
        texts[mode] = [g["text"] for g in json.loads(result.stdout)["generations"]]
    assert len(texts["masked"]) == 2 and texts["masked"] == texts["sliced"]


def test_generate_table_and_dense(model_dir):
    result = invoke(
        "--model", model_dir, "--device", "cpu", "--prompt", "abc", "--max-new-tokens", "3"
    )
    assert result.exit_code == 0 and "realized kept" in result.output
    dense = invoke(
        "--model",
        model_dir,
        "--device",
        "cpu",
        "--prompt",
        "abc",
        "--method",
        "dense",
        "--max-new-tokens",
        "3",
    )
    assert dense.exit_code == 0 and "realized density dense" in dense.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--keep", "1.5"], "outside (0, 1]"),
        (["--layers", "2:9"], "layer range"),
        (["--method", "levels"], "needs --levels"),
        ([], "give --prompt"),
    ],
)
def test_generate_bad_input_is_one_line(model_dir, args, message):
    prompt = [] if message == "give --prompt" else ["--prompt", "x"]
    result = invoke("--model", model_dir, "--device", "cpu", *prompt, *args)
    assert result.exit_code == 1
    assert message in result.output and result.output.count("\n") == 1


def test_levels_file_of_wrong_length(model_dir, tmp_path):
    levels = tmp_path / "levels.json"
    levels.write_text("[0.4, 0.5, 0.6]")
    result = invoke(
        "--model",
        model_dir,
        "--device",
        "cpu",
        "--prompt",
        "x",
        "--method",
        "levels",
        "--levels",
        str(levels),
        "--layers",
        "1:3",
    )
    assert result.exit_code == 1 and "3 entries but 2 layers" in result.output


def test_generate_with_griffin_keeps_exactly_the_planned_count(model_dir):
    args = ["--model", model_dir, "--device", "cpu", "--prompt", "hello there", "--keep"]
    args += ["0.3", "--layers", "1:3", "--max-new-tokens", "4", "--json"]
    result = invoke(*args, "--selector", "griffin", "--mode", "sliced")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["method"]["selector"] == "griffin" and out["method"]["mode"] == "sliced"
    assert out["layer_density"] == [38 / 128, 38 / 128]  # floor(0.3 * 128) per layer
    table = invoke(*args[:-1], "--selector", "griffin")
    assert table.exit_code == 0 and "GRIFFIN keep=0.3" in table.output


def test_generate_compiled_step_gives_the_same_text(model_dir, monkeypatch):
    import torch

    compiled = []
    real = torch.compile

    def spy(fn, **kwargs):
        compiled.append(fn.__name__)
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    args = ["--model", model_dir, "--device", "cpu", "--prompt", "hello there", "--prompt",
            "a longer prompt, padded less", "--mode", "sliced", "--max-new-tokens", "4",
            "--json"]  # fmt: skip
    texts = []
    for extra in ((), ("--compile",)):
        result = invoke(*args, *extra)
        assert result.exit_code == 0, result.output
        texts.append([g["text"] for g in json.loads(result.stdout)["generations"]])
    assert len(texts[0]) == 2 and texts[1] == texts[0]
    assert compiled == ["_decode_step"]  # only the --compile run compiled, its step
