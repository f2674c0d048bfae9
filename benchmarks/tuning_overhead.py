"""Tuning overhead and trials per hour, with and without pruning.

Runs real studies (TaskEvaluator through lm-eval, levels from calibration statistics,
SQLite storage) on a model and the local CommonsenseQA task, and splits each trial's
wall time into model forward passes (timed by hooks on the model) and everything else:
sampling, levels, the Optuna storage, lm-eval's request building and scoring.

    python benchmarks/tuning_overhead.py                      # tiny Llama, 12 trials x 2
    python benchmarks/tuning_overhead.py --model smollm2-135m --trials 8 --screen 24
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars; read when tqdm is imported


class ForwardTimer:
    """Wall time spent inside the model's top-level forward calls."""

    def __init__(self, model):
        self.total = 0.0
        self._start = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.total += time.perf_counter() - self._start


def tiny_model_dir(root: Path) -> str:
    from conftest import tiny_llama, tiny_tokenizer

    path = root / "tiny"
    tiny_llama(layers=8, hidden=256, neurons=1024, vocab=300).save_pretrained(path)
    tiny_tokenizer(300).save_pretrained(path)
    return str(path)


def run_study(args, model_name: str, prune: bool, root: Path) -> dict:
    import random

    from autosparse.calibration import CalibrationChoice, calibration_stats, choose_calibration
    from autosparse.levels import LevelsIndex
    from autosparse.models import load_model, model_identity
    from autosparse.store import ResultStore
    from autosparse.tasks.evaluator import EvaluatorOptions, TaskEvaluator
    from autosparse.tuning import StudySpec, Tuner, create_or_resume, open_storage

    loaded = load_model(model_name, device="cpu")
    timer = ForwardTimer(loaded.model)
    spec = StudySpec(
        model=model_name,
        model_id=model_identity(model_name),
        task=args.task,
        goal=args.goal,
        screen=args.screen,
        seed=args.seed,
        calibration=args.calibration,
        num_fewshot=0,
        top_k_choices=(10, 25, 50, 100),
        prune=prune,
    )
    prompts = choose_calibration(
        CalibrationChoice(task=args.task, n=args.calibration, seed=args.seed + 1)
    )
    stats, _ = calibration_stats(
        prompts,
        model_id=spec.model_id,
        load_model=lambda: (loaded.model, loaded.tokenizer),
        dtype=str(loaded.dtype),
        directory=root / "calibration",
        progress=False,
    )
    index = LevelsIndex.from_stats(stats)  # the default sparse layers, as the engine
    url = f"sqlite:///{root / ('prune' if prune else 'noprune')}.db"
    study = create_or_resume(open_storage(url), "bench", spec)
    evaluator = TaskEvaluator(
        loaded,
        EvaluatorOptions(
            model_id=spec.model_id,
            task=args.task,
            num_fewshot=0,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=False,
            store=ResultStore(url),
        ),
    )
    pool = [i for i in evaluator.document_ids() if i not in set(prompts.ids)]
    tuner = Tuner(study, spec, evaluator, index)
    tuner.prepare(sorted(random.Random(args.seed).sample(pool, args.screen)))

    # warm-up: one trial that is not counted (imports, first lm-eval call)
    tuner.run(trials=1)
    timer.total = 0.0
    per_trial = []
    t0 = time.perf_counter()
    while len(per_trial) < args.trials:
        f0, w0 = timer.total, time.perf_counter()
        tuner.run(trials=len(study.trials) + 1)
        per_trial.append((time.perf_counter() - w0, timer.total - f0))
    wall = time.perf_counter() - t0
    trial_s = [w for w, _ in per_trial]
    fwd_s = [f for _, f in per_trial]
    pruned = sum(t.state.name == "PRUNED" for t in study.trials[1:])
    return {
        "prune": prune,
        "trials": args.trials,
        "pruned": pruned,
        "median trial s": statistics.median(trial_s),
        "forward share": sum(fwd_s) / sum(trial_s),
        "overhead share": 1 - sum(fwd_s) / sum(trial_s),
        "trials per hour": 3600 * args.trials / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model (default: a tiny random Llama)")
    parser.add_argument("--task", default="csqa-local")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--screen", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--goal", type=float, default=0.4)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or tiny_model_dir(root)
        rows = [run_study(args, model, prune, root) for prune in (True, False)]
    print(
        f"model: {args.model or 'tiny Llama (8 layers, hidden 256, N 1024)'}, task {args.task}, "
        f"screen {args.screen}, {args.trials} timed trials after one warm-up, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(
        "| pruning | trials | pruned | median trial (s) | forward passes | overhead | trials/hour |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {'on' if r['prune'] else 'off'} | {r['trials']} | {r['pruned']} | "
            f"{r['median trial s']:.2f} | {100 * r['forward share']:.1f}% | "
            f"{100 * r['overhead share']:.1f}% | {r['trials per hour']:.0f} |"
        )


if __name__ == "__main__":
    main()
