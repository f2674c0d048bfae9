"""Choosing calibration prompts (a file, a random draw, the reference's choice) and the
one cache key every command uses for their statistics."""

from __future__ import annotations

import pytest
from conftest import tiny_llama, tiny_tokenizer

from autosparse.calibration import (
    CalibrationChoice,
    calibration_stats,
    choose_calibration,
    compute_dtype,
)
from autosparse.errors import ConfigError


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """fx-csqa: lm-eval's commonsense_qa config on the 6-row fixture file."""
    from test_tasks import write_fx_csqa

    tasks = tmp_path_factory.mktemp("choice-tasks")
    write_fx_csqa(tasks)
    return (str(tasks),)


def test_a_file_gives_its_first_non_empty_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\n  \nsecond\nthird\n")
    prompts = choose_calibration(CalibrationChoice(file=str(path), n=2))
    assert prompts.samples == ((0, "first"), (3, "second"))
    assert prompts.source == f"file:{path.resolve()}"
    assert prompts.how["selection"] == "file" and not prompts.exclude_from_evaluation


def test_the_reference_choice_is_the_first_documents_with_answers(task_dir):
    from autosparse.tasks.registry import load_task
    from autosparse.tasks.sampling import prompt_text

    choice = CalibrationChoice(task="fx-csqa", n=3, reference=True, include_path=task_dir)
    prompts = choose_calibration(choice)
    _, task_obj = load_task("fx-csqa", list(task_dir))
    docs = task_obj.eval_docs
    assert prompts.ids == [0, 1, 2]
    assert [text for _, text in prompts.samples] == [
        prompt_text(task_obj, docs[i], True) for i in range(3)
    ]
    assert prompts.samples[0][1] != prompt_text(task_obj, docs[0], False)
    assert prompts.how["overlaps_evaluation"] is True
    assert not prompts.exclude_from_evaluation  # overlapping evaluation is the point
    # more documents asked for than the split holds: all of them
    everything = choose_calibration(CalibrationChoice(**{**choice.__dict__, "n": 50}))
    assert everything.ids == list(range(len(docs)))
    assert everything.source != prompts.source


def test_a_random_draw_is_seeded_and_can_avoid_the_evaluation_sample(task_dir):
    from autosparse.tasks.sampling import sample_ids

    plain = CalibrationChoice(task="fx-csqa", n=2, seed=3, include_path=task_dir)
    first, again = choose_calibration(plain), choose_calibration(plain)
    assert first == again and first.how["selection"] == "random"
    assert first.exclude_from_evaluation and first.how["excluded_sample"] is None

    apart = CalibrationChoice(**{**plain.__dict__, "exclude_limit": 4, "exclude_seed": 1})
    prompts = choose_calibration(apart)
    evaluated = sample_ids("fx-csqa", 4, 1, include_path=list(task_dir))
    assert len(prompts.ids) == 2 and not set(prompts.ids) & set(evaluated)
    assert prompts.how["selection"] == "disjoint"
    assert prompts.how["excluded_sample"] == {"limit": 4, "seed": 1}
    assert prompts.source != first.source


@pytest.mark.parametrize(
    "choice, message",
    [
        (CalibrationChoice(), "--calibration-file"),
        (CalibrationChoice(file="x.txt", reference=True), "draws from --task"),
        (CalibrationChoice(task="fx-csqa", n=0), "at least one"),
    ],
)
def test_impossible_choices_are_config_errors(choice, message):
    with pytest.raises(ConfigError, match=message):
        choose_calibration(choice)


def test_compute_dtype_resolves_names_and_auto():
    assert compute_dtype("auto", "cpu") == "float32"
    assert compute_dtype("torch.float32") == compute_dtype("fp32") == "float32"
    assert compute_dtype("bf16", "cpu") == "bfloat16"
    with pytest.raises(ConfigError, match="unknown dtype"):
        compute_dtype("int8", "cpu")


def test_a_requested_auto_dtype_and_a_loaded_model_share_statistics(tmp_path):
    """`levels` keys by what it was asked (auto on a CPU), `tune` by the dtype of the
    model it loaded: both must find the same statistics."""
    path = tmp_path / "prompts.txt"
    path.write_text("The capital of France is\nTwo plus two is\n")
    prompts = choose_calibration(CalibrationChoice(file=str(path)))
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    loads = []

    def load():
        loads.append(1)
        return model, tokenizer

    common = dict(model_id="tiny", load_model=load, directory=tmp_path / "cache", progress=False)
    first, reused = calibration_stats(prompts, dtype="auto", device="cpu", **common)
    assert not reused and len(loads) == 1
    assert first.layers == (0, 1, 2, 3)  # every layer, whatever range a command then uses
    again, reused = calibration_stats(prompts, dtype=str(next(model.parameters()).dtype), **common)
    assert reused and len(loads) == 1
    assert (again.S == first.S).all()
    _, reused = calibration_stats(prompts, dtype="bfloat16", device="cpu", **common)
    assert not reused and len(loads) == 2
