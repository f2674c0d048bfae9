#!/usr/bin/env bash
# A small tuning study on the offline model and task, then its report.
set -euo pipefail
AUTOSPARSE=${AUTOSPARSE:-.venv/bin/autosparse}
STUDY=example-smollm2-csqa

$AUTOSPARSE tune --model smollm2-135m --task csqa-local --goal 0.4 \
    --trials 6 --screen 24 --calibration 24 --num-fewshot 0 --study "$STUDY"
$AUTOSPARSE show "$STUDY"
$AUTOSPARSE finalize --study "$STUDY" --top-k 2 --limit 60
echo "report: studies/$STUDY/report.md"
