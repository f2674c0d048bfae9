#!/usr/bin/env bash
# The real-model evidence of docs/results.md: tuned levels against CoreInfer and dense on
# qwen2.5-0.5b, held out, with paired intervals and detectable differences.
#
#   bash benchmarks/evidence.sh DIR [STAGE...]
#
# DIR is a folder that is kept between sessions (every study, calibration statistic and
# evaluation is stored under DIR/studies/evidence.db, so a stopped run resumes where it
# stopped and a finished stage costs nothing when run again). STAGE is one or more of
#   csqa-task  csqa-kl  csqa-free  csqa-griffin  csqa-selectors  csqa-sweep  truthfulqa-kl
#   truthfulqa-free  truthfulqa-griffin  truthfulqa-free-griffin  truthfulqa-selectors
#   truthfulqa-abstentions  truthfulqa-task  truthfulqa-sweep  nq-probe  asdiv-kl  asdiv-task
#   asdiv-free  asdiv-griffin  asdiv-free-griffin  asdiv-sweep  asdiv-probe
# (default: csqa-task csqa-kl). Needs `make qwen-0.5b` first (MODEL=qwen2.5-1.5b runs the
# same stages on the bigger model, after `make qwen-1.5b`). Each stage prints the
# report that docs/results.md quotes; reports are also written to DIR/reports/.
#
# Costs measured on this project's 2-core CPU machine (masked mode, batch 8, float32):
# csqa-local with 6 shots about 1.2 s per document and method; truthfulqa-local with 32
# new tokens 2.4 s (dense) to 2.8 s (CoreInfer) per document (the prompt carries a long
# fixed primer; without the cap a document generates until a blank line, at most 256
# tokens, and costs 6-10 s); nq-local 1.3 s; asdiv-local with 6 shots and 8 new tokens
# about 1.2 s (dense) to 1.5 s (CoreInfer).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
autosparse="${AUTOSPARSE:-$here/.venv/bin/autosparse}"
dir="${1:?usage: bash benchmarks/evidence.sh DIR [STAGE...]}"
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(csqa-task csqa-kl)

mkdir -p "$dir/reports"
cd "$dir"
storage="sqlite:///studies/evidence.db"
model="${MODEL:-qwen2.5-0.5b}"
held_out=300

run() {
    echo "\$ autosparse $*" >&2
    "$autosparse" "$@"
}

# tune a study (created or resumed; the task-objective studies keep the default name, so
# that the sweeps reuse them as their goal-0.4 studies), then finalize it on the held-out documents;
# every study shares one database, so dense and CoreInfer run once per task and sample.
study() {
    local task=$1 objective=$2 name=$3 top_k=$4
    shift 4
    run tune --model "$model" --task "$task" --goal 0.4 --objective "$objective" \
        --study "$name" --storage "$storage" "$@"
    run finalize --study "$name" --storage "$storage" --limit "$held_out" --top-k "$top_k" \
        | tee "reports/$name.txt"
}

csqa=(--num-fewshot 6 --trials 6 --screen 60 --calibration 64)
# fidelity trials cost a fraction of task trials, so the kl studies (formula and free space,
# which the search-cost comparison of docs/performance.md reads) run more of them
csqa_kl=(--num-fewshot 6 --trials 24 --screen 60 --calibration 64)
# a free-space trial costs seconds (its prompts are run once per study and most children
# are pruned early), so the evolution gets more of them; its finalize evaluates the winner
csqa_free=(--num-fewshot 6 --trials 51 --screen 60 --calibration 64)
truthfulqa=(--num-fewshot 0 --trials 12 --screen 40 --calibration 64 --max-gen-toks 32)
# a task trial costs about 2.5 minutes here, so the sweep's new goals get 6 trials each; its
# goal-0.4 study is truthfulqa-task's (12 trials)
truthfulqa_sweep=(--num-fewshot 0 --trials 6 --screen 40 --calibration 64 --max-gen-toks 32)
truthfulqa_free=(--num-fewshot 0 --trials 51 --screen 40 --calibration 64 --max-gen-toks 32)
# ASDiv's answer is a number of a few tokens (8 new tokens at most); exact match is 0 or 1
# per problem, so every asdiv study screens on 100 problems (and so shares its held-out ones)
asdiv=(--num-fewshot 6 --trials 10 --screen 100 --calibration 64 --max-gen-toks 8)
asdiv_kl=(--num-fewshot 6 --trials 24 --screen 100 --calibration 64 --max-gen-toks 8)
asdiv_free=(--num-fewshot 6 --trials 51 --screen 100 --calibration 64 --max-gen-toks 8)
asdiv_sweep=(--num-fewshot 6 --trials 6 --screen 100 --calibration 64 --max-gen-toks 8)

