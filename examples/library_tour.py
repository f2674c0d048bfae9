"""A tour of the autosparse library on the offline SmolLM2-135M and CommonsenseQA."""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's bars; read when tqdm is first imported

from autosparse.calibration import load_or_collect
from autosparse.generation import generate
from autosparse.levels import LevelsIndex
from autosparse.methods import Method
from autosparse.models import load_model, model_identity
from autosparse.stats import paired_difference
from autosparse.tasks.evaluator import EvaluatorOptions, TaskEvaluator
from autosparse.tasks.sampling import calibration_texts, sample_ids

MODEL, TASK, GOAL, SEED = "smollm2-135m", "csqa-local", 0.4, 42

loaded = load_model(MODEL, device="cpu")
model_id = model_identity(MODEL)

# 1. CoreInfer: every sparse layer (6..26 here) keeps 40% of its FFN neurons per prompt.
run = generate(
    loaded.model,
    loaded.tokenizer,
    ["The capital of France is"],
    Method.coreinfer(0.4),
    max_new_tokens=16,
)
print("CoreInfer says:", run.generations[0].text.strip())
print(f"realized density {run.density:.3f} (planned 0.4)")

# 2. Levels: per-layer keep ratios whose mean is the goal, from calibration statistics
#    on documents kept apart from the evaluation sample.
evaluated = sample_ids(TASK, limit=60, seed=SEED)
calibration = calibration_texts(TASK, 32, exclude_ids=evaluated, seed=SEED)
stats, _ = load_or_collect(
    "studies/calibration",
    model_id=model_id,
    source=f"{TASK}: 32 documents outside the sample",
    samples=calibration,
    load_model=lambda: (loaded.model, loaded.tokenizer),
    layers="6:27",
)
index = LevelsIndex(stats.S, stats.c, stats.layers)
solved = index.solve_goal(GOAL, w_sum=0.45, top_k=100)
print(
    f"levels for goal {GOAL}: threshold {solved.threshold:.3f}, achieved mean "
    f"{solved.mean:.3f}\n  {list(solved.levels)}"
)

# 3. Evaluate dense, CoreInfer and the levels on the same seeded sample, zero-shot.
evaluator = TaskEvaluator(
    loaded, EvaluatorOptions(model_id=model_id, task=TASK, num_fewshot=0, batch_size=8)
)
levels = Method.levels([max(0.01, x) for x in solved.levels], layers="6:27")
results = {
    name: evaluator.run(method, evaluated)
    for name, method in [
        ("dense", Method.dense()),
        ("coreinfer", Method.coreinfer(0.4)),
        ("levels", levels),
    ]
}
for name, r in results.items():
    density = "-" if r.density is None else f"{r.density:.3f}"
    print(f"{name:>9}: {r.metric} {r.score:.3f}  realized density {density}")

core = results["coreinfer"]
for name in ("levels", "dense"):
    d = paired_difference(
        results[name].sample_ids,
        results[name].sample_scores,
        core.sample_ids,
        core.sample_scores,
        seed=SEED,
    )
    print(f"{name} - CoreInfer: {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}] on {d.n} documents")