# GRIFFIN's rule at uniform keep 0.4 on the held-out documents of study $2, paired with
# CoreInfer and with that study's winner (both read from the store when finalize ran them);
# $3 names the winner in the report
griffin_held_out() {
    local task=$1 study=$2 label=$3
    "$(dirname "$autosparse")/python" - "$storage" "$study" \
        "$held_out" "$label" <<'PY' | tee "reports/$study-griffin-held-out.txt"
import sys

from autosparse import workflow
from autosparse.finalize import candidates, held_out_ids
from autosparse.methods import Method
from autosparse.stats import paired_difference
from autosparse.store import ResultStore
from autosparse.tasks.evaluator import TaskEvaluator
from autosparse.tuning import SPEC_ATTR, StudySpec, load_existing, open_storage

url, name, limit, winner = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
study = load_existing(open_storage(url, heartbeat=None), name)
spec = StudySpec.from_dict(study.user_attrs[SPEC_ATTR])
loaded = workflow.load_quietly(spec.model, "auto", "auto")
with ResultStore(url) as store:
    # the study's own cap on new tokens, as finalize uses it (and so finds its results)
    options = workflow.study_options(spec, batch_size=8, store=store, progress=False,
                                     max_gen_toks=study.user_attrs.get(workflow.GEN_CAP_ATTR))
    evaluator = TaskEvaluator(loaded, options)
    attrs = study.user_attrs
    ids = held_out_ids(evaluator.document_ids(), calibration=attrs.get("calibration_ids", ()),
                       screen=attrs.get("screen_ids", ()), limit=limit, seed=spec.seed)
    uniform = dict(layers=spec.layers, mode="masked")
    methods = {
        "CoreInfer keep=0.4": Method.coreinfer(0.4, spec.token_ratio, **uniform),
        "GRIFFIN keep=0.4": Method.coreinfer(0.4, spec.token_ratio, selector="griffin",
                                             **uniform),
        winner: candidates(study, spec, top_k=1, select="mean")[0].method,
    }
    results = {label: evaluator.run(m, ids) for label, m in methods.items()}
for label, r in results.items():
    print(f"{label}: {spec.task} score {r.score:.4f} on {len(r.sample_ids)} documents")
for a, b in [("GRIFFIN keep=0.4", "CoreInfer keep=0.4"), (winner, "GRIFFIN keep=0.4")]:
    ra, rb = results[a], results[b]
    d = paired_difference(ra.sample_ids, ra.sample_scores, rb.sample_ids, rb.sample_scores)
    print(f"{a} - {b}: {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}], "
          f"detectable {d.detectable():.4f}")
PY
}

# two `eval --json` reports on the same documents, paired: A - B with its interval
paired() {
    "$(dirname "$autosparse")/python" - "$1" "$2" <<'PY'
import json
import sys

from autosparse.stats import paired_difference

a, b = (json.load(open(path)) for path in sys.argv[1:3])
d = paired_difference(a["sample_ids"], a["sample_scores"], b["sample_ids"], b["sample_scores"])
print(f"{a['task']}: A = {sys.argv[1]} {a['score']:.4f}, B = {sys.argv[2]} {b['score']:.4f}, n {d.n}")
det = d.detectable()
print(f"A - B {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}], detectable "
      + ("(no spread)" if det is None else f"{det:.4f}"))
PY
}

# every truthfulqa-local evaluation of $held_out documents in the store, paired two by two,
# with how much of each comparison is "I have no comment." (scored well on every question)
abstentions() {
    "$(dirname "$autosparse")/python" "$here/benchmarks/abstentions.py" --storage "$storage" \
        --n "$held_out" | tee "reports/$model-truthfulqa-local-abstentions.txt"
}

for stage in "${stages[@]}"; do
    case "$stage" in
    csqa-task) study csqa-local task "$model-csqa-local-g0.4" 2 "${csqa[@]}" ;;
    csqa-kl) study csqa-local kl "$model-csqa-local-g0.4-kl" 2 "${csqa_kl[@]}" ;;
    csqa-free) study csqa-local kl "$model-csqa-local-g0.4-free-kl" 1 "${csqa_free[@]}" --space free --grid 0.05 --max-moves 6 ;;
    # TruthfulQA finalizes the best trial only (one candidate has no AVG): a method costs
    # about 14 minutes on 300 documents here
    truthfulqa-kl) study truthfulqa-local kl "$model-truthfulqa-local-g0.4-kl" 1 "${truthfulqa[@]}" ;;
    truthfulqa-free) study truthfulqa-local kl "$model-truthfulqa-local-g0.4-free-kl" 1 "${truthfulqa_free[@]}" \
        --space free --grid 0.05 --max-moves 6 ;;
    # the free space with GRIFFIN's rule choosing the neurons; its finalize pairs the winner
    # with GRIFFIN uniform (the study's own baseline) instead of CoreInfer
    truthfulqa-free-griffin) study truthfulqa-local kl "$model-truthfulqa-local-g0.4-free-griffin-kl" 1 \
        "${truthfulqa_free[@]}" --space free --grid 0.05 --max-moves 6 --selector griffin ;;
    truthfulqa-task) study truthfulqa-local task "$model-truthfulqa-local-g0.4" 1 "${truthfulqa[@]}" ;;
    truthfulqa-sweep)
        # goal 0.3 beside truthfulqa-task's 0.4 (GOALS=0.3,0.4,0.5 adds 0.5: about 30 minutes
        # a goal here); the best trial per goal (top-k 1)
        run sweep --model "$model" --task truthfulqa-local --goals "${GOALS:-0.3,0.4}" --storage "$storage" \
            --top-k 1 --limit "$held_out" "${truthfulqa_sweep[@]}" | tee "reports/$model-truthfulqa-local-sweep.txt"
        ;;
    csqa-sweep)
        run sweep --model "$model" --task csqa-local --goals 0.3,0.4,0.5 --storage "$storage" --top-k 2 \
            --limit "$held_out" "${csqa[@]}" | tee "reports/$model-csqa-local-sweep.txt"
        ;;
    csqa-selectors)
        # which neurons: GRIFFIN's rule against CoreInfer's votes, uniform keep 0.4, on one
        # seeded sample of 300 documents (eval's sample, not a study's held-out one)
        for selector in griffin coreinfer; do
            run eval --model "$model" --task csqa-local --method coreinfer --keep 0.4 \
                --selector "$selector" --num-fewshot 6 --limit "$held_out" \
                --storage "$storage" --json > "reports/$model-csqa-local-$selector.json"
        done
        paired "reports/$model-csqa-local-griffin.json" \
            "reports/$model-csqa-local-coreinfer.json" | tee "reports/$model-csqa-local-selectors.txt"
        ;;
    csqa-griffin) griffin_held_out csqa-local "$model-csqa-local-g0.4-free-kl" "free winner" ;;
    truthfulqa-griffin) griffin_held_out truthfulqa-local "$model-truthfulqa-local-g0.4-free-kl" "free winner" ;;
    # the same on the formula kl study's held-out documents (no free study needed)
    truthfulqa-selectors)
        griffin_held_out truthfulqa-local "$model-truthfulqa-local-g0.4-kl" "kl winner"
        abstentions
        ;;
    truthfulqa-abstentions) abstentions ;;
    nq-probe)
        # is dense above the floor at all? (exact match of NQ-open answers)
        run eval --model "$model" --task nq-local --method dense --num-fewshot 6 \
            --max-gen-toks 16 --limit 100 --storage "$storage" | tee "reports/$model-nq-local-dense.txt"
        ;;
    asdiv-kl) study asdiv-local kl "$model-asdiv-local-g0.4-kl" 1 "${asdiv_kl[@]}" ;;
    asdiv-task) study asdiv-local task "$model-asdiv-local-g0.4" 2 "${asdiv[@]}" ;;
    asdiv-free) study asdiv-local kl "$model-asdiv-local-g0.4-free-kl" 1 "${asdiv_free[@]}" \
        --space free --grid 0.05 --max-moves 6 ;;
    asdiv-griffin) griffin_held_out asdiv-local "$model-asdiv-local-g0.4-kl" "kl winner" ;;
    asdiv-free-griffin) study asdiv-local kl "$model-asdiv-local-g0.4-free-griffin-kl" 1 \
        "${asdiv_free[@]}" --space free --grid 0.05 --max-moves 6 --selector griffin ;;
    asdiv-probe)
        # dense and CoreInfer keep 0.4 on 100 seeded problems, paired (eval's sample): is
        # dense above the floor, and is there a gap to win back? (MODEL=qwen2.5-1.5b too)
        for method in dense coreinfer; do
            run eval --model "$model" --task asdiv-local --method "$method" --keep 0.4 \
                --num-fewshot 6 --max-gen-toks 8 --limit 100 --storage "$storage" \
                --json > "reports/$model-asdiv-local-probe-$method.json"
        done
        paired "reports/$model-asdiv-local-probe-dense.json" \
            "reports/$model-asdiv-local-probe-coreinfer.json" | tee "reports/$model-asdiv-local-probe.txt"
        ;;
    asdiv-sweep)
        run sweep --model "$model" --task asdiv-local --goals "${GOALS:-0.3,0.4,0.5}" --storage "$storage" \
            --top-k 1 --limit "$held_out" "${asdiv_sweep[@]}" | tee "reports/$model-asdiv-local-sweep.txt"
        ;;
    *)
        echo "unknown stage $stage" >&2
        exit 2
        ;;
    esac
done
